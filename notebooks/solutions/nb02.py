"""Solutions of the exercises of notebook 2 (building the scales)."""

import math

import torch

from atlas.scales import MultiScaleLayout, map_to_windows


def layout_scales(h: int, w: int, k: int = 16, s: int = 4) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """``(size, window)`` of every scale of an ``h x w`` token grid, finest first: pool by ``s`` (rounding up) until
    both sides fit in one ``k x k`` window; that last scale is a single window of its own size."""
    scales = []
    while h > k or w > k:
        scales.append(((h, w), (k, k)))
        h, w = math.ceil(h / s), math.ceil(w / s)
    return [*scales, ((h, w), (h, w))]


def top_down_keys(maps: list[torch.Tensor], layout: MultiScaleLayout) -> torch.Tensor:
    """The keys of every window of the finest scale in top-down attention: ``(B, nW_1, T_1 + ... + T_L, C)``.

    ``maps``: the scales of ``layout``, finest first, each ``(B, h_l, w_l, C)``. A fine window reads its own
    tokens, then, for each coarser scale, the tokens of the one window of that scale that contains it.
    """
    scales = layout.scales
    keys = [map_to_windows(maps[0], scales[0].window)]  # (B, nW_1, T_1, C)
    for coarse in range(1, len(scales)):
        windows = map_to_windows(maps[coarse], scales[coarse].window)  # (B, nW_m, T_m, C)
        keys.append(windows[:, layout.containing_windows(0, coarse)])  # the containing window, per fine window
    return torch.cat(keys, dim=2)
