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
from einops import rearrange, repeat
from timm.layers import DropPath, Mlp
from torch import nn

from .attention import WindowAttention
from .scales import MultiScaleLayout, Scale, map_to_windows, pool_map, window_key_mask, windows_to_map

ATTENTION_KERNELS = ("sdpa", "flex")


@dataclass
class BlockGeometry:
    """What a block needs to know about the active scales ``first .. L-1`` of a layout (indices are local).

    Every tensor is built on the model's device, once per input size (``Atlas`` caches it): a forward
    pass then moves nothing between host and device.
    """

    scales: list[Scale]
    pool_stride: int
    top_down_windows: dict[tuple[int, int], torch.Tensor]  # (l, m) -> (nW_l,) window of scale m read by l
    top_down_masks: list[torch.Tensor | None]  # per l: (nW_l, T_l + sum_m T_m), True at real keys
    window_masks: list[torch.Tensor | None]  # per l: (nW_l, T_l), True at real tokens
    flex_masks: list | None = None  # per l: FlexAttention BlockMask of its top-down call (attention="flex")

    @classmethod
    def build(
        cls,
        layout: MultiScaleLayout,
        first: int,
        routing: str,
        top_down: bool,
        device=None,
        attention: str = "sdpa",
    ) -> BlockGeometry:
        if attention not in ATTENTION_KERNELS:
            raise ValueError(f"attention must be one of {ATTENTION_KERNELS}, got {attention!r}")
        scales = list(layout.scales[first:])
        n = len(scales)
        window_masks = [window_key_mask(sc.size, sc.window, device) for sc in scales]
        windows, masks = {}, []
        for l in range(n):
            coarser = range(l + 1, n) if top_down else range(0)
            for m in coarser:
                windows[l, m] = layout.containing_windows(first + l, first + m, routing, device)
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
        geo = cls(scales, layout.pool_stride, windows, masks, window_masks)
        if attention == "flex" and top_down:
            geo.flex_masks = [top_down_block_mask(geo, l, device) if l < n - 1 else None for l in range(n)]
        return geo

    def top_down_key_mask(self, l: int, device=None) -> torch.Tensor:
        """``top_down_masks[l]`` made explicit: ``(nW_l, T_l + sum_m T_m)`` bool, all True where nothing is padded."""
        if self.top_down_masks[l] is not None:
            return self.top_down_masks[l]
        routed = [m for m in range(l + 1, len(self.scales)) if (l, m) in self.top_down_windows]
        keys = self.scales[l].tokens_per_window + sum(self.scales[m].tokens_per_window for m in routed)
        return torch.ones(self.scales[l].num_windows, keys, dtype=torch.bool, device=device)

    @property
    def bottom_up_block(self) -> tuple[int, int]:
        """Tokens per side of scale l+1 covered by one window of scale l."""
        k = self.scales[0].window[0] // self.pool_stride
        return (k, k)


def top_down_block_mask(geo: BlockGeometry, l: int, device=None):
    """FlexAttention mask of scale ``l``'s top-down call, with keys laid out as whole scales, not per window.

    Queries are scale ``l``'s windows, flattened: ``nW_l * T_l``. Keys are every window of scale ``l`` and
    of each coarser scale ``m``, each scale once: ``nW_l * T_l + sum_m nW_m * T_m``. Query window ``w`` may
    read key window ``w`` of its own scale and window ``top_down_windows[l, m][w]`` of scale ``m``, real
    tokens only.
    """
    from torch.nn.attention.flex_attention import create_block_mask

    own = geo.scales[l]
    t_own, n_own = own.tokens_per_window, own.num_windows * own.tokens_per_window
    segments, start = [], n_own  # (first key, keys, tokens per window, (nW_l,) window read by each query window)
    for m in range(l + 1, len(geo.scales)):
        sc = geo.scales[m]
        segments.append(
            (start, sc.num_windows * sc.tokens_per_window, sc.tokens_per_window, geo.top_down_windows[l, m])
        )
        start += segments[-1][1]
    key_real = torch.cat(
        [
            torch.ones(sc.num_windows * sc.tokens_per_window, dtype=torch.bool, device=device)
            if mask is None
            else mask.flatten()
            for mask, sc in zip(geo.window_masks[l:], geo.scales[l:], strict=True)
        ]
    )

    def mask_mod(b, h, q_idx, kv_idx):
        q_window = q_idx // t_own
        allowed = (kv_idx < n_own) & (kv_idx // t_own == q_window)
        for first, length, tokens, read in segments:
            inside = (kv_idx >= first) & (kv_idx < first + length)
            allowed = allowed | (inside & ((kv_idx - first) // tokens == read[q_window]))
        return allowed & key_real[kv_idx]

    return create_block_mask(mask_mod, None, None, n_own, start, device=key_real.device)


def window_coordinates(window: tuple[int, int], device=None) -> torch.Tensor:
    """``(wh, ww, 2)`` (row, col) of each position in a window, in [-1, 1): ``(i - n//2) / (n//2)``."""
    axes = [(torch.arange(n, device=device) - n // 2) / max(n // 2, 1) for n in window]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)


def add_window_table(x_map: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``(B, h, w, C)`` map + a ``(wh, ww, C)`` table repeated over its windows (cut from the top-left)."""
    (h, w), (wh, ww) = x_map.shape[1:3], table.shape[:2]
    if h % wh == 0 and w % ww == 0:  # one broadcast add, no tiled copy of the table
        windows = rearrange(x_map, "b (gh wh) (gw ww) c -> b gh wh gw ww c", wh=wh, ww=ww)
        return rearrange(windows + table[:, None], "b gh wh gw ww c -> b (gh wh) (gw ww) c")
    tiled = repeat(table, "wh ww c -> (gh wh) (gw ww) c", gh=-(-h // wh), gw=-(-w // ww))
    return x_map + tiled[:h, :w]


class PositionMLP(nn.Module):
    """Within-window (row, col) in [-1, 1) -> a C-vector: Linear(2, 512), ReLU, Linear(512, C, no bias).

    The table depends on the window shape and the weights only. When no gradient is needed (evaluation)
    it is computed once per window shape and kept until the weights change (in place, as an optimizer step
    or ``load_state_dict`` does, or by moving the module to another device or dtype).
    """

    def __init__(self, dim: int, hidden: int = 512):
        super().__init__()
        self.fc1 = nn.Linear(2, hidden)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(hidden, dim, bias=False)
        self._tables: dict[tuple, torch.Tensor] = {}
        self._coords: dict[tuple, torch.Tensor] = {}

    def table(self, window: tuple[int, int]) -> torch.Tensor:
        """The ``(wh, ww, C)`` embedding of each position in a window."""
        weight = self.fc1.weight
        needs_grad = torch.is_grad_enabled() and weight.requires_grad
        if needs_grad or torch.compiler.is_compiling() or weight.device.type not in ("cpu", "cuda"):
            return self._compute(window)
        weights = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in self.parameters())
        key = (window, weights, _autocast_dtype(weight.device))
        if key not in self._tables:
            self._tables = {k: v for k, v in self._tables.items() if k[1] == weights}  # drop stale weights
            self._tables[key] = self._compute(window)
        return self._tables[key]

    def _compute(self, window: tuple[int, int]) -> torch.Tensor:
        weight = self.fc1.weight
        key = (window, weight.device, weight.dtype)
        if torch.compiler.is_compiling():
            coords = window_coordinates(window, weight.device).to(weight.dtype)
        else:  # constants: made once per window shape
            if key not in self._coords:
                self._coords[key] = window_coordinates(window, weight.device).to(weight.dtype)
            coords = self._coords[key]
        return self.fc2(self.act(self.fc1(coords)))

    def forward(self, x_map: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
        """``(B, h, w, C)`` map -> the same map plus the embedding of each token's position in its window."""
        return add_window_table(x_map, self.table(window))


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast gives a linear layer on ``device`` now; None when autocast is off."""
    if not torch.is_autocast_enabled(device.type):
        return None
    return torch.get_autocast_dtype(device.type)


class ScaleLayer(nn.Module):
    """The weights one scale owns inside a block: position, norms, attention projections and MLP.

    ``position_only`` keeps the position MLP alone, for a scale whose update nothing reads (see ``MSABlock``).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path: float, position_only: bool = False):
        super().__init__()
        self.pos = PositionMLP(dim)
        if position_only:
            return
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
    """One Multi-Scale Attention block over ``num_scales`` active scales (local index 0 = finest).

    ``update_finest=False`` leaves the finest scale as it is after its position embedding: for the last block
    of a stage whose finest scale is dropped next, without bottom-up, nothing reads that update, so its weights
    are neither built nor run (distributed training would otherwise wait for their gradients).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_scales: int,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        top_down: bool = True,
        bottom_up: bool = True,
        update_finest: bool = True,
    ):
        super().__init__()
        self.top_down, self.bottom_up, self.update_finest = top_down, bottom_up, update_finest
        self.scales = nn.ModuleList(
            ScaleLayer(dim, num_heads, mlp_ratio, drop_path, position_only=l == 0 and not update_finest)
            for l in range(num_scales)
        )

    def forward(self, maps: list[torch.Tensor], geo: BlockGeometry) -> list[torch.Tensor]:
        """``maps``: one ``(B, h_l, w_l, C)`` map per active scale, finest first; returns the updated maps."""
        if len(maps) != len(self.scales):
            raise ValueError(f"this block has weights for {len(self.scales)} scales, got {len(maps)}")
        maps = [layer.pos(x, sc.window) for x, layer, sc in zip(maps, self.scales, geo.scales, strict=True)]
        for l in range(len(maps) - 1):
            maps[l + 1] = maps[l + 1] + pool_map(maps[l], geo.pool_stride)
        projected = _Projections(self.scales, maps)
        for l in reversed(range(0 if self.update_finest else 1, len(maps))):
            self._top_down(l, projected, geo)
        if self.bottom_up:
            for l in range(1, len(maps)):
                self._bottom_up(l, projected, geo)
        return projected.maps

    def _top_down(self, l: int, projected: _Projections, geo: BlockGeometry) -> None:
        """Scale ``l`` reads its own window and, with ``top_down``, the coarser windows containing it."""
        layer, scale = self.scales[l], geo.scales[l]
        coarser = range(l + 1, len(geo.scales)) if self.top_down else range(0)
        q_windows = map_to_windows(projected.q(l), scale.window)
        kv_windows = [map_to_windows(projected.kv(m), geo.scales[m].window) for m in (l, *coarser)]
        if geo.flex_masks is not None and coarser and layer.attn.records is None:
            # Every scale's keys once, in window order; the block mask says which windows each query reads.
            kv_tokens = torch.cat([rearrange(kv, "b n t c -> b (n t) c") for kv in kv_windows], dim=1)
            attended = layer.attn.flex(q_windows, kv_tokens, geo.flex_masks[l])
        else:
            # Each fine window gets its own copy of the coarse windows it reads, after its own keys.
            keys = [(scale.index, None)]
            for m in coarser:
                rows, coarse = geo.top_down_windows[l, m], kv_windows[m - l]
                kv_windows[m - l] = coarse.expand(-1, len(rows), -1, -1) if coarse.shape[1] == 1 else coarse[:, rows]
                keys.append((geo.scales[m].index, rows))
            attended = layer.attn(
                q_windows,
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
