"""LongViT's dilated attention (LongNet, Ding et al. 2023, arXiv:2307.02486), and LongViT-B on timm's ViT.

LongViT (Wang et al. 2023, arXiv:2312.03558) is a ViT whose global attention is LongNet's dilated attention:
for each pair (segment length ``w``, dilation ratio ``r``) the sequence is cut into segments of ``w`` tokens,
every ``r``-th token of a segment is kept, and the kept tokens attend to each other. Head ``h`` keeps the
tokens at offset ``h mod r`` of each segment, so that together the heads cover every position. The pairs'
outputs are mixed with weights proportional to their softmax denominators (LongNet's Eq. 10), which equals
one softmax over all the keys a query reads in any pair, a key read in two pairs counting twice.

LongViT-B here is timm's ViT-B/16 with that attention, no class token, mean pooling and a LayerNorm before the
head, as LongViT's classifier. LongViT pairs the ratios (1, 2, 4, 8, 16) with segments that grow to the
whole sequence (64 ... 1024 for its 1,024 tokens at 1024px with 32x32 patches, 1024 ... 16384 for 16,384
tokens); here the segments follow that rule for any length ``N``: ``w = N r / 16``, so every pair attends
``N / 16`` tokens. Written from the papers; it differs from the authors' code (torchscale's
``DilatedAttention``, which asserts flash attention) in that:

* the score matrices of each pair are computed in full (readable and exact on any device, but more memory
  than a fused kernel);
* the mixing weights carry gradients (torchscale computes them under ``no_grad``);
* heads take offset ``h mod r``, as in the paper (torchscale gives consecutive groups of heads one offset);
* the sequence length must be a multiple of every segment length (torchscale pads with zero tokens, which
  then take part in the softmax);
* no sub-LayerNorms inside attention and MLP (torchscale's encoder adds them) and no sequence parallelism.
"""

from __future__ import annotations

import torch
from einops import rearrange
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .common import pretrained_cfg

DILATION_RATIOS = (1, 2, 4, 8, 16)  # LongViT's


def longvit_segment_lengths(seq_len: int, ratios: tuple[int, ...] = DILATION_RATIOS) -> tuple[int, ...]:
    """LongViT's segment lengths for ``seq_len`` tokens: ``seq_len * r / max(ratios)``, the last the whole sequence."""
    return tuple(seq_len * r // max(ratios) for r in ratios)


def _check_pairs(seq_len: int, segment_lengths: tuple[int, ...], ratios: tuple[int, ...]) -> None:
    for w, r in zip(segment_lengths, ratios, strict=True):
        if w < 1 or seq_len % w or w % r:
            raise ValueError(
                f"dilated attention over {seq_len} tokens needs segment lengths that divide it and are multiples "
                f"of their dilation ratios; got segment {w} with ratio {r} (LongViT's rule needs N divisible by "
                f"{max(ratios)})"
            )


def _at_offsets(x: torch.Tensor, offset: torch.Tensor, w: int, r: int) -> torch.Tensor:
    """``(B, H, N, D)`` -> ``(B, H, N / w, w / r, D)``: per segment of ``w`` tokens, those at each head's offset."""
    x = rearrange(x, "b h (s t r) d -> b h s t r d", t=w // r, r=r)
    return x.take_along_dim(offset, dim=4).squeeze(4)


def dilated_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment_lengths: tuple[int, ...], ratios: tuple[int, ...]
) -> torch.Tensor:
    """Dilated attention of ``q, k, v`` ``(B, H, N, D)`` -> ``(B, H, N, D)`` over the (segment, ratio) pairs.

    A query that no pair covers (possible only without ratio 1) gets a zero output.
    """
    h, n, d = q.shape[1:]
    _check_pairs(n, segment_lengths, ratios)
    outs, lses = [], []
    for w, r in zip(segment_lengths, ratios, strict=True):
        # head h keeps offset h mod r of each segment
        offset = (torch.arange(h, device=q.device) % r).view(1, h, 1, 1, 1, 1)
        qs, ks, vs = (_at_offsets(x, offset, w, r) for x in (q, k, v))
        scores = qs @ ks.transpose(-1, -2) * d**-0.5
        lse = scores.logsumexp(-1, keepdim=True)  # (B, H, s, t, 1)
        out = scores.softmax(-1) @ vs
        # Back to every position: zero output and -inf denominator where this pair has no query.
        index = offset.expand(*out.shape[:-1], 1, d)
        out = out.new_zeros(*out.shape[:-1], r, d).scatter(4, index, out.unsqueeze(4))
        lse = lse.new_full((*lse.shape[:-1], r, 1), float("-inf")).scatter(4, index[..., :1], lse.unsqueeze(4))
        outs.append(rearrange(out, "b h s t r d -> b h (s t r) d"))
        lses.append(rearrange(lse, "b h s t r d -> b h (s t r) d"))
    weights = torch.stack(lses).softmax(0).nan_to_num(0.0)  # (pairs, B, H, N, 1); NaN: no pair has the query
    return (weights * torch.stack(outs)).sum(0)


class DilatedAttention(nn.Module):
    """Multi-head dilated attention with timm's attention interface: ``(B, N, C) -> (B, N, C)``.

    Takes the options timm's ``Block`` passes to an attention layer; LongViT's ratios are fixed and its
    segment lengths follow the sequence length (see the module docstring).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        scale_norm: bool = False,
        proj_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: type[nn.Module] | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        if qk_norm or scale_norm or attn_drop:
            raise ValueError("DilatedAttention supports no qk_norm, scale_norm or attn_drop (LongViT uses none)")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias, device=device, dtype=dtype)
        self.proj = nn.Linear(dim, dim, bias=proj_bias, device=device, dtype=dtype)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("DilatedAttention takes no attn_mask and is not causal")
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.num_heads)
        out = dilated_attention(q, k, v, longvit_segment_lengths(x.shape[1]), DILATION_RATIOS)
        return self.proj_drop(self.proj(rearrange(out, "b h n d -> b n (h d)")))


default_cfgs = generate_default_cfgs({"longvit_base_patch16": pretrained_cfg(input_size=(3, 1024, 1024))})


@register_model
def longvit_base_patch16(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """LongViT-B/16: ViT-B/16 (C=768, 12 heads, depth 12) with dilated attention, mean-pooled (no weights)."""
    args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, class_token=False, global_pool="avg")
    return build_model_with_cfg(
        VisionTransformer, "longvit_base_patch16", pretrained, attn_layer=DilatedAttention, **{**args, **kwargs}
    )
