"""The efficient MSA block against a naive dense oracle written from token coordinates only.

The oracle keeps every scale as flat real tokens (no windows, no padding), runs full attention over the tokens
of all active scales and decides what each query may see with a boolean mask computed from (row, col)
positions. Padding never appears in it, so agreement also shows that padded tokens are invisible.
"""

import math
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F

from atlas.msa import BlockGeometry, MSABlock
from atlas.scales import MultiScaleLayout, build_pyramid

DIM, HEADS, K, S = 32, 2, 4, 2


def coords(size):
    """(N, 2) long (row, col) of a row-major grid."""
    r, c = torch.meshgrid(torch.arange(size[0]), torch.arange(size[1]), indexing="ij")
    return torch.stack([r.flatten(), c.flatten()], dim=1)


def window_side(layout, l):
    return layout.scales[l].window


def window_of(rc, window):
    return rc[:, 0] // window[0], rc[:, 1] // window[1]


def dense_pos(layer, size, window):
    rc = coords(size)
    rel = []
    for axis in range(2):
        n = window[axis]
        rel.append(((rc[:, axis] % n) - n // 2) / max(n // 2, 1))
    xy = torch.stack(rel, dim=1).to(layer.pos.fc1.weight.dtype)
    return layer.pos.fc2(torch.relu(layer.pos.fc1(xy)))


def dense_pool(fine, fine_size, coarse_size):
    """Coarse token (i, j) = max over fine tokens (r, c) with r // S == i and c // S == j."""
    rc = coords(fine_size)
    parent = (rc[:, 0] // S) * coarse_size[1] + rc[:, 1] // S
    out = torch.full((fine.shape[0], coarse_size[0] * coarse_size[1], fine.shape[-1]), -math.inf, dtype=fine.dtype)
    index = parent[None, :, None].expand_as(fine)
    return out.scatter_reduce(1, index, fine, reduce="amax")


def dense_attention(layer, queries, keys_list, mask):
    """queries (B, Nq, C); keys_list: (layer, tokens) per key scale; mask (Nq, Nk) True = visible."""
    q = layer.attn.q(layer.norm_q(queries))
    kv = torch.cat([lay.attn.kv(lay.norm_kv(x)) for lay, x in keys_list], dim=1)
    k, v = kv.chunk(2, dim=-1)
    b, nq, c = q.shape
    d = c // HEADS
    q = q.view(b, nq, HEADS, d).transpose(1, 2)
    k = k.view(b, -1, HEADS, d).transpose(1, 2)
    v = v.view(b, -1, HEADS, d).transpose(1, 2)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(d)
    scores = scores.masked_fill(~mask, -math.inf)
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, nq, c)
    return out


def residual(layer, x, out):
    x = x + layer.attn.proj(out)
    return x + layer.mlp(layer.norm2(x))


def top_down_mask(layout, first, l, m, routing):
    """May token q of scale l read token k of scale m >= l in top-down?"""
    sl, sm = layout.scales[first + l], layout.scales[first + m]
    q_rc, k_rc = coords(sl.size), coords(sm.size)
    if m == l:
        qw, kw = window_of(q_rc, sl.window), window_of(k_rc, sm.window)
        return (qw[0][:, None] == kw[0][None]) & (qw[1][:, None] == kw[1][None])
    if routing == "containing":
        ratio = S ** (m - l)
        region = q_rc // ratio  # the scale-m token covering each query
        qw, kw = window_of(region, sm.window), window_of(k_rc, sm.window)
        return (qw[0][:, None] == kw[0][None]) & (qw[1][:, None] == kw[1][None])
    # released: row-major fine window i reads coarse window i // (nW_l / nW_m)
    qr, qc = window_of(q_rc, sl.window)
    kr, kc = window_of(k_rc, sm.window)
    fine_index = qr * sl.grid[1] + qc
    coarse_index = kr * sm.grid[1] + kc
    read = fine_index // (sl.num_windows // sm.num_windows)
    return read[:, None] == coarse_index[None]


def bottom_up_mask(layout, first, l):
    """Token q of scale l reads token k of scale l-1 iff k lies in the scale-(l-1) window q summarises."""
    finer, coarse = layout.scales[first + l - 1], layout.scales[first + l]
    q_rc, k_rc = coords(coarse.size), coords(finer.size)
    qw = window_of(q_rc * S, finer.window)
    kw = window_of(k_rc, finer.window)
    return (qw[0][:, None] == kw[0][None]) & (qw[1][:, None] == kw[1][None])


def dense_block(block, maps, layout, first, routing):
    scales = layout.scales[first:]
    xs = [m.flatten(1, 2) for m in maps]
    n = len(xs)
    xs = [x + dense_pos(layer, sc.size, sc.window) for x, layer, sc in zip(xs, block.scales, scales, strict=True)]
    for l in range(n - 1):
        xs[l + 1] = xs[l + 1] + dense_pool(xs[l], scales[l].size, scales[l + 1].size)
    for l in reversed(range(n)):
        key_scales = range(l, n) if block.top_down else [l]
        mask = torch.cat([top_down_mask(layout, first, l, m, routing) for m in key_scales], dim=1)
        out = dense_attention(block.scales[l], xs[l], [(block.scales[m], xs[m]) for m in key_scales], mask)
        xs[l] = residual(block.scales[l], xs[l], out)
    if block.bottom_up:
        for l in range(1, n):
            out = dense_attention(
                block.scales[l], xs[l], [(block.scales[l - 1], xs[l - 1])], bottom_up_mask(layout, first, l)
            )
            xs[l] = residual(block.scales[l], xs[l], out)
    return [x.view_as(m) for x, m in zip(xs, maps, strict=True)]


CASES = {
    "2 scales square": ((8, 8), {}),
    "2 scales non-square padded": ((7, 5), {}),
    "3 scales square": ((16, 16), {}),
    "3 scales non-square padded": ((10, 14), {}),
    "3 scales released routing": ((16, 16), {"routing": "released"}),
    "3 scales no top-down": ((10, 14), {"top_down": False}),
    "3 scales no bottom-up": ((10, 14), {"bottom_up": False}),
    "2 scales neither": ((7, 9), {"top_down": False, "bottom_up": False}),
    "single scale windows": ((10, 14), {"multiscale": False}),
}


def case_layout(case):
    tokens, switches = CASES[case]
    return MultiScaleLayout(tokens, K, S, multiscale=switches.get("multiscale", True))


# every case from its finest scale, and (where there is one to drop) from its second scale, as in stage 2
PARAMS = [(case, first) for case in CASES for first in range(min(2, case_layout(case).num_scales))]


@pytest.mark.parametrize("attention", ["sdpa", "flex"])
@pytest.mark.parametrize(("case", "first"), PARAMS)
def test_block_equals_dense_oracle(case, first, attention):
    """Both top-down kernels; FlexAttention runs forward only on CPU (its backward needs CUDA)."""
    tokens, switches = CASES[case]
    routing = switches.get("routing", "containing")
    layout = case_layout(case)
    n = layout.num_scales - first
    block = MSABlock(
        DIM, HEADS, n, top_down=switches.get("top_down", True), bottom_up=switches.get("bottom_up", True)
    ).double()
    for p in block.parameters():  # non-trivial norms and biases
        torch.nn.init.normal_(p, std=0.3)
    x_map = torch.randn(2, *tokens, DIM, dtype=torch.float64)
    maps = build_pyramid(x_map, layout)[first:]
    geo = BlockGeometry.build(layout, first, routing, block.top_down, attention=attention)
    with torch.no_grad() if attention == "flex" else nullcontext():
        got = block(list(maps), geo)
    want = dense_block(block, maps, layout, first, routing)
    assert len(got) == n
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-10)


def test_cases_cover_two_and_three_scales_and_padding():
    layouts = {name: case_layout(name) for name in CASES}
    assert {lay.num_scales for lay in layouts.values()} == {1, 2, 3}
    assert any(sc.padded for sc in layouts["3 scales non-square padded"].scales)
    assert any(sc.padded for sc in layouts["2 scales non-square padded"].scales)


def test_pool_of_partial_regions_ignores_padding():
    x = torch.randn(1, 5, 3, 4)
    pooled = build_pyramid(x, MultiScaleLayout((5, 3), 2, 2))[1]
    assert pooled.shape == (1, 3, 2, 4)
    torch.testing.assert_close(pooled[0, 2, 1], x[0, 4, 2])
    torch.testing.assert_close(pooled[0, 0, 0], x[0, :2, :2].amax(dim=(0, 1)))
    torch.testing.assert_close(F.max_pool2d(x.permute(0, 3, 1, 2), 2, 2, ceil_mode=True).permute(0, 2, 3, 1), pooled)
