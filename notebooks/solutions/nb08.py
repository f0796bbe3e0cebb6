"""Solutions of the exercises of notebook 8 (dense prediction)."""

import math

import torch
from einops import repeat


def feature_sizes(image_size, patch_size=16, pool_stride=4, window_size=16):
    """The (h, w) of each feature map of ``features_only`` Atlas on an ``image_size = (H, W)`` input.

    Scale 1 has one token per patch (a partial patch still makes a token); each next scale max-pools the one
    before by ``pool_stride`` (again rounding up), and pooling stops at the first scale that fits in one
    ``window_size`` x ``window_size`` window.
    """
    size = tuple(math.ceil(side / patch_size) for side in image_size)
    sizes = [size]
    while max(size) > window_size:
        size = tuple(math.ceil(side / pool_stride) for side in size)
        sizes.append(size)
    return sizes


def upsample_to_finer(coarse_bchw: torch.Tensor, fine_size: tuple[int, int], s: int) -> torch.Tensor:
    """``(B, C, h, w)`` coarse map -> ``(B, C, *fine_size)``: every fine token gets the coarse token that pools it.

    Fine token ``(i, j)`` lies in the pooling block of coarse token ``(i // s, j // s)``; the last blocks may be
    partial (the coarse sides are the fine ones divided by ``s``, rounded up), so the copies are cropped.
    """
    copies = repeat(coarse_bchw, "b c h w -> b c (h sh) (w sw)", sh=s, sw=s)
    return copies[..., : fine_size[0], : fine_size[1]]
