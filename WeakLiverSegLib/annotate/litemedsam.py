"""LiteMedSAM (Ma et al., "Segment anything in medical images", Nat. Commun. 2024; the LiteMedSAM
variant of the CVPR 2024 efficient MedSAM challenge): TinyViT image encoder + SAM prompt encoder +
SAM mask decoder, prompted with one box per slice.

``LiteMedSAM`` is a registered model-store network, so a converted checkpoint is an ordinary model
folder (``model.json`` + ``litemedsam.safetensors``). ``SlicePredictor`` holds the preprocessing the
model was trained with (min-max scaling of a windowed slice, longest side resized to 256, zero
padding to 256x256, grey copied to three channels) and maps boxes and masks between a slice's
pixels and the model's 256 grid.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..learn.modelstore import register_network
from .image_encoder import TinyViTEncoder
from .mask_decoder import MaskDecoder
from .prompt_encoder import PromptEncoder

IMAGE_SIZE = 256


@register_network("LiteMedSAM")
class LiteMedSAM(nn.Module):
    def __init__(self, image_size: int = IMAGE_SIZE, embed_dim: int = 256):
        super().__init__()
        self.image_size = image_size
        grid = image_size // 4
        self.image_encoder = TinyViTEncoder(out_chans=embed_dim)
        self.prompt_encoder = PromptEncoder(embed_dim, (grid, grid), (image_size, image_size), 16)
        self.mask_decoder = MaskDecoder(embed_dim)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) in [0, 1] -> (B, 256, S/4, S/4)."""
        return self.image_encoder(images)

    def decode(self, embeddings: torch.Tensor, boxes: torch.Tensor, multimask: bool = False):
        """Embeddings (B or 1, C, h, w) + boxes (B, 4) x0 y0 x1 y1 in model pixels ->
        mask logits (B, M, 4h, 4w) and predicted IoU (B, M)."""
        size = tuple(embeddings.shape[-2:])
        # the prompt encoder normalises by its configured input size: rescale for a smaller input
        boxes = boxes * (self.image_size / (4 * size[1]))
        sparse, dense = self.prompt_encoder(boxes=boxes, size=size)
        pe = self.prompt_encoder.dense_positions(size)
        return self.mask_decoder(embeddings, pe, sparse, dense, multimask_output=multimask)

    def forward(self, images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(images), boxes)[0]


def fuse_batchnorm(model: nn.Module) -> nn.Module:
    """Fold every eval-mode BatchNorm of the image encoder into the conv before it (inference only;
    same outputs to float precision, fewer passes over the 256x256 feature maps)."""
    from .image_encoder import ConvBN

    for module in model.modules():
        if isinstance(module, ConvBN) and isinstance(module.bn, nn.BatchNorm2d):
            conv, bn = module.c, module.bn
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                              conv.padding, groups=conv.groups, bias=True).to(conv.weight.device)
            with torch.no_grad():
                fused.weight.copy_(conv.weight * scale[:, None, None, None])
                fused.bias.copy_(bn.bias - bn.running_mean * scale)
            module.c = fused
            module.bn = nn.Identity()
    return model


class SlicePredictor:
    """One network, the preprocessing it was trained with, and an embedding cache.

    A *view* is a rectangle of one slice and the side of the model input it is scaled into,
    (row0, col0, rows, cols, size): the whole slice or a crop around the box, at 256 (as trained) or
    smaller (faster; ``size`` None = ``input_size``). Embeddings are cached per (slice, view), so a slice
    encoded once is never encoded again while the image stays the same.
    """

    def __init__(self, net: LiteMedSAM, device: str = "cpu", window=(-160.0, 240.0), input_size: int | None = None,
                 batch_size: int = 4, cache_slices: int = 512):
        self.net = net
        self.device = torch.device(device)
        self.window = (float(window[0]), float(window[1]))
        self.input_size = int(input_size or net.image_size)
        if self.input_size % 16:
            raise ValueError(f"input_size {self.input_size}: must be a multiple of 16")
        self.batch_size = int(batch_size)
        self.cache_slices = int(cache_slices)
        self._cache: dict = {}
        self._image_key = None
        self.encoded = 0          # slices encoded (for speed reports)

    # -- preprocessing ---------------------------------------------------------------------
    def view(self, view) -> tuple:
        """``(r0, c0, h, w[, size])`` -> the full 5-tuple (ints; size checked)."""
        r0, c0, h, w, *rest = (int(v) if v is not None else None for v in view)
        size = rest[0] if rest and rest[0] else self.input_size
        if size % 16:
            raise ValueError(f"model input size {size}: must be a multiple of 16")
        return r0, c0, h, w, size

    @staticmethod
    def _scale(view) -> float:
        return view[4] / max(view[2], view[3])

    def _prepare(self, plane: np.ndarray, view) -> torch.Tensor:
        r0, c0, h, w, size = view
        img = np.clip(plane[r0 : r0 + h, c0 : c0 + w].astype(np.float32), *self.window)
        lo, hi = float(img.min()), float(img.max())
        img = (img - lo) / max(hi - lo, 1e-8)
        s = self._scale(view)
        nh, nw = max(1, int(round(h * s))), max(1, int(round(w * s)))
        t = torch.from_numpy(img)[None, None]
        t = F.interpolate(t, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
        t = F.pad(t, (0, size - nw, 0, size - nh))
        return t.expand(-1, 3, -1, -1)

    def set_image(self, array_zyx: np.ndarray, key=None) -> None:
        """Use ``array_zyx`` (HU) from now on; the cache is kept only if ``key`` is unchanged."""
        key = key if key is not None else id(array_zyx)
        if key != self._image_key:
            self._cache.clear()
            self._image_key = key
        self._array = array_zyx

    def cached(self, k: int, view) -> bool:
        return (k, self.view(view)) in self._cache

    @torch.inference_mode()
    def embeddings(self, slices, view) -> dict:
        """Embeddings of ``slices`` (iterable of k) in ``view``; uncached ones encoded in batches."""
        view = self.view(view)
        todo = [k for k in slices if (k, view) not in self._cache]
        for i in range(0, len(todo), self.batch_size):
            chunk = todo[i : i + self.batch_size]
            batch = torch.cat([self._prepare(self._array[k], view) for k in chunk]).to(self.device)
            emb = self.net.encode(batch)
            for k, e in zip(chunk, emb):
                self._cache[(k, view)] = e[None]
            self.encoded += len(chunk)
        while len(self._cache) > self.cache_slices:
            self._cache.pop(next(iter(self._cache)))
        return {k: self._cache[(k, view)] for k in slices}

    @torch.inference_mode()
    def predict(self, k: int, view, box_rc) -> tuple:
        """Mask of slice ``k`` inside ``view`` for a box (r0, c0, r1, c1) in slice pixels (inclusive).

        Returns (bool mask of the view's shape, predicted IoU, foreground probability map)."""
        view = self.view(view)
        emb = self.embeddings([k], view)[k]
        r0, c0, h, w, _ = view
        s = self._scale(view)
        # LiteMedSAM's convention: the first / last pixel indices of the box, times the resize factor
        box = [(box_rc[1] - c0) * s, (box_rc[0] - r0) * s, (box_rc[3] - c0) * s, (box_rc[2] - r0) * s]
        logits, iou = self.net.decode(emb, torch.tensor([box], dtype=torch.float32, device=self.device))
        nh, nw = int(round(h * s)), int(round(w * s))
        logits = F.interpolate(logits[..., :nh, :nw], size=(h, w), mode="bilinear", align_corners=False)
        prob = torch.sigmoid(logits[0, 0]).float().cpu().numpy()
        return prob > 0.5, float(iou[0, 0]), prob
