"""Solutions of the exercises of notebook 4 (bottom-up and the MSA block)."""

import torch

from atlas.msa import BlockGeometry, MSABlock
from atlas.scales import MultiScaleLayout, map_to_windows, pool_map, windows_to_map


def bottom_up_queries(layout: MultiScaleLayout, l: int) -> torch.Tensor:
    """``(nW_{l-1}, (k/s)^2)`` long: the row-major indices of the tokens of scale ``l`` (0-based, ``l >= 1``) whose
    queries read window ``w`` of scale ``l - 1`` in bottom-up, in the row-major order of their block; -1 where
    the block is padding (past the bottom or right edge of scale ``l``)."""
    coarse = layout.scales[l]
    block = (layout.window_size // layout.pool_stride,) * 2
    index_map = torch.arange(coarse.num_tokens).view(1, *coarse.size, 1) + 1  # 0 is left for the padding
    return map_to_windows(index_map, block)[0, :, :, 0] - 1


def block_forward(block: MSABlock, maps: list[torch.Tensor], geo: BlockGeometry) -> list[torch.Tensor]:
    """One MSA block (Algorithm 1) from its parts: ``maps`` are ``(B, h_l, w_l, C)``, finest first."""
    layers, scales = block.scales, geo.scales

    def queries(l: int, window: tuple[int, int]) -> torch.Tensor:  # (B, nW, T, C)
        return map_to_windows(layers[l].attn.q(layers[l].norm_q(maps[l])), window)

    def keys_values(m: int) -> torch.Tensor:  # (B, nW_m, T_m, 2C)
        return map_to_windows(layers[m].attn.kv(layers[m].norm_kv(maps[m])), scales[m].window)

    maps = [layer.pos(x, sc.window) for x, layer, sc in zip(maps, layers, scales, strict=True)]
    for l in range(len(maps) - 1):  # summarise, finest to coarsest
        maps[l + 1] = maps[l + 1] + pool_map(maps[l], geo.pool_stride)
    for l in reversed(range(len(maps))):  # top-down, coarsest first
        coarser = range(l + 1, len(maps)) if block.top_down else range(0)
        kv = [keys_values(l)] + [keys_values(m)[:, geo.top_down_windows[l, m]] for m in coarser]
        attended = layers[l].attn(queries(l, scales[l].window), torch.cat(kv, dim=2), geo.top_down_masks[l])
        maps[l] = layers[l].residual(maps[l], windows_to_map(attended, scales[l].window, scales[l].size))
    for l in range(1, len(maps)) if block.bottom_up else []:  # bottom-up, finest first
        attended = layers[l].attn(queries(l, geo.bottom_up_block), keys_values(l - 1), geo.window_masks[l - 1])
        maps[l] = layers[l].residual(maps[l], windows_to_map(attended, geo.bottom_up_block, scales[l].size))
    return maps
