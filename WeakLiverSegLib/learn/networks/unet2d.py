"""2D U-Net on three-slice groups, with the O2L paper's box attention and localization branch.

Backbone: MONAI ``UnetBasicBlock`` encoder (4 scales with skip connections: 1, 1/2, 1/4, 1/8,
then a bottleneck at 1/16), ``UnetUpBlock`` decoder, 1x1 head to 3 classes (background,
liver, tumour).

Box attention (the teacher, Eq. 1-2 of the paper), applied to the encoder features of each
of the 4 scales (the attended features feed both the skip connection and the next encoder
level, so the box prior reaches every depth):

* ``"o2l"``: ``f_og = f + sigmoid(conv_og(b_og)) * f`` then ``f_out = f_og + sigmoid(conv_le(b_le)) * f_og``
  (organ box first, then lesion box; residual attention with shortcut).
* ``"o2l_noshortcut"``: the same without the ``f +`` shortcuts (ablation).
* ``"multichannel"``: one attention per scale on the 2-channel input ``[b_og, b_le]`` (SCN-style
  ablation): ``f + sigmoid(conv([b_og, b_le])) * f``.
* ``"none"``: no attention (plain U-Net; the box input is ignored).

``conv_*`` are two 3x3 convolutions each followed by batch normalisation (ReLU between); the
binarized box maps are downsampled bilinearly (antialiased) to each scale.

Localization branch (the student, Fig. 5): decoder features of the scales 1/8 .. 1 are brought
to full resolution by sub-pixel convolution (pixel shuffle, MONAI ``SubpixelUpsample``),
concatenated and mapped by a 1x1 convolution to 3 box classes.  It is only computed when
``forward(..., with_loc=True)``, so inference never pays for it and its output cannot change
the segmentation.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution, SubpixelUpsample, UnetBasicBlock, UnetOutBlock, UnetUpBlock
from torch import nn

from ..modelstore import register_network

ATTENTION_VARIANTS = ("none", "o2l", "o2l_noshortcut", "multichannel")
_NORM = ("batch", {"affine": True})
_ACT = ("leakyrelu", {"inplace": True, "negative_slope": 0.01})


class BoxAttention(nn.Module):
    """Residual box attention ``f + sigmoid(conv_bn(b)) * f`` (or ``sigmoid(conv_bn(b)) * f`` without shortcut)."""

    def __init__(self, box_channels: int, feat_channels: int, shortcut: bool = True, hidden: int = 8):
        super().__init__()
        self.shortcut = shortcut
        self.conv = nn.Sequential(
            Convolution(2, box_channels, hidden, kernel_size=3, act="relu", norm=_NORM),
            Convolution(2, hidden, feat_channels, kernel_size=3, act=None, norm=_NORM),
        )

    def weights(self, box: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.conv(box))

    def forward(self, f: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
        w = self.weights(box)
        return f + w * f if self.shortcut else w * f


class ScaleAttention(nn.Module):
    """The attention of one encoder scale for a given variant (organ then lesion, or multichannel)."""

    def __init__(self, variant: str, channels: int):
        super().__init__()
        self.variant = variant
        if variant == "multichannel":
            self.joint = BoxAttention(2, channels, shortcut=True)
        else:
            shortcut = variant == "o2l"
            self.organ = BoxAttention(1, channels, shortcut=shortcut)
            self.lesion = BoxAttention(1, channels, shortcut=shortcut)

    def forward(self, f: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        if self.variant == "multichannel":
            return self.joint(f, boxes)
        return self.lesion(self.organ(f, boxes[:, 0:1]), boxes[:, 1:2])


class LocalizationBranch(nn.Module):
    """Aggregate decoder features of every scale at full resolution (pixel shuffle), 1x1 to classes."""

    def __init__(self, decoder_channels, out_channels: int = 3, mid: int = 8):
        super().__init__()
        ups = []
        n = len(decoder_channels)
        for s, ch in enumerate(decoder_channels):  # coarse (1/2^(n-1)) to full resolution
            factor = 2 ** (n - 1 - s)
            if factor == 1:
                ups.append(Convolution(2, ch, mid, kernel_size=1, conv_only=True))
            else:
                ups.append(SubpixelUpsample(2, ch, mid, scale_factor=factor))
        self.ups = nn.ModuleList(ups)
        self.head = nn.Sequential(nn.LeakyReLU(0.01), nn.Conv2d(mid * n, out_channels, kernel_size=1))

    def forward(self, feats) -> torch.Tensor:
        size = feats[-1].shape[-2:]
        up = [u(f)[..., : size[0], : size[1]] for u, f in zip(self.ups, feats)]
        return self.head(torch.cat(up, dim=1))


@register_network("BoxAttentionUNet2D")
class BoxAttentionUNet2D(nn.Module):
    """U-Net for (B, in_channels, H, W) slice groups; any H, W (padded to a multiple of 16 inside).

    ``forward(x, boxes=None, with_loc=False)``: ``boxes`` is (B, 2, H, W) with the binarized
    organ box (channel 0) and lesion box (channel 1) of the centre slice; required unless
    ``attention == "none"``.  Returns segmentation logits (B, out_channels, H, W), or the pair
    ``(logits, loc_logits)`` when ``with_loc`` (needs ``localization=True``).
    """

    def __init__(self, in_channels: int = 3, out_channels: int = 3, channels=(16, 32, 64, 128),
                 attention: str = "none", localization: bool = False, loc_channels: int = 8):
        super().__init__()
        channels = [int(c) for c in channels]
        if len(channels) != 4:
            raise ValueError(f"channels must list the 4 encoder scales, got {channels}")
        if attention not in ATTENTION_VARIANTS:
            raise ValueError(f"attention must be one of {ATTENTION_VARIANTS}, got {attention!r}")
        self.attention = attention
        self.localization = bool(localization)
        self.levels = len(channels)
        self.encoder = nn.ModuleList()
        prev = in_channels
        for j, ch in enumerate(channels):
            self.encoder.append(UnetBasicBlock(2, prev, ch, kernel_size=3, stride=1 if j == 0 else 2,
                                               norm_name=_NORM, act_name=_ACT))
            prev = ch
        bottom = 2 * channels[-1]
        self.bottleneck = UnetBasicBlock(2, prev, bottom, kernel_size=3, stride=2, norm_name=_NORM, act_name=_ACT)
        self.decoder = nn.ModuleList()
        prev = bottom
        for ch in reversed(channels):
            self.decoder.append(UnetUpBlock(2, prev, ch, kernel_size=3, stride=1, upsample_kernel_size=2,
                                            norm_name=_NORM, act_name=_ACT))
            prev = ch
        self.head = UnetOutBlock(2, channels[0], out_channels)
        self.attn = None
        if attention != "none":
            self.attn = nn.ModuleList(ScaleAttention(attention, ch) for ch in channels)
        self.loc = LocalizationBranch(list(reversed(channels)), out_channels, loc_channels) if self.localization else None

    @property
    def needs_boxes(self) -> bool:
        return self.attn is not None

    def forward(self, x: torch.Tensor, boxes: torch.Tensor | None = None, with_loc: bool = False):
        if with_loc and self.loc is None:
            raise ValueError("this network has no localization branch (localization=False)")
        if self.attn is not None:
            if boxes is None:
                raise ValueError(f"attention {self.attention!r} needs the (B, 2, H, W) box maps")
            if boxes.shape[0] != x.shape[0] or boxes.shape[-2:] != x.shape[-2:]:
                raise ValueError(f"box maps {tuple(boxes.shape)} do not match the input {tuple(x.shape)}")
        h, w = x.shape[-2:]
        mult = 2 ** self.levels
        ph, pw = (-h) % mult, (-w) % mult
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph))
            if self.attn is not None:
                boxes = F.pad(boxes, (0, pw, 0, ph))
        skips = []
        f = x
        for j, block in enumerate(self.encoder):
            f = block(f)
            if self.attn is not None:
                b = boxes.float()       # antialiased resizing has no bfloat16 kernel (inference_dtype)
                if b.shape[-2:] != f.shape[-2:]:
                    b = F.interpolate(b, size=f.shape[-2:], mode="bilinear", align_corners=False, antialias=True)
                f = self.attn[j](f, b.to(f.dtype))
            skips.append(f)
        f = self.bottleneck(f)
        dec = []
        for block, skip in zip(self.decoder, reversed(skips)):
            f = block(f, skip)
            dec.append(f)
        logits = self.head(f)[..., :h, :w]
        if not with_loc:
            return logits
        return logits, self.loc(dec)[..., :h, :w]


def _fold_into(conv: nn.Conv2d, norm: nn.BatchNorm2d) -> None:
    """conv -> batchnorm (eval statistics) as one convolution: scale the kernels, shift the bias."""
    scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(norm.running_mean)
    conv.weight.data = conv.weight.data * scale.view(-1, 1, 1, 1)
    conv.bias = nn.Parameter((bias - norm.running_mean) * scale + norm.bias)


@torch.no_grad()
def fold_batchnorm(net: nn.Module) -> nn.Module:
    """An inference copy of ``net`` with the batch norms of its U-Net blocks folded into their
    convolutions (same outputs in eval mode up to rounding; about a fifth less CPU time)."""
    net = copy.deepcopy(net).eval()
    for m in net.modules():
        if isinstance(m, UnetBasicBlock):
            for i in (1, 2):
                norm = getattr(m, f"norm{i}")
                if isinstance(norm, nn.BatchNorm2d) and norm.track_running_stats and norm.affine:
                    _fold_into(getattr(m, f"conv{i}").conv, norm)
                    setattr(m, f"norm{i}", nn.Identity())
    return net
