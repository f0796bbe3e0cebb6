"""Solutions of the exercises of notebook 6 (training a tiny Atlas)."""

import itertools

import numpy as np
import torch.nn as nn


def best_additive_correct(counts: np.ndarray) -> int:
    """The most images any rule "same iff f(left) + g(right) > 0" gets right; ``counts[left, right]``: ``(2, 2)``.

    With two colours integer scores f, g in {0, 1} and thresholds t in {0, 1, 2, 3} (``f + g >= t``), and their
    negations, give every labelling of the four pairs that such a rule can produce.
    """
    same = np.eye(2, dtype=bool)
    best = 0
    for f in itertools.product((0, 1), repeat=2):
        for g in itertools.product((0, 1), repeat=2):
            says_same = np.add.outer(f, g)[None] >= np.arange(4)[:, None, None]  # (threshold, left, right)
            for labels in (says_same, ~says_same):
                best = max(best, int(((labels == same) * counts).sum((1, 2)).max()))
    return best


def extra_parameters(model: nn.Module, other: nn.Module) -> dict[str, int]:
    """``{name: number of values}`` of the parameters of ``model`` that ``other`` has no parameter of that name for."""
    theirs = dict(other.named_parameters())
    return {name: p.numel() for name, p in model.named_parameters() if name not in theirs}
