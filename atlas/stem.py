"""The convolutional stem: an image ``(B, in_chans, H, W)`` -> a feature map ``(B, C, H/16, W/16)``.

It follows FasterViT's stem, as Atlas does: two strided 3x3 convolutions, then two stages of residual
convolution blocks, each followed by a LayerNorm and a strided 3x3 convolution that doubles the width.

Its memory format is a choice (``memory_format``), because the fastest one depends on the device:

* ``"channels_last"`` (NHWC): the convolutions of GPUs with tensor cores and of CPUs with AVX-512 prefer it,
  batch norm and GELU then need no layout conversions, and the token map ``(B, h, w, C)`` the stages read is
  a free view of the stem's output;
* ``"contiguous"`` (NCHW): faster on CPUs with AVX2 only (on an AMD EPYC, channels-last made the Atlas-B/16
  stem 1.5x slower; ``docs/benchmarks.md`` has the measurements);
* ``"auto"`` (the default) picks channels-last on CUDA and on CPUs whose kernels PyTorch runs with AVX-512,
  contiguous on other CPUs (:func:`preferred_memory_format`).

The format changes only how tensors are laid out in memory, not what is computed (equal up to float
rounding). ``fuse_batchnorm()`` folds each batch norm into the convolution before it, for inference.

Every convolution of the stem is a :class:`StripConv2d`: on images so large that one image's input or output
would pass 2^31 - 1 elements (cuDNN indexes each image's tensors with 32-bit integers; PyTorch otherwise falls
back to a slow, memory-hungry convolution), it runs in horizontal strips, each read with the rows of halo its
kernel needs, and computes what the whole convolution computes.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torch.utils.checkpoint import checkpoint

MEMORY_FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}


def preferred_memory_format(device: torch.device) -> str:
    """The stem's fastest memory format on ``device`` as measured: channels-last on CUDA and on AVX-512 CPUs.

    The CPU family is the one PyTorch dispatches its kernels for (``torch.backends.cpu.get_cpu_capability()``,
    which ``ATEN_CPU_CAPABILITY=avx2`` lowers): "AVX512" -> channels-last, anything else -> contiguous.
    """
    if device.type == "cuda":
        return "channels_last"
    if device.type == "cpu":
        return "channels_last" if cpu_capability() == "AVX512" else "contiguous"
    return "contiguous"


@torch.compiler.assume_constant_result
def cpu_capability() -> str:
    """The instruction set PyTorch's CPU kernels run with, fixed for the process (a constant to torch.compile)."""
    return torch.backends.cpu.get_cpu_capability()


def check_memory_format(memory_format: str) -> str:
    if memory_format != "auto" and memory_format not in MEMORY_FORMATS:
        raise ValueError(f"memory_format must be 'auto' or one of {sorted(MEMORY_FORMATS)}, got {memory_format!r}")
    return memory_format


INT32_MAX = 2**31 - 1


class StripConv2d(nn.Conv2d):
    """``nn.Conv2d`` (zero padding, no dilation) that runs in horizontal strips on very large images.

    When one image's input ``C_in * H * W`` or output ``C_out * h * w`` would pass ``max_elements``, the output
    rows are cut into strips; each strip's convolution reads its input rows plus the halo its kernel needs,
    with zero rows where that halo falls outside the image, and the strips are concatenated. Each output
    element is the same sum of the same products as without strips; the gradients flow through the slices.
    """

    max_elements: int = INT32_MAX  # per image, of the input or the output; a class attribute tests lower

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self.strip_rows(x.shape)
        if rows is None:
            return super().forward(x)
        (kernel, _), (stride, _), (pad, pad_w) = self.kernel_size, self.stride, self.padding
        height, out_height = x.shape[2], self.output_size(x.shape)[0]
        memory_format = torch.channels_last if _is_channels_last(x) else torch.contiguous_format
        strips = []
        for first in range(0, out_height, rows):
            last = min(first + rows, out_height)  # output rows [first, last)
            top, bottom = first * stride - pad, (last - 1) * stride - pad + kernel  # input rows [top, bottom)
            strip = x[:, :, max(top, 0) : min(bottom, height)]
            strip = F.pad(strip, (0, 0, max(-top, 0), max(bottom - height, 0)))
            strip = strip.contiguous(memory_format=memory_format)
            strips.append(F.conv2d(strip, self.weight, self.bias, self.stride, (0, pad_w), 1, self.groups))
        return torch.cat(strips, dim=2)

    def output_size(self, shape: torch.Size) -> tuple[int, int]:
        """``(h, w)`` of the output for an input of ``shape`` ``(B, C, H, W)``."""
        return tuple(
            (n + 2 * p - k) // s + 1
            for n, k, s, p in zip(shape[2:], self.kernel_size, self.stride, self.padding, strict=True)
        )

    def strip_rows(self, shape: torch.Size) -> int | None:
        """Output rows per strip, or None when the whole convolution stays within ``max_elements``."""
        (h, w), (kernel, _), (stride, _) = self.output_size(shape), self.kernel_size, self.stride
        in_row, out_row = shape[1] * shape[3], self.out_channels * w  # elements of one row, per image
        if in_row * shape[2] <= self.max_elements and out_row * h <= self.max_elements:
            return None
        if self.padding_mode != "zeros" or self.dilation != (1, 1):
            raise ValueError("StripConv2d cuts strips for zero padding and no dilation only")
        rows = min(self.max_elements // out_row, (self.max_elements // in_row - kernel) // stride + 1)
        if rows < 1:
            raise ValueError(f"one output row of {tuple(shape)} needs more than {self.max_elements} elements")
        return rows


def _is_channels_last(x: torch.Tensor) -> bool:
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def conv3x3(in_chans: int, out_chans: int, stride: int = 1, bias: bool = True) -> StripConv2d:
    return StripConv2d(in_chans, out_chans, 3, stride, 1, bias=bias)


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
        self.norm = LayerNorm2d(in_chans)  # eps 1e-6, as the released stem
        self.conv = conv3x3(in_chans, out_chans, stride, bias=False)

    def forward(self, x: torch.Tensor, memory_format: torch.memory_format = torch.channels_last) -> torch.Tensor:
        # The norm works on (B, h, w, C) and hands back a channels-last view; keep the stem's format.
        return self.conv(self.norm(x).contiguous(memory_format=memory_format))


def checkpoint_unit(unit, x: torch.Tensor) -> torch.Tensor:
    """``unit(x)``, keeping only ``x`` for the backward pass, which runs ``unit`` again.

    The recomputation normalises with the same batch statistics but leaves the batch norms' running
    statistics as the first pass left them, so that they move once per step, as without checkpointing.
    """
    module = unit.func if isinstance(unit, partial) else unit
    if torch.compiler.is_compiling():  # the compiled graph applies the buffer updates of the first pass only
        return checkpoint(unit, x, use_reentrant=False)
    contexts = lambda: (nullcontext(), frozen_running_stats(module))  # noqa: E731  (first pass, recomputation)
    return checkpoint(unit, x, use_reentrant=False, context_fn=contexts)


@contextmanager
def frozen_running_stats(module: nn.Module):
    """The batch norms inside ``module`` normalise as usual; their running statistics are put back afterwards."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [[b.clone() for b in m.buffers()] for m in norms]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, buffers in zip(norms, saved, strict=True):
                for b, kept in zip(m.buffers(), buffers, strict=True):
                    b.copy_(kept)


class ConvStem(nn.Module):
    """``embed`` (x4 down), residual blocks, ``down1`` (x2), residual blocks, ``down2`` (x2): 16x in all.

    ``width`` is F; the output has ``4F`` channels. ``patch_size`` 16 uses stride 2 in all four strided
    convolutions; 8 and 4 turn the first one or two into stride 1, for small images.
    """

    STRIDES = {16: (2, 2, 2, 2), 8: (1, 2, 2, 2), 4: (1, 1, 2, 2)}

    def __init__(
        self,
        in_chans: int = 3,
        width: int = 192,
        patch_size: int = 16,
        blocks_per_stage: int = 3,
        memory_format: str = "auto",
    ):
        super().__init__()
        self.memory_format = check_memory_format(memory_format)
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
        self.grad_checkpointing = False

    def resolved_memory_format(self, device: torch.device) -> str:
        """``memory_format``, with "auto" replaced by the preferred format of ``device``."""
        return preferred_memory_format(device) if self.memory_format == "auto" else self.memory_format

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_chans, H, W)`` -> ``(B, 4F, ceil(H/p), ceil(W/p))``, in :meth:`resolved_memory_format`."""
        memory_format = MEMORY_FORMATS[self.resolved_memory_format(x.device)]
        x = x.contiguous(memory_format=memory_format)
        down1, down2 = (partial(down, memory_format=memory_format) for down in (self.down1, self.down2))
        if not (self.grad_checkpointing and torch.is_grad_enabled()):
            return down2(self.stage2(down1(self.stage1(self.embed(x)))))
        with_format = {self.down1: down1, self.down2: down2}
        for unit in self.units():  # each residual block on its own
            x = checkpoint_unit(with_format.get(unit, unit), x)
        return x

    def units(self) -> list[nn.Module]:
        """The stem's modules in the order they run: embed, stage 1's blocks, down1, stage 2's blocks, down2."""
        return [self.embed, *self.stage1, self.down1, *self.stage2, self.down2]

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
