"""SAM's prompt encoder as LiteMedSAM configures it (256-d tokens, 64x64 embedding, 256x256 input).

A box becomes two tokens: random-Fourier positional encodings of its two corners plus a learned
corner embedding each (Kirillov et al., Segment Anything, 2023, section 3). Points and a mask
prompt are kept so the checkpoint loads whole, and because a mask prompt is how a previous
slice's mask could be fed in.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .image_encoder import LayerNorm2d


class RandomFourierPositions(nn.Module):
    """Positions in [0, 1]^2 -> sin/cos of a fixed Gaussian projection (2 x num_feats)."""

    def __init__(self, num_feats: int = 128):
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn(2, num_feats))

    def encode(self, xy01: torch.Tensor) -> torch.Tensor:          # (..., 2) in [0, 1]
        proj = (2 * xy01 - 1) @ self.positional_encoding_gaussian_matrix * (2 * math.pi)
        return torch.cat([proj.sin(), proj.cos()], dim=-1)

    def grid(self, h: int, w: int) -> torch.Tensor:                  # (C, h, w), pixel centres
        dev = self.positional_encoding_gaussian_matrix.device
        ys = (torch.arange(h, device=dev, dtype=torch.float32) + 0.5) / h
        xs = (torch.arange(w, device=dev, dtype=torch.float32) + 0.5) / w
        xy = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)
        return self.encode(xy).permute(2, 0, 1)


class PromptEncoder(nn.Module):
    def __init__(self, embed_dim: int = 256, image_embedding_size=(64, 64), input_image_size=(256, 256),
                 mask_in_chans: int = 16):
        super().__init__()
        self.embed_dim = embed_dim
        self.image_embedding_size = tuple(image_embedding_size)
        self.input_image_size = tuple(input_image_size)
        self.pe_layer = RandomFourierPositions(embed_dim // 2)
        # 0/1: negative/positive point, 2/3: box top-left / bottom-right corner
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(4))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in_chans // 4, 2, stride=2), LayerNorm2d(mask_in_chans // 4), nn.GELU(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, 2, stride=2), LayerNorm2d(mask_in_chans), nn.GELU(),
            nn.Conv2d(mask_in_chans, embed_dim, 1))
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def dense_positions(self, size=None) -> torch.Tensor:
        """(1, C, h, w) positional encoding of the image embedding's grid."""
        h, w = size or self.image_embedding_size
        return self.pe_layer.grid(h, w).unsqueeze(0)

    def _corners(self, xy: torch.Tensor) -> torch.Tensor:
        """Pixel coordinates (x, y) in the input image -> positional encoding of pixel centres."""
        scale = xy.new_tensor([self.input_image_size[1], self.input_image_size[0]])
        return self.pe_layer.encode((xy + 0.5) / scale)

    def embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        """(B, 4) x0, y0, x1, y1 in input pixels -> (B, 2, C) sparse tokens."""
        tokens = self._corners(boxes.reshape(-1, 2, 2).float())
        return tokens + torch.cat([self.point_embeddings[2].weight, self.point_embeddings[3].weight])[None]

    def embed_points(self, points: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        """(B, N, 2) points with labels 1 (object), 0 (background), -1 (padding) -> (B, N[+1], C)."""
        if pad:
            points = torch.cat([points, points.new_zeros(points.shape[0], 1, 2)], dim=1)
            labels = torch.cat([labels, labels.new_full((labels.shape[0], 1), -1)], dim=1)
        tokens = self._corners(points.float())
        lab = labels[..., None]
        tokens = torch.where(lab == -1, self.not_a_point_embed.weight, tokens)
        tokens = tokens + (lab == 0) * self.point_embeddings[0].weight + (lab == 1) * self.point_embeddings[1].weight
        return tokens

    def forward(self, points=None, boxes=None, masks=None, size=None):
        """Returns sparse (B, N, C) and dense (B, C, h, w) prompt embeddings; ``size`` (h, w) of the
        image embedding when it differs from the configured one (a smaller model input)."""
        bs = (points[0].shape[0] if points is not None else boxes.shape[0] if boxes is not None
              else masks.shape[0] if masks is not None else 1)
        dev = self.no_mask_embed.weight.device
        sparse = [torch.empty(bs, 0, self.embed_dim, device=dev)]
        if points is not None:
            sparse.append(self.embed_points(points[0], points[1], pad=boxes is None))
        if boxes is not None:
            sparse.append(self.embed_boxes(boxes))
        if masks is not None:
            dense = self.mask_downscaling(masks)
        else:
            h, w = size or self.image_embedding_size
            dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(bs, -1, h, w)
        return torch.cat(sparse, dim=1), dense
