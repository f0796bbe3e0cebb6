"""Solutions of the exercises of notebook 1 (why long images are hard)."""

import torch
import torch.nn.functional as F
from einops import rearrange


def partition_padded(x_map: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, h, w, C)`` map of any sides -> ``(B, nW, k*k, C)`` windows, zero-padded at the bottom and right edges,
    and the ``(nW, k*k)`` bool mask that is True at real tokens."""
    h, w = x_map.shape[1:3]
    pad_h, pad_w = (-h) % k, (-w) % k
    windows = rearrange(
        F.pad(x_map, (0, 0, 0, pad_w, 0, pad_h)), "b (gh kh) (gw kw) c -> b (gh gw) (kh kw) c", kh=k, kw=k
    )
    real = F.pad(torch.ones(h, w, dtype=torch.bool), (0, pad_w, 0, pad_h))
    return windows, rearrange(real, "(gh kh) (gw kw) -> (gh gw) (kh kw)", kh=k, kw=k)


def masked_window_attention(x_map: torch.Tensor, params: dict, heads: int, k: int) -> torch.Tensor:
    """Self-attention inside ``k x k`` windows of a ``(B, h, w, C)`` map of any sides, never reading the padding.

    ``params``: ``{"q": (weight, bias), "kv": (weight, bias)}`` as ``params_of`` returns them. Returns
    ``(B, h, w, C)`` (before the output projection).
    """
    h, w = x_map.shape[1:3]
    windows, real = partition_padded(x_map, k)
    q = rearrange(F.linear(windows, *params["q"]), "b g t (h d) -> b g h t d", h=heads)
    keys, values = rearrange(F.linear(windows, *params["kv"]), "b g t (two h d) -> two b g h t d", two=2, h=heads)
    scores = (q * q.shape[-1] ** -0.5) @ keys.transpose(-2, -1)  # (B, nW, heads, Tq, Tk)
    scores = scores.masked_fill(~rearrange(real, "g t -> g 1 1 t"), float("-inf"))
    out = rearrange(scores.softmax(dim=-1) @ values, "b g h t d -> b g t (h d)")
    out_map = rearrange(out, "b (gh gw) (kh kw) c -> b (gh kh) (gw kw) c", gh=-(-h // k), kh=k, kw=k)
    return out_map[:, :h, :w]
