"""SAM's mask decoder: a two-way transformer between prompt tokens and the image embedding,
then a 4x transposed-conv upscaling and per-token hypernetwork MLPs (Segment Anything, section 3).
Parameter names follow the LiteMedSAM checkpoint so it loads with ``strict=True``."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .image_encoder import LayerNorm2d


class TokenAttention(nn.Module):
    """Multi-head attention whose q/k/v projections may shrink the width (``downsample``)."""

    def __init__(self, dim: int, heads: int, downsample: int = 1):
        super().__init__()
        inner = dim // downsample
        self.heads = heads
        self.q_proj = nn.Linear(dim, inner)
        self.k_proj = nn.Linear(dim, inner)
        self.v_proj = nn.Linear(dim, inner)
        self.out_proj = nn.Linear(inner, dim)

    def _split(self, x):
        b, n, c = x.shape
        return x.view(b, n, self.heads, c // self.heads).transpose(1, 2)

    def forward(self, q, k, v):
        out = F.scaled_dot_product_attention(self._split(self.q_proj(q)), self._split(self.k_proj(k)),
                                             self._split(self.v_proj(v)))
        b, h, n, d = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, h * d))


class MLPBlock(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.lin1 = nn.Linear(dim, hidden)
        self.lin2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.lin2(F.relu(self.lin1(x)))


class TwoWayBlock(nn.Module):
    """Token self-attention, tokens -> image, token MLP, image -> tokens (each + residual + LN)."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, first: bool):
        super().__init__()
        self.first = first     # the first block's self-attention sees no positional encoding
        self.self_attn = TokenAttention(dim, heads)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn_token_to_image = TokenAttention(dim, heads, 2)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLPBlock(dim, mlp_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.norm4 = nn.LayerNorm(dim)
        self.cross_attn_image_to_token = TokenAttention(dim, heads, 2)

    def forward(self, tokens, image, token_pe, image_pe):
        if self.first:
            tokens = self.self_attn(tokens, tokens, tokens)
        else:
            q = tokens + token_pe
            tokens = tokens + self.self_attn(q, q, tokens)
        tokens = self.norm1(tokens)
        keys = image + image_pe
        tokens = self.norm2(tokens + self.cross_attn_token_to_image(tokens + token_pe, keys, image))
        tokens = self.norm3(tokens + self.mlp(tokens))
        image = self.norm4(image + self.cross_attn_image_to_token(keys, tokens + token_pe, tokens))
        return tokens, image


class TwoWayTransformer(nn.Module):
    def __init__(self, depth: int = 2, dim: int = 256, heads: int = 8, mlp_dim: int = 2048):
        super().__init__()
        self.layers = nn.ModuleList(TwoWayBlock(dim, heads, mlp_dim, i == 0) for i in range(depth))
        self.final_attn_token_to_image = TokenAttention(dim, heads, 2)
        self.norm_final_attn = nn.LayerNorm(dim)

    def forward(self, image, image_pe, tokens):
        """image, image_pe: (B, C, h, w); tokens: (B, N, C) -> tokens, image tokens (B, hw, C)."""
        image = image.flatten(2).transpose(1, 2)
        image_pe = image_pe.flatten(2).transpose(1, 2)
        token_pe, x = tokens, tokens
        for layer in self.layers:
            x, image = layer(x, image, token_pe, image_pe)
        x = x + self.final_attn_token_to_image(x + token_pe, image + image_pe, image)
        return self.norm_final_attn(x), image


class HyperMLP(nn.Module):
    """ReLU MLP (``layers.0..n-1``), no activation after the last layer."""

    def __init__(self, din: int, hidden: int, dout: int, depth: int):
        super().__init__()
        dims = [din] + [hidden] * (depth - 1) + [dout]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class MaskDecoder(nn.Module):
    def __init__(self, dim: int = 256, num_multimask_outputs: int = 3, depth: int = 2, heads: int = 8,
                 mlp_dim: int = 2048, iou_head_depth: int = 3, iou_head_hidden_dim: int = 256):
        super().__init__()
        self.num_mask_tokens = num_multimask_outputs + 1
        self.transformer = TwoWayTransformer(depth, dim, heads, mlp_dim)
        self.iou_token = nn.Embedding(1, dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(dim, dim // 4, 2, stride=2), LayerNorm2d(dim // 4), nn.GELU(),
            nn.ConvTranspose2d(dim // 4, dim // 8, 2, stride=2), nn.GELU())
        self.output_hypernetworks_mlps = nn.ModuleList(
            HyperMLP(dim, dim, dim // 8, 3) for _ in range(self.num_mask_tokens))
        self.iou_prediction_head = HyperMLP(dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth)

    def forward(self, image_embeddings, image_pe, sparse, dense, multimask_output: bool = False):
        """image_embeddings: (B or 1, C, h, w), one per prompt or shared; sparse (B, N, C);
        dense (B, C, h, w). Returns mask logits (B, M, 4h, 4w) and predicted IoU (B, M), M = 1 or 3."""
        b = sparse.shape[0]
        out_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight])[None].expand(b, -1, -1)
        tokens = torch.cat([out_tokens, sparse], dim=1)
        src = image_embeddings.expand(b, -1, -1, -1) if image_embeddings.shape[0] == 1 else image_embeddings
        src = src + dense
        _, c, h, w = src.shape
        hs, src = self.transformer(src, image_pe.expand(b, -1, -1, -1), tokens)
        up = self.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
        hyper = torch.stack([mlp(hs[:, 1 + i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1)
        masks = (hyper @ up.flatten(2)).view(b, -1, *up.shape[2:])
        iou = self.iou_prediction_head(hs[:, 0])
        pick = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, pick], iou[:, pick]
