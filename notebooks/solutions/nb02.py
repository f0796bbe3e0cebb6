"""Solutions of the exercises of notebook 2 (building the scales)."""

import math


def scale_sides(side: int, k: int = 16, s: int = 4) -> list[int]:
    """Token sides of the scales of a ``side x side`` grid: pool by ``s`` (rounding up) until ``side <= k``."""
    sides = [side]
    while sides[-1] > k:
        sides.append(math.ceil(sides[-1] / s))
    return sides


def containing_window(row: int, col: int, coarse_cols: int, levels: int, s: int = 4) -> int:
    """Row-major index of the window ``levels`` scales coarser that contains fine window ``(row, col)``.

    ``coarse_cols`` is the number of window columns of the coarse scale; each level divides the window row and
    column by ``s``.
    """
    ratio = s**levels
    return (row // ratio) * coarse_cols + col // ratio
