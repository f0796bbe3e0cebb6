"""The Multi-Scale Attention block (the paper's Algorithm 1).

One block updates every active scale, each with its own weights:

1. add each scale's within-window position embedding;
2. summarise: ``X[l+1] += maxpool(X[l])``, finest to coarsest;
3. top-down, coarsest to finest: the queries of a window read their own window and the window of every
   coarser scale that contains it, then an MLP;
4. bottom-up, finest to coarsest: each coarse token reads the fine window it summarises, then the same MLP.

Scales are carried as ``(B, h, w, C)`` maps of real size; windows are cut (and padded) only around attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.layers import DropPath, Mlp
from torch import nn

from .attention import WindowAttention
from .scales import MultiScaleLayout, Scale, map_to_windows, pool_map, window_key_mask, windows_to_map


@dataclass
class BlockGeometry:
    """What a block needs to know about the active scales ``first .. L-1`` of a layout (indices are local)."""

    scales: list[Scale]
    pool_stride: int
    top_down_windows: dict[tuple[int, int], torch.Tensor]  # (l, m) -> (nW_l,) window of scale m read by l
    top_down_masks: list[torch.Tensor | None]  # per l: (nW_l, T_l + sum_m T_m), True at real keys
    window_masks: list[torch.Tensor | None]  # per l: (nW_l, T_l), True at real tokens

    @classmethod
    def build(cls, layout: MultiScaleLayout, first: int, routing: str, top_down: bool, device=None):
        scales = list(layout.scales[first:])
        n = len(scales)
        window_masks = [window_key_mask(sc.size, sc.window, device) for sc in scales]
        windows, masks = {}, []
        for l in range(n):
            coarser = range(l + 1, n) if top_down else range(0)
            for m in coarser:
                windows[l, m] = layout.containing_windows(first + l, first + m, routing).to(device)
            parts = [(window_masks[l], scales[l])] + [
                (None if window_masks[m] is None else window_masks[m][windows[l, m]], scales[m]) for m in coarser
            ]
            if all(mask is None for mask, _ in parts):
                masks.append(None)
                continue
            full = [
                torch.ones(scales[l].num_windows, sc.tokens_per_window, dtype=torch.bool, device=device)
                if mask is None
                else mask
                for mask, sc in parts
            ]
            masks.append(torch.cat(full, dim=1))
        return cls(scales, layout.pool_stride, windows, masks, window_masks)

    @property
    def bottom_up_block(self) -> tuple[int, int]:
        """Tokens per side of scale l+1 covered by one window of scale l."""
        k = self.scales[0].window[0] // self.pool_stride
        return (k, k)


class PositionMLP(nn.Module):
    """Within-window (row, col) in [-1, 1) -> a C-vector: Linear(2, 512), ReLU, Linear(512, C, no bias)."""

    def __init__(self, dim: int, hidden: int = 512):
        super().__init__()
        self.fc1 = nn.Linear(2, hidden)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, window: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
        """The embedding of every token of a ``size`` map cut into ``window``: ``(h, w, C)``."""
        axes = [(torch.arange(n, device=self.fc1.weight.device) - n // 2) / max(n // 2, 1) for n in window]
        coords = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).to(self.fc1.weight.dtype)
        table = self.fc2(self.act(self.fc1(coords)))  # (wh, ww, C)
        reps = (-(-size[0] // window[0]), -(-size[1] // window[1]))
        return table.repeat(reps[0], reps[1], 1)[: size[0], : size[1]]


class ScaleLayer(nn.Module):
    """The weights one scale owns inside a block: position, norms, attention projections and MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path: float):
        super().__init__()
        self.pos = PositionMLP(dim)
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def residual(self, x_map: torch.Tensor, attended_map: torch.Tensor) -> torch.Tensor:
        """``x + proj(attention)``, then ``x + mlp(norm2(x))``; all ``(B, h, w, C)``."""
        x_map = x_map + self.drop_path(self.attn.proj(attended_map))
        return x_map + self.drop_path(self.mlp(self.norm2(x_map)))


class _Projections:
    """q and kv of each scale, computed on first use and forgotten when that scale's tokens change.

    This is the QKV reuse of the paper's Appendix C: a coarse scale's keys/values are computed once and read
    by every finer scale (and every window) until the coarse tokens are updated.
    """

    def __init__(self, layers: nn.ModuleList, maps: list[torch.Tensor]):
        self.layers, self.maps = layers, maps
        self._q: list[torch.Tensor | None] = [None] * len(maps)
        self._kv: list[torch.Tensor | None] = [None] * len(maps)

    def q(self, l: int) -> torch.Tensor:
        if self._q[l] is None:
            self._q[l] = self.layers[l].attn.q(self.layers[l].norm_q(self.maps[l]))
        return self._q[l]

    def kv(self, l: int) -> torch.Tensor:
        if self._kv[l] is None:
            self._kv[l] = self.layers[l].attn.kv(self.layers[l].norm_kv(self.maps[l]))
        return self._kv[l]

    def update(self, l: int, x_map: torch.Tensor) -> None:
        self.maps[l] = x_map
        self._q[l] = self._kv[l] = None


class MSABlock(nn.Module):
    """One Multi-Scale Attention block over ``num_scales`` active scales (local index 0 = finest)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_scales: int,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        top_down: bool = True,
        bottom_up: bool = True,
    ):
        super().__init__()
        self.top_down, self.bottom_up = top_down, bottom_up
        self.scales = nn.ModuleList(ScaleLayer(dim, num_heads, mlp_ratio, drop_path) for _ in range(num_scales))

    def forward(self, maps: list[torch.Tensor], geo: BlockGeometry) -> list[torch.Tensor]:
        """``maps``: one ``(B, h_l, w_l, C)`` map per active scale, finest first; returns the updated maps."""
        if len(maps) != len(self.scales):
            raise ValueError(f"this block has weights for {len(self.scales)} scales, got {len(maps)}")
        maps = [x + layer.pos(sc.window, sc.size) for x, layer, sc in zip(maps, self.scales, geo.scales, strict=True)]
        for l in range(len(maps) - 1):
            maps[l + 1] = maps[l + 1] + pool_map(maps[l], geo.pool_stride)
        projected = _Projections(self.scales, maps)
        for l in reversed(range(len(maps))):
            self._top_down(l, projected, geo)
        if self.bottom_up:
            for l in range(1, len(maps)):
                self._bottom_up(l, projected, geo)
        return projected.maps

    def _top_down(self, l: int, projected: _Projections, geo: BlockGeometry) -> None:
        """Scale ``l`` reads its own window and, with ``top_down``, the coarser windows containing it."""
        layer, scale = self.scales[l], geo.scales[l]
        coarser = range(l + 1, len(geo.scales)) if self.top_down else range(0)
        kv_windows = [map_to_windows(projected.kv(l), scale.window)]
        keys = [(scale.index, None)]
        for m in coarser:
            rows = geo.top_down_windows[l, m]
            coarse = map_to_windows(projected.kv(m), geo.scales[m].window)
            kv_windows.append(coarse.expand(-1, len(rows), -1, -1) if coarse.shape[1] == 1 else coarse[:, rows])
            keys.append((geo.scales[m].index, rows))
        attended = layer.attn(
            map_to_windows(projected.q(l), scale.window),
            torch.cat(kv_windows, dim=2) if len(kv_windows) > 1 else kv_windows[0],
            geo.top_down_masks[l],
            record=("top_down", scale.index, keys),
        )
        attended_map = windows_to_map(attended, scale.window, scale.size)
        projected.update(l, layer.residual(projected.maps[l], attended_map))

    def _bottom_up(self, l: int, projected: _Projections, geo: BlockGeometry) -> None:
        """Each token of scale ``l`` reads the window of scale ``l-1`` it summarises."""
        layer, scale, finer = self.scales[l], geo.scales[l], geo.scales[l - 1]
        block = geo.bottom_up_block
        attended = layer.attn(
            map_to_windows(projected.q(l), block),
            map_to_windows(projected.kv(l - 1), finer.window),
            geo.window_masks[l - 1],
            record=("bottom_up", scale.index, [(finer.index, None)]),
        )
        attended_map = windows_to_map(attended, block, scale.size)
        projected.update(l, layer.residual(projected.maps[l], attended_map))
