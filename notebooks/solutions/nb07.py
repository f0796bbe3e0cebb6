"""Solutions of the exercises of notebook 7 (attention maps)."""

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


def bottom_up_map(weights: np.ndarray, layout: MultiScaleLayout, scale: int, token: tuple[int, int]) -> np.ndarray:
    """One token's bottom-up attention (heads averaged) on the grid of the next finer scale, zero where it reads
    nothing. ``weights``: ``(windows of scale - 1, heads, queries, keys)``, the recorded bottom-up weights of
    ``scale`` (0-based, >= 1) for one image: window ``w``'s queries are the block of tokens of ``scale`` that read it,
    row-major, and its keys are its own tokens. Returns ``(h, w)`` of scale ``scale - 1``.
    """
    finer = layout.scales[scale - 1]
    block = finer.window[0] // layout.pool_stride  # tokens of `scale` per side of one finer window
    window = (token[0] // block) * finer.grid[1] + token[1] // block
    query = (token[0] % block) * block + token[1] % block
    row = weights[window, :, query].mean(axis=0).reshape(finer.window)  # (wh, ww)
    grid = np.zeros((finer.grid[0] * finer.window[0], finer.grid[1] * finer.window[1]), dtype=row.dtype)
    r, c = divmod(window, finer.grid[1])
    grid[r * finer.window[0] : (r + 1) * finer.window[0], c * finer.window[1] : (c + 1) * finer.window[1]] = row
    return grid[: finer.size[0], : finer.size[1]]  # drop the padding of partial windows, if any
