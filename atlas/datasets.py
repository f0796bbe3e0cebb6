"""Datasets, built by name: ``build_dataset("synthetic", "train", transform, num_classes=10, train_size=512)``.

A dataset registers itself with ``@register_dataset(name)`` on a builder ``(split, transform, **options)``.
Samples are ``(image, label)``; an image that cannot be read comes back as ``None`` (logged), and
:func:`collate_skip_unreadable` drops those from the batch and counts them.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import find_classes

log = logging.getLogger(__name__)

SPLITS = ("train", "val")
DATASETS: dict[str, Callable[..., Dataset]] = {}


def register_dataset(name: str):
    """Decorator adding a builder ``(split, transform, **options) -> Dataset`` under ``name``."""

    def add(builder):
        DATASETS[name] = builder
        return builder

    return add


def build_dataset(name: str, split: str, transform: Callable | None = None, **options) -> Dataset:
    """The ``split`` ('train' or 'val') of dataset ``name``; ``options`` are checked against its builder."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; registered datasets: {', '.join(sorted(DATASETS))}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    builder = DATASETS[name]
    params = inspect.signature(builder).parameters
    accepted = [p for p in params if p not in ("split", "transform")]
    for key in options:
        if key not in accepted:
            raise ValueError(f"dataset {name!r} does not take option {key!r}; accepted: {', '.join(accepted)}")
    missing = [p for p in accepted if params[p].default is inspect.Parameter.empty and p not in options]
    if missing:
        raise ValueError(f"dataset {name!r} needs option(s) {', '.join(missing)}")
    return builder(split=split, transform=transform, **options)


def collate_skip_unreadable(batch: list, stack: bool = True) -> tuple[torch.Tensor | list, torch.Tensor, int]:
    """Collate ``(image, label)`` samples, dropping ``None`` ones: returns (images, labels, number dropped).

    ``stack=False`` keeps the images a list, for images of different sizes. A batch of unreadable images only
    gives no images (``len(images) == 0``).
    """
    kept = [sample for sample in batch if sample is not None]
    if not kept:  # all unreadable: an empty batch, which the trainer skips
        return (torch.empty(0) if stack else []), torch.empty(0, dtype=torch.long), len(batch)
    if not stack:
        return [image for image, _ in kept], default_collate([label for _, label in kept]), len(batch) - len(kept)
    images, labels = default_collate(kept)
    return images, labels, len(batch) - len(kept)


# -- image folders ---------------------------------------------------------------------------------------


def load_image(path: str, channels: int = 3) -> Image.Image | None:
    """The image at ``path`` as 8-bit RGB (``channels=3``) or grey (``channels=1``), or ``None`` (with a
    warning) if it cannot be decoded. 16-bit images (PNG, TIFF: common in medical imaging) are scaled from
    their full range, 0..65535, to 0..255, rather than clipped to white."""
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode.startswith("I"):  # "I;16", "I;16B", "I": integer pixels, 16 bits in practice
                pixels = np.asarray(img, dtype=np.float64) / 257.0
                img = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), mode="L")
            return img.convert("RGB" if channels == 3 else "L")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        log.warning("skipping unreadable image %s: %s", path, e)
        return None


class ImageFolderSkipUnreadable(ImageFolder):
    """torchvision's ``ImageFolder`` (``root/<class>/<image>``); unreadable images come back as ``None``."""

    def __init__(self, root: str | Path, transform: Callable | None = None, channels: int = 3):
        super().__init__(str(root), transform=transform, loader=partial(load_image, channels=channels))

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        img = self.loader(path)
        if img is None:
            return None
        return (self.transform(img) if self.transform else img), label


def _some(names: list[str], limit: int = 5) -> str:
    return ", ".join(names[:limit]) + (f", ... ({len(names) - limit} more)" if len(names) > limit else "") or "none"


@register_dataset("imagefolder")
def build_imagefolder(
    split: str, transform: Callable | None, root: str, num_classes: int, channels: int = 3
) -> Dataset:
    """``root/train/<class>/*`` and ``root/val/<class>/*`` (the layout scripts/prepare_hr_in100.py writes),
    decoded to ``channels`` (3: RGB, 1: grey)."""
    if channels not in (1, 3):
        raise ValueError(f"imagefolder decodes to 1 (grey) or 3 (RGB) channels, got channels={channels}")
    layout = "ROOT/train/<class>/<image> and ROOT/val/<class>/<image>"
    folder = Path(root) / split
    if not Path(root).is_dir():
        raise FileNotFoundError(f"data root {root} does not exist; expected the layout {layout}")
    if not folder.is_dir():
        raise FileNotFoundError(f"data folder {folder} does not exist; expected the layout {layout}")
    dataset = ImageFolderSkipUnreadable(folder, transform, channels)
    train = Path(root) / "train"
    if split != "train" and train.is_dir():  # labels are class folders in sorted order: the same names, or wrong
        train_classes = find_classes(str(train))[0]
        if dataset.classes != train_classes:
            missing = sorted(set(train_classes) - set(dataset.classes))
            extra = sorted(set(dataset.classes) - set(train_classes))
            raise ValueError(
                f"the class folders of {folder} are not those of {train} (labels follow the folder names): "
                f"{len(missing)} missing ({_some(missing)}), {len(extra)} not in train ({_some(extra)})"
            )
    if len(dataset.classes) != num_classes:
        raise ValueError(f"{folder} has {len(dataset.classes)} class folders but data.num_classes is {num_classes}")
    return dataset


# -- synthetic -------------------------------------------------------------------------------------------


class SyntheticPatterns(Dataset):
    """Procedural images a model can learn: the class sets a grating's orientation and colour.

    Sample ``i`` of a split is the same every time (seeded by ``(seed, split, i)``); its label is
    ``i % num_classes``. Phase, frequency jitter and pixel noise vary per sample.
    """

    def __init__(self, split: str, transform, num_classes: int, size: int, image_size: int, seed: int):
        self.split_id = SPLITS.index(split)
        self.transform, self.num_classes, self.size = transform, num_classes, size
        self.image_size, self.seed = image_size, seed
        hues = np.arange(num_classes) * 2 * math.pi / num_classes
        self.colors = 0.5 + 0.4 * np.stack([np.cos(hues + k * 2 * math.pi / 3) for k in range(3)], axis=1)

    def __len__(self) -> int:
        return self.size

    def image(self, index: int) -> tuple[np.ndarray, int]:
        """The ``(H, W, 3)`` uint8 image of sample ``index`` and its label."""
        if not 0 <= index < self.size:
            raise IndexError(f"sample {index} of a dataset of {self.size}")
        rng = np.random.default_rng([self.seed, self.split_id, index])
        label = index % self.num_classes
        angle = math.pi * label / self.num_classes + rng.normal(0, 0.05)
        frequency = rng.uniform(3, 6)
        yy, xx = np.mgrid[0 : self.image_size, 0 : self.image_size] / self.image_size
        wave = np.sin(2 * math.pi * frequency * (xx * math.cos(angle) + yy * math.sin(angle)) + rng.uniform(0, 7))
        pixels = (0.5 + 0.5 * wave)[..., None] * self.colors[label]
        pixels = pixels + rng.normal(0, 0.1, pixels.shape)
        return (np.clip(pixels, 0, 1) * 255).astype(np.uint8), label

    def __getitem__(self, index: int):
        pixels, label = self.image(index)
        img = Image.fromarray(pixels)
        return (self.transform(img) if self.transform else img), label


@register_dataset("synthetic")
def build_synthetic(
    split: str,
    transform: Callable | None,
    num_classes: int,
    train_size: int = 1024,
    val_size: int = 256,
    image_size: int = 64,
    seed: int = 0,
) -> Dataset:
    """Seeded procedural images of ``image_size`` pixels; the transforms resize them to the model's size."""
    size = train_size if split == "train" else val_size
    return SyntheticPatterns(split, transform, num_classes, size, image_size, seed)


# -- long-range matching (atlas/longrange.py) ---------------------------------------------------------------

from .longrange import build_longrange  # noqa: E402  (next to its registration; longrange does not import us)

register_dataset("longrange")(build_longrange)
