"""Solutions of the exercises of notebook 4 (bottom-up and the MSA block)."""

from atlas.scales import MultiScaleLayout


def summarised_window(layout: MultiScaleLayout, l: int, token: tuple[int, int]) -> int:
    """Row-major index of the window of scale ``l - 1`` (0-based) that a token of scale ``l`` reads in bottom-up.

    The token summarises the ``s x s`` tokens of scale ``l - 1`` from ``(row * s, col * s)``; one window of scale
    ``l - 1`` holds the summaries of ``k/s x k/s`` tokens of scale ``l``.
    """
    fine = layout.scales[l - 1]
    row, col = token[0] * layout.pool_stride // fine.window[0], token[1] * layout.pool_stride // fine.window[1]
    return row * fine.grid[1] + col


def keys_per_block(layout: MultiScaleLayout, l: int) -> int:
    """Keys one token of scale ``l`` (0-based) reads in one block: top-down, plus bottom-up for ``l > 0``."""
    top_down = sum(sc.tokens_per_window for sc in layout.scales[l:])
    return top_down + (layout.scales[l - 1].tokens_per_window if l > 0 else 0)
