"""Solutions of the exercises of notebook 6 (training a tiny Atlas)."""

import torch
from einops import rearrange

from atlas import Atlas
from atlas.scales import MultiScaleLayout


def readout_logits(model: Atlas, last_stage_maps: list[torch.Tensor]) -> torch.Tensor:
    """The last stage's ``(B, h_l, w_l, C)`` maps, finest first -> ``(B, classes)`` logits.

    Atlas reads out the coarsest scale only: its tokens are normalised one by one, averaged, normalised again
    and classified.
    """
    tokens_bnc = rearrange(last_stage_maps[-1], "b h w c -> b (h w) c")
    pooled_bc = model.fc_norm(model.readout_norm(tokens_bnc).mean(dim=1))
    return model.head(pooled_bc)


def close_top_down(layout: MultiScaleLayout, first_scale: int, masks: list[torch.Tensor]) -> None:
    """Hide, in place, every key that a window of ``masks[l]`` (scale ``first_scale + l``) reads at a coarser scale.

    ``masks[l]``: ``(windows, keys)`` bool, the window's own ``tokens_per_window`` keys first.
    """
    for l, mask in enumerate(masks):
        mask[:, layout.scales[first_scale + l].tokens_per_window :] = False
