"""A small 2D Dense U-Net (Guan et al. 2019, the WSTS paper's USSE and SDUNet backbone).

Encoder: a stem convolution, then at every scale a dense block (each layer sees the
concatenation of all earlier feature maps of the block, adding ``growth`` channels) and a
transition (1x1 convolution halving the channels, 2x2 average pooling).  Decoder: bilinear
upsampling, concatenation with the encoder's dense-block output of the same scale, a dense
block and a 1x1 compression.  Every convolution is MONAI's ``Convolution`` (conv, batch norm,
dropout, ReLU): the paper puts dropout (0.1) after every convolution.

Input: image channels (one slice or a few consecutive slices) plus, for the WSTS networks, the
hard box-attention map as the last channel.  Output: per-pixel logits (the recipes apply a
sigmoid: one channel per target, e.g. tumour, or liver + tumour).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from torch import nn

from ...learn.modelstore import register_network


def _conv(cin: int, cout: int, kernel: int, dropout: float) -> Convolution:
    return Convolution(2, cin, cout, kernel_size=kernel, act="relu", norm="batch",
                       dropout=dropout if dropout > 0 else None)


class DenseBlock(nn.Module):
    """``layers`` 3x3 convolutions, each fed the concatenation of the block input and all earlier outputs."""

    def __init__(self, cin: int, growth: int, layers: int, dropout: float):
        super().__init__()
        self.layers = nn.ModuleList(_conv(cin + n * growth, growth, 3, dropout) for n in range(layers))
        self.out_channels = cin + layers * growth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [x]
        for layer in self.layers:
            feats.append(layer(torch.cat(feats, dim=1)))
        return torch.cat(feats, dim=1)


@torch.no_grad()
def set_output_prior(head: nn.Conv2d, channel: int, prior: float) -> None:
    """Start output ``channel`` of a final 1x1 convolution at probability ``prior`` (bias = logit(prior)).

    A rare-class sigmoid output started near 0.5 can settle where the head weights of that channel are all
    negative: on ReLU features the probability is then capped at sigmoid(bias) for good (WSTS students whose
    tumour probability never exceeded 0.4-0.7, so nothing was called at the paper's 0.75).  Started at a low
    prior, the class has to be learned from the presence of features (the RetinaNet prior initialisation).
    """
    if not 0 < prior < 1:
        raise ValueError(f"prior must be in (0, 1), got {prior!r}")
    head.bias[channel] = float(torch.logit(torch.tensor(prior)))


@register_network("DenseUNet2D")
class DenseUNet2D(nn.Module):
    """Dense U-Net on (B, in_channels, H, W); any H, W (padded to a multiple of 2**levels inside)."""

    def __init__(self, in_channels: int = 2, out_channels: int = 1, stem: int = 16, growth: int = 8,
                 layers: int = 3, levels: int = 3, dropout: float = 0.1):
        super().__init__()
        if levels < 1 or layers < 1 or growth < 1 or stem < 1:
            raise ValueError("stem, growth, layers and levels must be positive")
        self.levels = int(levels)
        self.stem = _conv(in_channels, stem, 3, dropout)
        self.down_blocks, self.transitions = nn.ModuleList(), nn.ModuleList()
        skips, ch = [], stem
        for _ in range(levels):
            block = DenseBlock(ch, growth, layers, dropout)
            self.down_blocks.append(block)
            skips.append(block.out_channels)
            ch = block.out_channels // 2
            self.transitions.append(_conv(block.out_channels, ch, 1, dropout))
        self.bottleneck = DenseBlock(ch, growth, layers, dropout)
        ch = self.bottleneck.out_channels
        self.up_blocks, self.compress = nn.ModuleList(), nn.ModuleList()
        for skip in reversed(skips):
            block = DenseBlock(ch + skip, growth, layers, dropout)
            self.up_blocks.append(block)
            ch = max(stem, skip // 2)
            self.compress.append(_conv(block.out_channels, ch, 1, dropout))
        self.head = nn.Conv2d(ch, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        mult = 2 ** self.levels
        ph, pw = (-h) % mult, (-w) % mult
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph))
        f = self.stem(x)
        skips = []
        for block, trans in zip(self.down_blocks, self.transitions):
            f = block(f)
            skips.append(f)
            f = F.avg_pool2d(trans(f), 2)
        f = self.bottleneck(f)
        for block, comp, skip in zip(self.up_blocks, self.compress, reversed(skips)):
            f = F.interpolate(f, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            f = comp(block(torch.cat([f, skip], dim=1)))
        return self.head(f)[..., :h, :w]
