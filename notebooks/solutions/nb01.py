"""Solutions of the exercises of notebook 1 (why long images are hard)."""

import math

import torch
from einops import rearrange


def count_windows(h: int, w: int, k: int) -> int:
    """Windows of side ``k`` that cover an ``h x w`` token grid, the partial ones at the edges included."""
    return math.ceil(h / k) * math.ceil(w / k)


def merge_windows(windows: torch.Tensor, k: int, h: int) -> torch.Tensor:
    """``(B, nW, k*k, C)`` windows of an ``(h, w)`` map (both multiples of ``k``) -> the ``(B, h, w, C)`` map."""
    return rearrange(windows, "b (gh gw) (wh ww) c -> b (gh wh) (gw ww) c", gh=h // k, wh=k, ww=k)


def window_of(row: int, col: int, w: int, k: int) -> int:
    """Row-major index of the ``k x k`` window holding token ``(row, col)`` of a grid ``w`` tokens wide."""
    return (row // k) * math.ceil(w / k) + col // k
