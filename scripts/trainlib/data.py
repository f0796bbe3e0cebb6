"""A data order that can resume in the middle of an epoch, and augmentations seeded per sample.

The sampler yields `(index, seed)` pairs: the epoch's permutation and each sample's augmentation seed depend
only on (seed, epoch, position), never on how many batches a worker has already produced. So a run resumed
from a checkpoint sees exactly the batches an uninterrupted run would have seen, with the same augmentations.
"""

from __future__ import annotations

import random
from contextlib import contextmanager

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler


class ResumableSampler(Sampler):
    """Shuffles `size` indices per epoch and gives each of `world_size` ranks an equal share.

    The tail that does not divide evenly is dropped (a different tail every epoch), so every rank runs the
    same number of steps. `set_epoch(epoch, skip)` starts the epoch after `skip` already-consumed samples.
    """

    def __init__(self, size: int, rank: int = 0, world_size: int = 1, seed: int = 0):
        self.size, self.rank, self.world_size, self.seed = size, rank, world_size, seed
        self.per_rank = size // world_size
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def __len__(self) -> int:
        return max(self.per_rank - self.skip, 0)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.size, generator=g)
        seeds = torch.randint(2**31 - 1, (self.size,), generator=g)
        for pos in range(self.skip, self.per_rank):
            k = pos * self.world_size + self.rank
            yield int(order[k]), int(seeds[k])


@contextmanager
def isolated_rng(seed: int):
    """Seed python, numpy and torch (CPU) random generators inside the block, restoring them afterwards."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


class SeededSamples(Dataset):
    """Wraps a dataset so that `dataset[(index, seed)]` loads and augments sample `index` under `seed`."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]):
        index, seed = item
        with isolated_rng(seed):
            return self.dataset[index]
