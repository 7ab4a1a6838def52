"""The two cooperating 3D networks of the SD-Net recipe: a VNet and a residual VNet ("3D-ResVNet").

* ``"monai.VNet"``: MONAI's ``monai.networks.nets.VNet`` itself (16 base channels, 5x5x5
  convolutions, ~45 M parameters: the paper-size network, for a GPU).
* ``"VNet"``: the same VNet built from MONAI's own VNet blocks (``InputTransition``,
  ``DownTransition``, ``UpTransition``, ``OutputTransition``) with the base width and depth as
  arguments.  ``VNet(base=16, depth=4)`` has exactly MONAI's layers; a small ``base`` (4-8) is
  what a CPU can train in minutes.
* ``"ResVNet"``: an encoder-decoder of MONAI ``ResidualUnit`` blocks (3x3x3, instance norm,
  PReLU, strided-convolution downsampling, transposed-convolution upsampling, concatenated
  skips).  A different kernel, normalisation and activation from the VNet on purpose: SD-Net
  relies on the two backbones disagreeing where the segmentation is uncertain.

Both map ``(B, in_channels, Z, Y, X)`` to logits ``(B, out_channels, Z, Y, X)``; every spatial
size must be divisible by ``2 ** depth``.
"""

from __future__ import annotations

import torch
from monai.networks.blocks import Convolution, ResidualUnit
from monai.networks.nets import VNet as MonaiVNet
from monai.networks.nets.vnet import DownTransition, InputTransition, OutputTransition, UpTransition
from torch import nn

from ..modelstore import register_network

register_network("monai.VNet")(MonaiVNet)

# MONAI's VNet: convolutions per level on the way down (after the input level) and up.
_DOWN_CONVS = (1, 2, 3, 2)
_UP_CONVS = (2, 2, 1, 1)


@register_network("VNet")
class VNet(nn.Module):
    """MONAI's VNet with a configurable base width (``base``) and number of levels (``depth`` 1-4).

    ``dropout`` is MONAI's dropout on the two deepest down/up transitions (0 switches it off,
    which suits the tiny batches of CPU training).
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 2, base: int = 16, depth: int = 4,
                 dropout: float = 0.0, act: str = "elu"):
        super().__init__()
        if not 1 <= depth <= 4:
            raise ValueError(f"VNet depth must be 1..4, got {depth}")
        if base % in_channels:
            raise ValueError(f"VNet base width {base} must be a multiple of in_channels {in_channels}")
        self.depth = depth
        drop = dropout if dropout > 0 else None
        act_args = (act, {"inplace": True}) if act in ("elu", "relu") else act
        self.input = InputTransition(3, in_channels, base, act_args)
        widths = [base * 2 ** n for n in range(depth + 1)]
        self.down = nn.ModuleList(
            DownTransition(3, widths[n], _DOWN_CONVS[n], act_args,
                           dropout_prob=drop if n >= 2 else None)
            for n in range(depth))
        # Up transition at level n takes the deeper features (widths[n+1] or, below the
        # bottom, the previous up output) and returns 2 * widths[n] channels (MONAI's layout).
        ups = []
        for n in reversed(range(depth)):
            in_ch = widths[depth] if n == depth - 1 else 2 * widths[n + 1]
            up_convs = _UP_CONVS[4 - depth + (depth - 1 - n)]
            ups.append(UpTransition(3, in_ch, 2 * widths[n], up_convs, act_args,
                                    dropout_prob=(drop, drop or 0.0) if n >= 2 else (None, 0.0)))
        self.up = nn.ModuleList(ups)
        self.output = OutputTransition(3, 2 * base, out_channels, act_args)

    def forward(self, x):
        skips = [self.input(x)]
        for block in self.down:
            skips.append(block(skips[-1]))
        out = skips.pop()
        for block in self.up:
            out = block(out, skips.pop())
        return self.output(out)


@register_network("ResVNet")
class ResVNet(nn.Module):
    """Residual 3D VNet ("3D-ResVNet"): MONAI ``ResidualUnit`` stages, ``depth`` downsamplings."""

    def __init__(self, in_channels: int = 1, out_channels: int = 2, base: int = 16, depth: int = 4,
                 subunits: int = 2, dropout: float = 0.0):
        super().__init__()
        if not 1 <= depth <= 5:
            raise ValueError(f"ResVNet depth must be 1..5, got {depth}")
        self.depth = depth
        norm, act = ("instance", {"affine": True}), "prelu"
        widths = [base * 2 ** n for n in range(depth + 1)]
        self.stem = ResidualUnit(3, in_channels, base, subunits=subunits, norm=norm, act=act, dropout=dropout)
        self.down = nn.ModuleList(
            ResidualUnit(3, widths[n], widths[n + 1], strides=2, subunits=subunits, norm=norm, act=act,
                         dropout=dropout)
            for n in range(depth))
        self.upsample = nn.ModuleList()
        self.decode = nn.ModuleList()
        for n in reversed(range(depth)):
            self.upsample.append(Convolution(3, widths[n + 1], widths[n], strides=2, kernel_size=3,
                                             is_transposed=True, norm=norm, act=act))
            self.decode.append(ResidualUnit(3, 2 * widths[n], widths[n], subunits=max(1, subunits - 1),
                                            norm=norm, act=act, dropout=dropout))
        self.head = nn.Conv3d(base, out_channels, kernel_size=1)

    def forward(self, x):
        skips = [self.stem(x)]
        for block in self.down:
            skips.append(block(skips[-1]))
        out = skips.pop()
        for up, dec in zip(self.upsample, self.decode):
            out = dec(torch.cat([up(out), skips.pop()], dim=1))
        return self.head(out)


def build_network(name: str, **kwargs) -> nn.Module:
    """A registered network of this module by name (``VNet``, ``ResVNet`` or ``monai.VNet``)."""
    classes = {"VNet": VNet, "ResVNet": ResVNet, "monai.VNet": MonaiVNet}
    if name not in classes:
        raise ValueError(f"unknown SD-Net network {name!r} (choose from {', '.join(classes)})")
    return classes[name](**kwargs)
