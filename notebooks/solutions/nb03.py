"""Solutions of the exercises of notebook 3 (top-down communication)."""

import torch

from atlas.scales import MultiScaleLayout, map_to_windows


def top_down_key_mask(layout: MultiScaleLayout, l: int) -> torch.Tensor:
    """``(nW_l, T_l + ... + T_L)`` bool: which keys of each window of scale ``l`` (0-based) are real tokens.

    The keys are the window's own tokens, then those of its containing window at each coarser scale; a key is
    False where it is the zero padding of a partial window at the bottom or right edge of its scale.
    """
    parts = []
    for m in range(l, layout.num_scales):
        scale = layout.scales[m]
        real = map_to_windows(torch.ones(1, *scale.size, 1), scale.window)[0, :, :, 0].bool()  # (nW_m, T_m)
        parts.append(real if m == l else real[layout.containing_windows(l, m)])  # the window read, per window
    return torch.cat(parts, dim=1)


def windows_read(layout: MultiScaleLayout, query: tuple[int, int]) -> dict[int, tuple[int, int]]:
    """For a token ``(row, col)`` of scale 0: ``{scale: (window row, window col)}`` of every window it reads."""
    s, k = layout.pool_stride, layout.window_size
    row, col = query[0] // k, query[1] // k  # its own window at scale 0
    return {m: (row // s**m, col // s**m) for m in range(layout.num_scales)}
