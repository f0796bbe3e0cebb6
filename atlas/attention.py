"""Multi-head attention over windows: queries of one window read keys/values gathered for that window."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


@dataclass
class AttentionRecord:
    """Attention weights of one call, kept only while recording (see :func:`atlas.viz.record_attention`).

    ``weights``: ``(B, nW, heads, Tq, Tk)``; ``keys``: for each group of keys, in order, the scale they come
    from and, per query window, the window of that scale they were taken from (``(nW,)`` long tensor).
    """

    kind: str  # "top_down" or "bottom_up"
    query_scale: int
    weights: torch.Tensor
    keys: list[tuple[int, torch.Tensor | None]]


class WindowAttention(nn.Module):
    """Projections of one scale: ``q`` (C->C), ``kv`` (C->2C), ``proj`` (C->C), with multi-head SDPA."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.records: list[AttentionRecord] | None = None  # a list only while recording

    def forward(
        self,
        q_windows: torch.Tensor,
        kv_windows: torch.Tensor,
        key_mask: torch.Tensor | None = None,
        record: tuple | None = None,
    ) -> torch.Tensor:
        """Attend ``(B, nW, Tq, C)`` queries to ``(B, nW, Tk, 2C)`` keys/values; returns ``(B, nW, Tq, C)``.

        ``key_mask``: ``(nW, Tk)`` bool, True where a key may be read (padding is False). The output is
        before ``proj``. ``record`` is ``(kind, query_scale, keys)``, used only while recording.
        """
        batch = q_windows.shape[0]
        # Windows join the batch: 4-D inputs let SDPA pick its fused kernels (5-D ones fall back to the math path).
        q = rearrange(q_windows, "b n t (h d) -> (b n) h t d", h=self.num_heads)
        k, v = rearrange(kv_windows, "b n t (two h d) -> two (b n) h t d", two=2, h=self.num_heads)
        mask = None
        if key_mask is not None:
            mask = rearrange(key_mask.expand(batch, -1, -1), "b n k -> (b n) 1 1 k")
        if self.records is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            weights = scores.softmax(dim=-1)
            out = weights @ v
            kind, query_scale, keys = record
            weights = rearrange(weights, "(b n) h q k -> b n h q k", b=batch)
            self.records.append(AttentionRecord(kind, query_scale, weights.detach(), keys))
        return rearrange(out, "(b n) h t d -> b n t (h d)", b=batch)

    def flex(self, q_windows: torch.Tensor, kv_tokens: torch.Tensor, block_mask) -> torch.Tensor:
        """FlexAttention: ``(B, nW, Tq, C)`` queries read ``(B, S, 2C)`` keys/values as ``block_mask`` allows.

        The keys are not cut per window: ``block_mask`` (from ``atlas.msa.top_down_block_mask``) decides which
        of the ``S`` keys each query reads, and the kernel skips the blocks nobody reads. Returns
        ``(B, nW, Tq, C)``, before ``proj``. FlexAttention trains on CUDA (compile the model for its fused
        kernel); on CPU it runs forward only.
        """
        from torch.nn.attention.flex_attention import flex_attention

        windows = q_windows.shape[1]
        q = rearrange(q_windows, "b n t (h d) -> b h (n t) d", h=self.num_heads)
        k, v = rearrange(kv_tokens, "b s (two h d) -> two b h s d", two=2, h=self.num_heads)
        out = flex_attention(q, k, v, block_mask=block_mask)
        return rearrange(out, "b h (n t) d -> b n t (h d)", n=windows)
