"""Solutions of the exercises of notebook 3 (top-down communication)."""

import torch
import torch.nn.functional as F
from einops import reduce

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


def summarise_any_size(maps: list[torch.Tensor], s: int) -> list[torch.Tensor]:
    """Finest to coarsest, ``X[l+1] + maxpool(X[l])`` on ``(B, h_l, w_l, C)`` maps of any sides: each scale is pooled
    after its own summary, and a partial region at the bottom or right edge pools its real tokens only."""
    summary = [maps[0]]
    for x_map in maps[1:]:
        h, w = summary[-1].shape[1:3]
        padded = F.pad(summary[-1], (0, 0, 0, (-w) % s, 0, (-h) % s), value=float("-inf"))  # -inf never wins a max
        summary.append(x_map + reduce(padded, "b (h sh) (w sw) c -> b h w c", "max", sh=s, sw=s))
    return summary
