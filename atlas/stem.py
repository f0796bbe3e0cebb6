"""The convolutional stem: an image ``(B, in_chans, H, W)`` -> a feature map ``(B, C, H/16, W/16)``.

It follows FasterViT's stem, as Atlas does: two strided 3x3 convolutions, then two stages of residual
convolution blocks, each followed by a LayerNorm and a strided 3x3 convolution that doubles the width.

The stem runs in channels-last memory (NHWC): on CPUs and on GPUs with tensor cores the convolution kernels
prefer it, batch norm and GELU then need no layout conversions, and the token map ``(B, h, w, C)`` the
stages read is a free view of its output. ``fuse_batchnorm()`` folds each batch norm into the convolution
before it, for inference.
"""

from __future__ import annotations

import torch
from timm.layers import LayerNorm2d
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


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

    def fuse_batchnorm(self) -> None:
        """Fold ``bn1`` into ``conv1`` and ``bn2`` into ``conv2`` (eval mode; see :meth:`ConvStem.fuse_batchnorm`)."""
        self.conv1, self.bn1 = fuse_conv_bn_eval(self.conv1, self.bn1), nn.Identity()
        self.conv2, self.bn2 = fuse_conv_bn_eval(self.conv2, self.bn2), nn.Identity()


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
        """``(B, in_chans, H, W)`` -> ``(B, 4F, ceil(H/p), ceil(W/p))``, in channels-last memory."""
        x = x.contiguous(memory_format=torch.channels_last)
        return self.down2(self.stage2(self.down1(self.stage1(self.embed(x)))))

    @torch.no_grad()
    def fuse_batchnorm(self) -> ConvStem:
        """Fold each of the 2 + 4 * blocks_per_stage BatchNorms into the convolution before it; returns ``self``.

        For inference: the folding uses the running statistics, so the stem must be in eval mode, and the
        fused stem computes what the eval-mode stem computed (to float rounding) in fewer passes over the
        feature maps. Training it afterwards trains without batch norm.
        """
        if self.training:
            raise RuntimeError("fuse_batchnorm() folds the running statistics: call .eval() first")
        for conv in (0, 3):  # embed: conv, BN, ReLU, conv, BN, ReLU
            self.embed[conv] = fuse_conv_bn_eval(self.embed[conv], self.embed[conv + 1])
            self.embed[conv + 1] = nn.Identity()
        for block in (*self.stage1, *self.stage2):
            block.fuse_batchnorm()
        return self
