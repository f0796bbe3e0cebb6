"""Solutions of the exercises of notebook 8 (dense prediction)."""

import math

import torch


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


def class_iou(pred: torch.Tensor, truth: torch.Tensor, cls: int) -> float:
    """Intersection over union of class ``cls`` between two integer masks of the same shape (any shape)."""
    inter = ((pred == cls) & (truth == cls)).sum().item()
    union = ((pred == cls) | (truth == cls)).sum().item()
    return inter / union
