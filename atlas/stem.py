"""The convolutional stem: an image ``(B, in_chans, H, W)`` -> a feature map ``(B, C, H/16, W/16)``.

It follows FasterViT's stem, as Atlas does: two strided 3x3 convolutions, then two stages of residual
convolution blocks, each followed by a LayerNorm and a strided 3x3 convolution that doubles the width.
"""

from __future__ import annotations

import torch
from timm.layers import LayerNorm2d
from torch import nn


def conv3x3(in_chans: int, out_chans: int, stride: int = 1, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(in_chans, out_chans, 3, stride, 1, bias=bias)


class ResidualConvBlock(nn.Module):
    """``x + BN(conv(GELU(BN(conv(x)))))`` at constant width."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv1 = conv3x3(dim, dim)
        self.bn1 = nn.BatchNorm2d(dim)
        self.act = nn.GELU()
        self.conv2 = conv3x3(dim, dim)
        self.bn2 = nn.BatchNorm2d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bn2(self.conv2(self.act(self.bn1(self.conv1(x)))))


class Downsample(nn.Module):
    """LayerNorm over channels, then a strided 3x3 convolution: ``(B, C, h, w)`` -> ``(B, 2C, h/2, w/2)``."""

    def __init__(self, in_chans: int, out_chans: int, stride: int):
        super().__init__()
        self.norm = LayerNorm2d(in_chans, eps=1e-5)
        self.conv = conv3x3(in_chans, out_chans, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.norm(x))


class ConvStem(nn.Module):
    """``embed`` (x4 down), residual blocks, ``down1`` (x2), residual blocks, ``down2`` (x2): 16x in all.

    ``width`` is F; the output has ``4F`` channels. ``patch_size`` 16 uses stride 2 in all four strided
    convolutions; 8 and 4 turn the first one or two into stride 1, for small images.
    """

    STRIDES = {16: (2, 2, 2, 2), 8: (1, 2, 2, 2), 4: (1, 1, 2, 2)}

    def __init__(self, in_chans: int = 3, width: int = 192, patch_size: int = 16, blocks_per_stage: int = 3):
        super().__init__()
        if patch_size not in self.STRIDES:
            raise ValueError(f"patch_size must be one of {sorted(self.STRIDES)}, got {patch_size}")
        s0, s1, s2, s3 = self.STRIDES[patch_size]
        self.embed = nn.Sequential(
            conv3x3(in_chans, 64, s0, bias=False),
            nn.BatchNorm2d(64, eps=1e-4),
            nn.ReLU(),
            conv3x3(64, width, s1, bias=False),
            nn.BatchNorm2d(width, eps=1e-4),
            nn.ReLU(),
        )
        self.stage1 = nn.Sequential(*(ResidualConvBlock(width) for _ in range(blocks_per_stage)))
        self.down1 = Downsample(width, 2 * width, s2)
        self.stage2 = nn.Sequential(*(ResidualConvBlock(2 * width) for _ in range(blocks_per_stage)))
        self.down2 = Downsample(2 * width, 4 * width, s3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_chans, H, W)`` -> ``(B, 4F, ceil(H/p), ceil(W/p))``."""
        return self.down2(self.stage2(self.down1(self.stage1(self.embed(x)))))
