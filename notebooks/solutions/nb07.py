"""Solutions of the exercises of notebook 7 (attention maps)."""

import numpy as np
from einops import rearrange

from atlas.scales import MultiScaleLayout


def top_down_map(weights: np.ndarray, layout: MultiScaleLayout, token: tuple[int, int]) -> dict[int, np.ndarray]:
    """Where fine token ``token`` = (row, col) reads in top-down: ``{key scale: (h_m, w_m) weights}``, heads averaged.

    ``weights``: ``(windows, heads, queries, keys)``, the recorded top-down weights of scale 0 for one image, the
    windows and the queries inside a window in row-major order; a window's keys are its own ``k x k`` tokens, then
    those of the window it reads at every coarser scale, the one that contains it. Unread tokens are 0.
    """
    fine = layout.scales[0]
    (r, c), (kh, kw) = token, fine.window
    window = (r // kh) * fine.grid[1] + c // kw
    row = weights[window, :, (r % kh) * kw + c % kw].mean(0)  # (keys,): the query's softmax, heads averaged
    grids, offset = {}, 0
    for m, sc in enumerate(layout.scales):
        read = window if m == 0 else int(layout.containing_windows(0, m)[window])
        keys = rearrange(row[offset : offset + sc.tokens_per_window], "(wh ww) -> wh ww", wh=sc.window[0])
        top, left = (read // sc.grid[1]) * sc.window[0], (read % sc.grid[1]) * sc.window[1]
        padded = np.zeros((sc.grid[0] * sc.window[0], sc.grid[1] * sc.window[1]), dtype=row.dtype)
        padded[top : top + sc.window[0], left : left + sc.window[1]] = keys
        grids[m] = padded[: sc.size[0], : sc.size[1]]  # padding keys of a partial window have no place
        offset += sc.tokens_per_window
    return grids


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
