"""The multi-scale layout of an input, and the tensor layouts that move tokens between maps and windows.

Three layouts appear everywhere in this package:

* ``map``:      ``(B, h, w, C)``  one scale as a channels-last grid of tokens, real size (no padding);
* ``windows``:  ``(B, nW, T, C)`` the same tokens cut into ``nW`` windows of ``T`` tokens each (row-major
  windows, row-major tokens inside a window), padded with zeros where the grid is not a multiple of the window;
* ``tokens``:   ``(B, N, C)``     flat tokens, used only at the readout.

The layout of an input size (how many scales, their sides, how each is cut into windows, and which coarse
window contains each fine window) is pure arithmetic and lives in :class:`MultiScaleLayout`, so it can be
inspected for a 4096px image without allocating anything.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from einops import rearrange

ROUTINGS = ("containing", "released")


@dataclass(frozen=True)
class Scale:
    """One scale of the pyramid: its real token grid and how it is cut into windows."""

    index: int  # 0-based; scale 0 is the finest (the stem output)
    size: tuple[int, int]  # real tokens (h, w)
    window: tuple[int, int]  # tokens per window side (wh, ww)

    @property
    def grid(self) -> tuple[int, int]:
        """Windows per side (rows, cols), counting partially padded windows."""
        return (math.ceil(self.size[0] / self.window[0]), math.ceil(self.size[1] / self.window[1]))

    @property
    def num_windows(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def tokens_per_window(self) -> int:
        return self.window[0] * self.window[1]

    @property
    def num_tokens(self) -> int:
        return self.size[0] * self.size[1]

    @property
    def padded(self) -> bool:
        return self.grid[0] * self.window[0] != self.size[0] or self.grid[1] * self.window[1] != self.size[1]


@dataclass(frozen=True)
class MultiScaleLayout:
    """Scales of a token grid ``(h, w)``: max-pool by ``pool_stride`` until both sides fit in one window.

    Every scale but the last is cut into ``window_size x window_size`` windows; the last scale (the first
    whose sides are both ``<= window_size``) is a single window holding all its tokens. With
    ``multiscale=False`` there is only scale 0, cut into windows (plain window attention).
    """

    token_size: tuple[int, int]
    window_size: int = 16
    pool_stride: int = 4
    multiscale: bool = True
    scales: tuple[Scale, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        h, w = self.token_size
        if h < 1 or w < 1:
            raise ValueError(f"token grid must be at least 1x1, got {h}x{w}")
        if self.window_size < 1 or self.pool_stride < 2:
            raise ValueError(
                f"window_size must be >= 1 and pool_stride >= 2, got {self.window_size} and {self.pool_stride}"
            )
        # Computed here rather than in a cached_property, whose lock torch.compile cannot trace (Python 3.11).
        object.__setattr__(self, "scales", self._build_scales())

    def _build_scales(self) -> tuple[Scale, ...]:
        k, s = self.window_size, self.pool_stride
        scales, (h, w) = [], self.token_size
        while True:
            last = h <= k and w <= k
            scales.append(Scale(len(scales), (h, w), (h, w) if last else (k, k)))
            if last or not self.multiscale:
                return tuple(scales)
            h, w = math.ceil(h / s), math.ceil(w / s)

    @property
    def num_scales(self) -> int:
        return len(self.scales)

    def containing_windows(self, fine: int, coarse: int, routing: str = "containing", device=None) -> torch.Tensor:
        """For each window of scale ``fine``, the index of the window of scale ``coarse`` it reads in top-down.

        ``routing="containing"`` gives the window whose region covers it (the paper). ``"released"`` gives the
        pairing of the released implementation, ``i // (nW_fine / nW_coarse)`` in row-major window order,
        which is the containing window only when the coarse scale has a single window.
        Returns a ``(nW_fine,)`` long tensor, built on ``device`` (no host-to-device copy).
        """
        f, c = self.scales[fine], self.scales[coarse]
        if routing == "containing":
            ratio = self.pool_stride ** (coarse - fine)
            rows = torch.arange(f.grid[0], device=device) // ratio
            cols = torch.arange(f.grid[1], device=device) // ratio
            return (rows[:, None] * c.grid[1] + cols[None, :]).flatten()
        if routing == "released":
            if f.num_windows % c.num_windows:
                raise ValueError(
                    f"routing='released' needs the window count of scale {fine} ({f.num_windows}) to be a "
                    f"multiple of that of scale {coarse} ({c.num_windows}); use routing='containing'"
                )
            return torch.arange(f.num_windows, device=device) // (f.num_windows // c.num_windows)
        raise ValueError(f"routing must be one of {ROUTINGS}, got {routing!r}")

    def describe(self) -> str:
        """A short table of the scales, for printing."""
        lines = [f"{'scale':>5} {'tokens':>11} {'windows':>9} {'tokens/window':>14}"]
        for sc in self.scales:
            lines.append(
                f"{sc.index + 1:>5} {sc.size[0]:>5}x{sc.size[1]:<5} {sc.grid[0]:>4}x{sc.grid[1]:<4}"
                f" {sc.window[0]:>7}x{sc.window[1]:<6}"
            )
        return "\n".join(lines)


def map_to_windows(x_map: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
    """``(B, h, w, C)`` map -> ``(B, nW, wh*ww, C)`` windows, zero-padding the bottom/right edges."""
    h, w = x_map.shape[1:3]
    pad_h, pad_w = (-h) % window[0], (-w) % window[1]
    if pad_h or pad_w:
        x_map = F.pad(x_map, (0, 0, 0, pad_w, 0, pad_h))
    return rearrange(x_map, "b (gh wh) (gw ww) c -> b (gh gw) (wh ww) c", wh=window[0], ww=window[1])


def windows_to_map(windows: torch.Tensor, window: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """``(B, nW, wh*ww, C)`` windows -> ``(B, h, w, C)`` map of real ``size``, dropping the padding."""
    gh, gw = math.ceil(size[0] / window[0]), math.ceil(size[1] / window[1])
    x_map = rearrange(windows, "b (gh gw) (wh ww) c -> b (gh wh) (gw ww) c", gh=gh, gw=gw, wh=window[0])
    return x_map[:, : size[0], : size[1]]


def window_key_mask(size: tuple[int, int], window: tuple[int, int], device=None) -> torch.Tensor | None:
    """``(nW, wh*ww)`` bool, True at real tokens, for a grid of ``size`` cut into ``window``; None if unpadded."""
    if size[0] % window[0] == 0 and size[1] % window[1] == 0:
        return None
    real = torch.ones(1, *size, 1, dtype=torch.bool, device=device)
    return map_to_windows(real, window)[0, ..., 0]


def pool_map(x_map: torch.Tensor, stride: int) -> torch.Tensor:
    """Max-pool a ``(B, h, w, C)`` map by ``stride``; partial regions at the edges pool their real tokens only."""
    pooled = F.max_pool2d(x_map.permute(0, 3, 1, 2), stride, stride, ceil_mode=True)
    return pooled.permute(0, 2, 3, 1)


def map_to_tokens(x_map: torch.Tensor) -> torch.Tensor:
    """``(B, h, w, C)`` map -> ``(B, h*w, C)`` tokens."""
    return rearrange(x_map, "b h w c -> b (h w) c")


def image_to_map(x_bchw: torch.Tensor) -> torch.Tensor:
    """``(B, C, h, w)`` feature map -> ``(B, h, w, C)`` token map."""
    return x_bchw.permute(0, 2, 3, 1)


def map_to_image(x_map: torch.Tensor) -> torch.Tensor:
    """``(B, h, w, C)`` token map -> ``(B, C, h, w)`` feature map (a view)."""
    return x_map.permute(0, 3, 1, 2)


def build_pyramid(x_map: torch.Tensor, layout: MultiScaleLayout) -> list[torch.Tensor]:
    """Scale 0 is the input ``(B, h, w, C)`` map; each next scale max-pools the previous one."""
    maps = [x_map]
    for _ in layout.scales[1:]:
        maps.append(pool_map(maps[-1], layout.pool_stride))
    return maps
