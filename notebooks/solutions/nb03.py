"""Solutions of the exercises of notebook 3 (top-down communication)."""

from atlas.scales import MultiScaleLayout


def top_down_keys(layout: MultiScaleLayout, l: int) -> int:
    """Keys one query of scale ``l`` (0-based) reads in top-down: its own window and one window per coarser scale."""
    return sum(sc.tokens_per_window for sc in layout.scales[l:])


def windows_read(layout: MultiScaleLayout, query: tuple[int, int]) -> dict[int, tuple[int, int]]:
    """For a token ``(row, col)`` of scale 0: ``{scale: (window row, window col)}`` of every window it reads."""
    s, k = layout.pool_stride, layout.window_size
    row, col = query[0] // k, query[1] // k  # its own window at scale 0
    return {m: (row // s**m, col // s**m) for m in range(layout.num_scales)}
