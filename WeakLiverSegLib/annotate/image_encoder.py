"""LiteMedSAM's image encoder: a TinyViT-5M variant that keeps full resolution in its stem.

Written from the TinyViT paper (Wu et al., ECCV 2022) and the LiteMedSAM checkpoint's parameter
names and shapes, so that the converted state dict loads with ``strict=True``. LiteMedSAM differs
from TinyViT / MobileSAM in two places: the stem is two 1x1 conv+BN layers with no stride (a
256x256 slice stays 256x256 in the first stage), and the last patch merging keeps the resolution,
so a 256 input gives the 64x64x256 embedding SAM's mask decoder expects.

Stages: MBConv x2 (64 ch) -> merge /2 -> 2 TinyViT blocks (128 ch, 7x7 windows) -> merge /2 ->
6 blocks (160 ch, 14x14 windows) -> merge /1 -> 2 blocks (320 ch, 7x7) -> neck (1x1 conv, LN,
3x3 conv, LN) -> 256 channels. Any input whose side is a multiple of 4 works (windows are padded).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class ConvBN(nn.Sequential):
    """Conv (no bias) + BatchNorm; parameter names ``c`` and ``bn`` as in the checkpoint."""

    def __init__(self, cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1):
        super().__init__()
        self.add_module("c", nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False))
        self.add_module("bn", nn.BatchNorm2d(cout))


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of a (B, C, H, W) map (SAM's, eps 1e-6)."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x):
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) * torch.rsqrt(var + self.eps)
        return x * self.weight[:, None, None] + self.bias[:, None, None]


class Stem(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.seq = nn.Sequential(ConvBN(cin, cout // 2), nn.GELU(), ConvBN(cout // 2, cout))

    def forward(self, x):
        return self.seq(x)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, 3x3 depthwise, 1x1 project, residual, GELU."""

    def __init__(self, dim: int, expand: float):
        super().__init__()
        hidden = int(dim * expand)
        self.conv1 = ConvBN(dim, hidden)
        self.conv2 = ConvBN(hidden, hidden, 3, groups=hidden)
        self.conv3 = ConvBN(hidden, dim)

    def forward(self, x):
        y = F.gelu(self.conv1(x))
        y = F.gelu(self.conv2(y))
        return F.gelu(x + self.conv3(y))


class PatchMerging(nn.Module):
    """1x1 conv, strided 3x3 depthwise conv, 1x1 conv (GELU between); (B, C, H, W) in and out."""

    def __init__(self, dim: int, out_dim: int, stride: int):
        super().__init__()
        self.conv1 = ConvBN(dim, out_dim)
        self.conv2 = ConvBN(out_dim, out_dim, 3, stride=stride, groups=out_dim)
        self.conv3 = ConvBN(out_dim, out_dim)

    def forward(self, x):
        x = F.gelu(self.conv1(x))
        x = F.gelu(self.conv2(x))
        return self.conv3(x)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside a window, with a learned bias per head and per
    (|dy|, |dx|) offset between the two positions (TinyViT / LeViT attention bias)."""

    def __init__(self, dim: int, heads: int, window: int):
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        # Offsets are numbered in order of first appearance scanning position pairs row by row,
        # which is the order the checkpoint's bias columns follow.
        pos = [(r, c) for r in range(window) for c in range(window)]
        table: dict = {}
        idx = [table.setdefault((abs(a[0] - b[0]), abs(a[1] - b[1])), len(table)) for a in pos for b in pos]
        self.attention_biases = nn.Parameter(torch.zeros(heads, len(table)))
        self.register_buffer("bias_index", torch.tensor(idx).view(len(pos), len(pos)), persistent=False)
        self._bias_cache = None

    def train(self, mode: bool = True):
        self._bias_cache = None   # the gathered bias is cached for inference only
        return super().train(mode)

    def _bias(self):
        if self.training:
            return self.attention_biases[:, self.bias_index]
        if self._bias_cache is None or self._bias_cache.device != self.attention_biases.device:
            self._bias_cache = self.attention_biases[:, self.bias_index].detach()
        return self._bias_cache

    def forward(self, x):                      # x: (B', N, C) tokens of one window each
        b, n, c = x.shape
        qkv = self.qkv(self.norm(x)).view(b, n, self.heads, 3 * self.head_dim).transpose(1, 2)
        q, k, v = qkv.split(self.head_dim, dim=-1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=self._bias().to(q.dtype))
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class TokenMLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(self.norm(x))))


class TinyViTBlock(nn.Module):
    """Window attention + residual, 3x3 depthwise conv, MLP + residual; (B, H, W, C) in and out."""

    def __init__(self, dim: int, heads: int, window: int, mlp_ratio: float, local_conv: int):
        super().__init__()
        self.window = window
        self.attn = WindowAttention(dim, heads, window)
        self.local_conv = ConvBN(dim, dim, local_conv, groups=dim)
        self.mlp = TokenMLP(dim, int(dim * mlp_ratio))

    def forward(self, x):
        b, h, w, c = x.shape
        s = self.window
        ph, pw = (s - h % s) % s, (s - w % s) % s
        y = F.pad(x, (0, 0, 0, pw, 0, ph)) if (ph or pw) else x
        hh, ww = h + ph, w + pw
        y = y.view(b, hh // s, s, ww // s, s, c).transpose(2, 3).reshape(-1, s * s, c)
        y = self.attn(y)
        y = y.view(b, hh // s, ww // s, s, s, c).transpose(2, 3).reshape(b, hh, ww, c)
        x = x + y[:, :h, :w]
        x = self.local_conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return x + self.mlp(x)


class ConvStage(nn.Module):
    def __init__(self, dim: int, depth: int, expand: float, out_dim: int, stride: int):
        super().__init__()
        self.blocks = nn.ModuleList(MBConv(dim, expand) for _ in range(depth))
        self.downsample = PatchMerging(dim, out_dim, stride)

    def forward(self, x):                      # (B, C, H, W) -> (B, C', H', W')
        for blk in self.blocks:
            x = blk(x)
        return self.downsample(x)


class AttentionStage(nn.Module):
    def __init__(self, dim: int, depth: int, heads: int, window: int, mlp_ratio: float,
                 local_conv: int, out_dim: int | None, stride: int):
        super().__init__()
        self.blocks = nn.ModuleList(TinyViTBlock(dim, heads, window, mlp_ratio, local_conv) for _ in range(depth))
        self.downsample = PatchMerging(dim, out_dim, stride) if out_dim else None

    def forward(self, x):                      # (B, C, H, W) -> (B, C', H', W')
        x = x.permute(0, 2, 3, 1)
        for blk in self.blocks:
            x = blk(x)
        x = x.permute(0, 3, 1, 2)
        return self.downsample(x) if self.downsample is not None else x


class TinyViTEncoder(nn.Module):
    """(B, 3, S, S) image in [0, 1] -> (B, 256, S/4, S/4) embedding (S = 256 for LiteMedSAM)."""

    def __init__(self, in_chans: int = 3, embed_dims=(64, 128, 160, 320), depths=(2, 2, 6, 2),
                 num_heads=(2, 4, 5, 10), window_sizes=(7, 7, 14, 7), merge_strides=(2, 2, 1),
                 mlp_ratio: float = 4.0, mbconv_expand_ratio: float = 4.0, local_conv_size: int = 3,
                 out_chans: int = 256):
        super().__init__()
        self.patch_embed = Stem(in_chans, embed_dims[0])
        layers = [ConvStage(embed_dims[0], depths[0], mbconv_expand_ratio, embed_dims[1], merge_strides[0])]
        for i in range(1, len(depths)):
            last = i == len(depths) - 1
            layers.append(AttentionStage(embed_dims[i], depths[i], num_heads[i], window_sizes[i], mlp_ratio,
                                         local_conv_size, None if last else embed_dims[i + 1],
                                         1 if last else merge_strides[i]))
        self.layers = nn.ModuleList(layers)
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dims[-1], out_chans, 1, bias=False), LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, 3, padding=1, bias=False), LayerNorm2d(out_chans))

    def forward(self, x):
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x)
        return self.neck(x)
