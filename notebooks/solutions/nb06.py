"""Solutions of the exercises of notebook 6 (attention maps)."""

import numpy as np
from einops import rearrange

from atlas.scales import MultiScaleLayout


def top_down_share(weights: np.ndarray, layout: MultiScaleLayout) -> np.ndarray:
    """Per token of scale 0, the share of its top-down attention (heads averaged) that leaves its own window.

    ``weights``: ``(windows, heads, queries, keys)``, the recorded top-down weights of scale 0 for one image; the
    keys of a window are its own ``k x k`` tokens first, then those of the coarser scales. Returns ``(h, w)``.
    """
    fine = layout.scales[0]
    outside = weights[..., fine.tokens_per_window :].sum(-1).mean(1)  # (windows, queries)
    grid = rearrange(outside, "(gh gw) (wh ww) -> (gh wh) (gw ww)", gw=fine.grid[1], ww=fine.window[1])
    return grid[: fine.size[0], : fine.size[1]]  # drop the padding of partial windows, if any


def summarising_token(token: tuple[int, int], pool_stride: int) -> tuple[int, int]:
    """The ``(row, col)`` of the token of the next coarser scale whose max-pool region holds ``token``."""
    return token[0] // pool_stride, token[1] // pool_stride
