"""Region-mining classifier of the ``acol`` recipe: ResNet-50 + FPN, box features, ACoL branches.

Fan et al., "Weakly Supervised Liver Tumor Segmentation Based on Anchor Box and Adversarial
Complementary Learning" (../shared/papers/anchor_box_acol_region_mining.txt), Fig. 2-4.

* Backbone: MONAI's 2D ResNet-50 (bottleneck blocks 3-4-6-3, first convolution of stride 2 and a
  max-pool, so C2..C5 have strides 4, 8, 16, 32 as in torchvision), ``width`` scales every stage
  (1.0 = the paper's network; 0.25 runs on a CPU).  No pretrained weights: MONAI's only 2D-less
  weights are 3D MedicalNet ones and nothing can be downloaded here, so it trains from scratch.
* Feature pyramid: MONAI ``FeaturePyramidNetwork`` on C2..C5 -> P2..P5.
* A box (positive tumour box or negative anchor) of ``w x h`` input pixels reads its features from
  ``P_k``, ``k = floor(4 + log2(sqrt(w h) / 224))`` clipped to 2..5 (Eq. 2), resampled to a
  ``roi_size`` square by bilinear RoI-align (``grid_sample``, one sample per bin: a CPU's
  ``grid_sample`` backward is slow; torchvision's ``roi_align`` is not available).
* Classifier heads (two per ACoL, one for the CAM baseline): 3x3 conv to ``head_channels`` (512
  in the paper), ReLU, 1x1 conv to 2 (background, tumour).  Their output is the class activation
  map itself (a 1x1 conv after the features equals Eq. 1's weighted channel sum), and its global
  average is the logit.
* ACoL: branch A's map of the target class (the label while training, tumour at inference) goes
  through ReLU and min-max normalisation; box features where it exceeds ``delta`` (0.6) are set
  to zero and the result is branch B's input.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from monai.networks.blocks.feature_pyramid_network import FeaturePyramidNetwork
from monai.networks.nets import resnet50
from torch import nn

from ...learn.modelstore import register_network

LEVELS = (2, 3, 4, 5)                 # P2..P5
STRIDES = {2: 4, 3: 8, 4: 16, 5: 32}
TUMOUR = 1                            # class index of the tumour (0 = background)


def assign_levels(boxes: torch.Tensor, k0: int = 4, canonical: float = 224.0, kmin: int = 2, kmax: int = 5) -> torch.Tensor:
    """Pyramid level of each box (Eq. 2): ``floor(k0 + log2(sqrt(w h) / canonical))`` clipped to [kmin, kmax].

    ``boxes``: (N, 4) ``x0, y0, x1, y1`` in input pixels (edges).  Returns (N,) int64.
    """
    boxes = torch.as_tensor(boxes, dtype=torch.float32)
    w = (boxes[:, 2] - boxes[:, 0]).clamp_min(1e-6)
    h = (boxes[:, 3] - boxes[:, 1]).clamp_min(1e-6)
    k = torch.floor(k0 + torch.log2(torch.sqrt(w * h) / canonical))
    return k.clamp(kmin, kmax).to(torch.int64)


def roi_align(features: torch.Tensor, rois: torch.Tensor, stride: int, size: int, sampling: int = 2) -> torch.Tensor:
    """Bilinear RoI-align: (R, C, size, size) features of ``rois`` (R, 5) ``[batch index, x0, y0, x1, y1]``.

    Box coordinates are input pixels (edges); each output bin averages ``sampling**2`` bilinear
    samples (the "aligned" variant: no half-pixel shift).  Points outside the map read zeros.
    """
    r = rois.shape[0]
    c, hf, wf = features.shape[1:]
    if r == 0:
        return features.new_zeros((0, c, size, size))
    n = size * sampling
    steps = (torch.arange(n, device=features.device, dtype=features.dtype) + 0.5) / n     # (n,) in (0, 1)
    x0, y0, x1, y1 = (rois[:, i:i + 1].to(features.dtype) for i in range(1, 5))
    xs = x0 + (x1 - x0) * steps            # (R, n) input pixels
    ys = y0 + (y1 - y0) * steps
    # grid_sample (align_corners=False): -1 / +1 are the outer edges of the map
    gx = xs / (stride * wf) * 2 - 1
    gy = ys / (stride * hf) * 2 - 1
    grid = torch.stack((gx[:, None, :].expand(r, n, n), gy[:, :, None].expand(r, n, n)), dim=-1)   # (R, n, n, 2)
    out = features.new_empty((r, c, n, n))
    index = rois[:, 0].long()
    for b in torch.unique(index).tolist():
        sel = torch.nonzero(index == b).flatten()
        g = grid[sel].reshape(1, len(sel) * n, n, 2)
        sampled = F.grid_sample(features[b:b + 1], g, mode="bilinear", padding_mode="zeros", align_corners=False)
        out[sel] = sampled.reshape(c, len(sel), n, n).transpose(0, 1)
    if sampling > 1:
        out = F.avg_pool2d(out, sampling)
    return out


def normalise_map(cam: torch.Tensor) -> torch.Tensor:
    """ReLU then min-max to [0, 1] per map: (R, H, W) -> (R, H, W) (a flat map gives zeros)."""
    m = F.relu(cam)
    flat = m.flatten(1)
    lo = flat.min(dim=1).values.view(-1, 1, 1)
    hi = flat.max(dim=1).values.view(-1, 1, 1)
    return (m - lo) / (hi - lo).clamp_min(1e-8)


def erase(features: torch.Tensor, norm_map: torch.Tensor, delta: float) -> torch.Tensor:
    """Zero the features (R, C, H, W) where the normalised map (R, H, W) exceeds ``delta``."""
    keep = (norm_map <= delta).to(features.dtype).unsqueeze(1)
    return features * keep


class ClassifierHead(nn.Module):
    """Two convolutions (3x3 -> ``mid``, ReLU, 1x1 -> ``classes``): the class activation maps."""

    def __init__(self, in_channels: int, mid: int = 512, classes: int = 2):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, mid, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(mid, classes, kernel_size=1)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.relu(self.conv1(f)))


@register_network("FPNACoLClassifier")
class FPNACoLClassifier(nn.Module):
    """Box classifier (tumour vs. background) on ResNet-50 + FPN features, with ACoL's two branches.

    ``forward(x, rois, labels=None)``: ``x`` (B, in_channels, H, W) image crops (H, W multiples
    of 32 are best), ``rois`` (R, 5) ``[batch index, x0, y0, x1, y1]`` in pixels of ``x``,
    ``labels`` (R,) the class whose map drives the erasing (None: tumour).  Returns a dict with
    ``logits_a`` (R, 2), ``cam_a`` (R, 2, S, S) and, with ``acol``, ``logits_b`` / ``cam_b``.
    """

    def __init__(self, in_channels: int = 3, width: float = 1.0, fpn_channels: int = 256, head_channels: int = 512,
                 roi_size: int = 14, acol: bool = True, delta: float = 0.6, classes: int = 2):
        super().__init__()
        if not 0 < width <= 4:
            raise ValueError(f"width must be in (0, 4], got {width}")
        self.acol = bool(acol)
        self.delta = float(delta)
        self.roi_size = int(roi_size)
        self.backbone = resnet50(spatial_dims=2, n_input_channels=in_channels, widen_factor=float(width),
                                 conv1_t_stride=2, feed_forward=False)
        stages = [int(c * width) * 4 for c in (64, 128, 256, 512)]     # bottleneck expansion 4
        self.fpn = FeaturePyramidNetwork(spatial_dims=2, in_channels_list=stages, out_channels=fpn_channels)
        self.head_a = ClassifierHead(fpn_channels, head_channels, classes)
        self.head_b = ClassifierHead(fpn_channels, head_channels, classes) if self.acol else None

    def pyramid(self, x: torch.Tensor) -> dict:
        """{2: P2, 3: P3, 4: P4, 5: P5} of an image batch."""
        net = self.backbone
        f = net.maxpool(net.act(net.bn1(net.conv1(x))))
        feats = OrderedDict()
        for k, layer in zip(LEVELS, (net.layer1, net.layer2, net.layer3, net.layer4)):
            f = layer(f)
            feats[f"c{k}"] = f
        return {k: p for k, p in zip(LEVELS, self.fpn(feats).values())}

    def box_features(self, pyramid: dict, rois: torch.Tensor) -> torch.Tensor:
        """(R, C, S, S) RoI-aligned features, each box from its Eq. 2 level."""
        levels = assign_levels(rois[:, 1:].detach().cpu())
        first = next(iter(pyramid.values()))
        out = first.new_zeros((rois.shape[0], first.shape[1], self.roi_size, self.roi_size))
        for k in LEVELS:
            sel = torch.nonzero(levels == k).flatten()
            if len(sel):
                sel = sel.to(rois.device)
                out[sel] = roi_align(pyramid[k], rois[sel], STRIDES[k], self.roi_size, sampling=1)
        return out

    def forward(self, x: torch.Tensor, rois: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        f = self.box_features(self.pyramid(x), rois)
        cam_a = self.head_a(f)
        out = {"cam_a": cam_a, "logits_a": cam_a.mean(dim=(2, 3))}
        if self.acol:
            cls = torch.full((f.shape[0],), TUMOUR, dtype=torch.long, device=f.device) if labels is None else labels.long()
            m = normalise_map(cam_a.detach()[torch.arange(f.shape[0], device=f.device), cls])
            cam_b = self.head_b(erase(f, m, self.delta))
            out.update(cam_b=cam_b, logits_b=cam_b.mean(dim=(2, 3)), erase_map=m)
        return out

    def localization(self, out: dict) -> torch.Tensor:
        """Fused tumour map (R, S, S) in [0, 1]: max of the normalised maps of A and B (A alone without ACoL)."""
        fused = normalise_map(out["cam_a"][:, TUMOUR])
        if "cam_b" in out:
            fused = torch.maximum(fused, normalise_map(out["cam_b"][:, TUMOUR]))
        return fused


def pad_multiple(size: int, multiple: int = 32) -> int:
    return int(math.ceil(size / multiple) * multiple)
