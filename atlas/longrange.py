"""Long-range matching: a seeded image-classification task that only communication across the image solves.

Every image is grey pixel noise with a coloured bar along its left side and another along its right side.
The label is **1 when the two bars have the same colour** and 0 when they differ. The colour of either bar
on its own is uniform over the palette in both classes; nothing else in the image carries information.

Why window attention alone cannot solve it (defaults: 64px images, bars 8px wide, Atlas with 4x4-pixel
tokens and windows of 4x4 tokens, i.e. 16px):

* **One side says nothing.** The label is a same/different interaction between the two bars, which are
  ``image_size - 2 * bar_width`` = 48px apart, the width of three windows. Whatever a model computes from
  one side alone is independent of the label.
* **No window sees both sides.** Window attention mixes the tokens of one window only, and the
  convolutional stem in front of it sees 23px around a token (its receptive field is 47px wide at
  ``patch_size=4``). A window together with its stem context spans 16 + 2 * 23 = 62px, which never reaches
  both bars: the left bar ends at pixel 7 and the right bar starts at pixel 56
  (``tests/test_longrange.py`` checks this with the model's gradients).
* **Only the classifier joins windows, and it can barely compare.** It averages the tokens, normalises the
  average (LayerNorm) and applies a linear layer. Up to that normalisation its score is a sum of one term
  per window: evidence about the left colour plus evidence about the right colour. A threshold on such a
  sum cannot decide *same* versus *different*; the best it can do is a rule like "same when the left colour
  comes at least as late in the palette as the right one", which is right on every *same* image and on half
  of the *different* ones: 3 in 4 (``tests/test_longrange.py`` finds no better one by exhaustive search).
  The normalisation divides by the norm of the average, a weak second-order coupling between windows, and
  is the only other non-linearity. In the demo's budget, window attention stays at chance.

The same argument holds for the smaller geometry of ``make demo`` (``scripts/configs/demo/``): 32px images with
4px bars and a stem of one residual block per stage, whose receptive field is 19px wide (11px before a token,
8px after it). A quadrant window with its stem context then reaches pixel 23 from the left half and pixel 5
from the right half, short of the far bar on either side (``tests/test_longrange.py`` checks both geometries).
With the paper's deeper stem, the 32px task is *not* blind: its 47px field spans the whole image.

Multi-scale attention connects the sides through the coarse scale: max-pooling brings each bar into the
coarse tokens, the coarse scale is a single window that attends globally, and top-down / bottom-up
attention carries information between the scales. A ViT with global attention can solve it as well.

Sample ``index`` of a split is the same image every time (its generator is seeded by ``(seed, split,
index)``), drawn on the fly with a few array operations (well under a millisecond). Labels alternate
(``index % 2``), so any even-sized split is exactly balanced. ``set_epoch(e)`` switches to a new, equally
deterministic set of images for every ``e > 0`` (``scripts/train.py`` calls it before each epoch): a small
training split then never shows the same image twice, which keeps a model from memorising it::

    ds = LongRangeMatch("train", size=4096)
    image, label = ds[0]          # a PIL image (or the transform's output) and 0 (different) / 1 (same)
    pixels, label = ds.image(0)   # (H, W, 3) uint8
    ds.set_epoch(1)               # from now on, other images (the labels stay the same)
    fig = plot_examples(ds, 8)    # a figure of a few examples with their labels
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from .scales import MultiScaleLayout

# Distinct, saturated colours (RGB in [0, 1]); the task uses the first ``num_colors``.
PALETTE = np.array(
    [
        [0.90, 0.10, 0.10],  # red
        [0.10, 0.35, 0.95],  # blue
        [0.10, 0.80, 0.20],  # green
        [0.95, 0.85, 0.10],  # yellow
        [0.80, 0.20, 0.90],  # magenta
        [0.10, 0.85, 0.85],  # cyan
    ]
)


@dataclass(frozen=True)
class Scene:
    """Everything an image is drawn from; :meth:`LongRangeMatch.render` turns it into pixels."""

    colors: tuple[int, int]  # indices into PALETTE of the left and the right bar
    noise_seed: int

    @property
    def label(self) -> int:
        """1 if the two bars have the same colour, else 0."""
        return int(self.colors[0] == self.colors[1])

    def recolor(self, side: int, color: int) -> Scene:
        """The same scene with the bar on ``side`` (0: left, 1: right) painted ``color``."""
        colors = list(self.colors)
        colors[side] = color
        return replace(self, colors=tuple(colors))


class LongRangeMatch(Dataset):
    """The long-range matching task (see the module docstring): ``size`` images of ``image_size`` pixels.

    ``bar_width``: thickness of the bars in pixels. ``num_colors``: how many colours of :data:`PALETTE` the
    bars use. ``noise``: standard deviation of the pixel noise. ``transform`` is applied to the PIL image.
    ``resample``: draw new images in every epoch (see :meth:`set_epoch`); otherwise ``set_epoch`` does nothing,
    as for a validation split.
    """

    def __init__(
        self,
        split: str,
        size: int,
        image_size: int = 64,
        bar_width: int = 8,
        num_colors: int = 2,
        noise: float = 0.05,
        seed: int = 0,
        transform: Callable | None = None,
        resample: bool = False,
    ):
        if not 1 <= bar_width < image_size // 2:
            raise ValueError(f"bar_width must be in [1, image_size / 2), got {bar_width} for {image_size}px")
        if not 2 <= num_colors <= len(PALETTE):
            raise ValueError(f"num_colors must be in [2, {len(PALETTE)}], got {num_colors}")
        self.split, self.size, self.image_size, self.bar_width = split, size, image_size, bar_width
        self.num_colors, self.noise, self.seed, self.transform = num_colors, noise, seed, transform
        self.stream = zlib.crc32(split.encode())  # a stable number per split (Python's hash() is salted)
        self.resample, self.epoch = resample, 0

    def set_epoch(self, epoch: int) -> None:
        """Draw the images of ``epoch`` from now on (if ``resample``); epoch 0 has the split's usual images."""
        if self.resample:
            self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def scene(self, index: int) -> Scene:
        """The random scene of sample ``index``: deterministic in ``(seed, split, index)`` and the epoch."""
        if not 0 <= index < self.size:
            raise IndexError(f"sample {index} of a dataset of {self.size}")
        rng = np.random.default_rng([self.seed, self.stream, index] + ([self.epoch] if self.epoch else []))
        left = int(rng.integers(self.num_colors))
        same = index % 2 == 1
        right = left if same else (left + int(rng.integers(1, self.num_colors))) % self.num_colors
        return Scene((left, right), int(rng.integers(2**31)))

    def render(self, scene: Scene) -> np.ndarray:
        """The ``(H, W, 3)`` uint8 image of a scene."""
        n, w = self.image_size, self.bar_width
        pixels = 0.5 + np.random.default_rng(scene.noise_seed).normal(0, self.noise, (n, n, 3))
        pixels[:, :w] = PALETTE[scene.colors[0]]
        pixels[:, n - w :] = PALETTE[scene.colors[1]]
        return (np.clip(pixels, 0, 1) * 255).round().astype(np.uint8)

    def image(self, index: int) -> tuple[np.ndarray, int]:
        """The ``(H, W, 3)`` uint8 image of sample ``index`` and its label."""
        scene = self.scene(index)
        return self.render(scene), scene.label

    def __getitem__(self, index: int):
        pixels, label = self.image(index)
        img = Image.fromarray(pixels)
        return (self.transform(img) if self.transform else img), label


def build_longrange(
    split: str,
    transform: Callable | None,
    num_classes: int = 2,
    train_size: int = 4096,
    val_size: int = 512,
    image_size: int = 64,
    bar_width: int = 8,
    num_colors: int = 2,
    noise: float = 0.05,
    seed: int = 0,
    resample_train: bool = False,
) -> LongRangeMatch:
    """The ``split`` of the task, for the dataset registry of :mod:`atlas.datasets` (name ``"longrange"``).

    ``resample_train``: the training split draws new images in every epoch.
    """
    if num_classes != 2:
        raise ValueError(f"the long-range matching task has 2 classes (different, same), not {num_classes}")
    train = split == "train"
    size = train_size if train else val_size
    return LongRangeMatch(
        split, size, image_size, bar_width, num_colors, noise, seed, transform, resample=train and resample_train
    )


def plot_examples(dataset: LongRangeMatch, num: int = 8, cols: int = 4, layout: MultiScaleLayout | None = None):
    """A figure of the first ``num`` samples and their labels; ``layout`` draws its finest windows over them."""
    import matplotlib.pyplot as plt

    from .viz import draw_windows

    rows = -(-num // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.4 * rows), squeeze=False)
    for index, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if index >= num:
            continue
        pixels, label = dataset.image(index)
        ax.imshow(pixels)
        if layout is not None:
            draw_windows(ax, layout, pixels.shape[:2], 0, linewidth=0.5, alpha=0.5)
        ax.set_title(f"#{index}: {'same' if label else 'different'}", fontsize=9)
    fig.tight_layout()
    return fig
