"""The `fast` input pipeline: workers hand over uint8 source crops, the trainer resizes them on its device.

`exact` (timm's `create_transform`, the released recipe) builds every sample at the model's input size on a
worker core: random-resized crop *and upsampling*, flip, RandAugment, ToTensor, Normalize and random erasing
all run on 1024^2 to 4096^2 pixels, and a float32 sample of 12 to 192 MiB crosses to the trainer. `fast` splits
the same steps at the resize:

* worker (`SourceCrop`, `SourceCenterCrop`): decode, choose the random-resized-crop box on the source image
  (the same `get_params` as `exact`), crop at the source resolution, flip, RandAugment on the crop; hand over
  the crop as a ``(C, h, w)`` uint8 tensor (`collate_crops` keeps a batch as a list: crops differ in size);
* trainer (`DeviceStage`, on the GPU when there is one, else the CPU, the same code): resize each crop to the
  input size (bicubic, antialiased), normalise, random-erase, in float32, then cast to the training dtype;
  `DevicePrefetcher` runs it for the next batch on a side CUDA stream while the current one trains.

What changes against `exact`: with the same random state both draw the same crop box, flip and RandAugment
ops. RandAugment then acts on the source crop instead of its upsampled copy. The geometric ops (rotate,
shear, relative translate) and the per-pixel and histogram ops are the same transforms of the image content,
up to where resampling happens; `Sharpness` is not: its 3x3 filter works on pixels, so at source resolution
it sharpens the image's own detail, where in `exact` it filtered an already smooth upsampled image (a weaker
effect for 2-8x upsampling). Random erasing runs at the input size in both, with a per-batch seed here.
"""

from __future__ import annotations

import random
from contextlib import contextmanager
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import rand_augment_transform
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import RandomResizedCropAndInterpolation, str_to_pil_interp

from atlas.datasets import collate_skip_unreadable


def pil_to_uint8(img: Image.Image) -> torch.Tensor:
    """A PIL image (RGB or L) -> ``(C, h, w)`` uint8 tensor, without scaling."""
    pixels = np.asarray(img, dtype=np.uint8)
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))


class SourceCrop:
    """Worker side, training: PIL image -> uint8 ``(C, h, w)`` random-resized-crop box at source resolution.

    The box follows timm's `RandomResizedCropAndInterpolation.get_params` (as `exact` does); then a horizontal
    flip with probability ``hflip`` and RandAugment (``auto_augment``, a timm ``rand-...`` string) on the crop.
    """

    def __init__(self, scale, ratio, hflip: float, auto_augment: str | None, interpolation: str, mean):
        self.scale, self.ratio, self.hflip = tuple(scale), tuple(ratio), hflip
        self.augment = None
        if auto_augment:
            if not auto_augment.startswith("rand"):
                raise ValueError(
                    f"data.pipeline=fast supports RandAugment ('rand-...') policies, got aug.auto_augment="
                    f"{auto_augment!r}; use data.pipeline=exact for other policies"
                )
            fill = tuple(min(255, round(255 * m)) for m in mean)
            hparams = dict(img_mean=fill if len(fill) > 1 else fill[0], interpolation=str_to_pil_interp(interpolation))
            self.augment = rand_augment_transform(auto_augment, hparams)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        top, left, h, w = RandomResizedCropAndInterpolation.get_params(img, self.scale, self.ratio)
        if h < 1 or w < 1:  # timm's fallback box rounds to nothing on a tiny image (1x1): all of it, as `exact` has
            top, left, h, w = 0, 0, img.height, img.width
        crop = img.crop((left, top, left + w, top + h))
        if self.hflip > 0 and torch.rand(1).item() < self.hflip:  # as torchvision's RandomHorizontalFlip
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        if self.augment is not None:
            crop = self.augment(crop)
        return pil_to_uint8(crop)


class SourceCenterCrop:
    """Worker side, evaluation: the central ``crop_pct`` of the source image (all of it at 1.0), uint8.

    With the trainer's resize to the input size this is `exact`'s "squash" evaluation: resize to
    ``img_size / crop_pct``, then center-crop ``img_size``.
    """

    def __init__(self, crop_pct: float):
        if not 0 < crop_pct <= 1:
            raise ValueError(f"aug.eval_crop_pct must be in (0, 1], got {crop_pct}")
        self.crop_pct = crop_pct

    def __call__(self, img: Image.Image) -> torch.Tensor:
        w, h = img.size
        cw, ch = max(1, round(w * self.crop_pct)), max(1, round(h * self.crop_pct))
        left, top = (w - cw) // 2, (h - ch) // 2
        return pil_to_uint8(img.crop((left, top, left + cw, top + ch)))


# The crops of a batch differ in size: they stay a list (unreadable images dropped and counted, as for `exact`).
collate_crops = partial(collate_skip_unreadable, stack=False)


class DeviceStage:
    """Trainer side: uint8 crops -> a normalised ``(B, C, H, W)`` batch at the input size, on ``device``.

    Each crop is resized with antialiased bicubic interpolation (the kernel of PIL's bicubic resize), the batch
    is normalised and, in training, random-erased with timm's `RandomErasing` under a seed (so that a resumed
    run erases the same boxes). The result is cast to ``dtype``.
    """

    def __init__(self, img_size, mean, std, device, dtype=torch.float32, re_prob=0.0, re_mode="pixel", re_count=1):
        self.size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.device, self.dtype = torch.device(device), dtype
        self.mean = torch.tensor(mean, device=self.device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, device=self.device).view(1, -1, 1, 1) * 255
        self.erase = RandomErasing(re_prob, mode=re_mode, max_count=re_count, device=self.device) if re_prob else None

    def resize(self, crops: list[torch.Tensor]) -> torch.Tensor:
        """uint8 ``(C, h, w)`` crops (any device) -> float32 ``(B, C, H, W)`` in [0, 255], on ``device``."""
        if not crops:  # a batch whose images were all unreadable
            return torch.zeros(0, self.mean.shape[1], *self.size, device=self.device)
        resized = []
        for crop in crops:
            pixels = crop.to(self.device, non_blocking=True)[None].float()
            if tuple(pixels.shape[-2:]) != self.size:
                pixels = F.interpolate(pixels, self.size, mode="bicubic", antialias=True, align_corners=False)
            resized.append(pixels)
        return torch.cat(resized).clamp_(0, 255)

    def __call__(self, crops: list[torch.Tensor], seed: int | None = None) -> torch.Tensor:
        images = (self.resize(crops) - self.mean) / self.std
        if self.erase is not None:
            with seeded(seed, self.device):
                images = self.erase(images)
        return images.to(self.dtype)


@contextmanager
def seeded(seed: int | None, device: torch.device):
    """Python's and ``device``'s torch random generators seeded inside the block, restored afterwards."""
    if seed is None:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type="cuda"):
        state = random.getstate()
        random.seed(seed)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(state)


class DevicePrefetcher:
    """Iterates ``loader`` (crops, labels, skipped) and yields (images, labels, skipped) on the device.

    On CUDA the next batch is copied and prepared by `DeviceStage` on a side stream while the current one is
    used (as timm's `PrefetchLoader` does for fixed-size batches); on a CPU each batch is prepared when asked
    for. ``first_seed`` numbers the batches' erasing seeds: batch ``i`` uses ``first_seed + i``.
    """

    def __init__(self, loader, stage: DeviceStage, first_seed: int = 0):
        self.loader, self.stage, self.first_seed = loader, stage, first_seed
        self.cuda = stage.device.type == "cuda"

    def _prepare(self, batch, index: int):
        crops, labels, skipped = batch
        empty = [i for i, crop in enumerate(crops) if 0 in crop.shape[-2:]]
        if empty:  # nothing to resize (as unreadable images, skipped and counted)
            keep = [i for i in range(len(crops)) if i not in empty]
            crops, labels, skipped = [crops[i] for i in keep], labels[keep], skipped + len(empty)
        labels = labels.to(self.stage.device, non_blocking=True)
        return self.stage(crops, self.first_seed + index), labels, skipped

    def __iter__(self):
        batches = iter(self.loader)
        if not self.cuda:
            for index, batch in enumerate(batches):
                yield self._prepare(batch, index)
            return
        stream = torch.cuda.Stream(self.stage.device)
        ready, index = None, 0
        for batch in batches:
            with torch.cuda.stream(stream):
                prepared = self._prepare(batch, index)
            index += 1
            if ready is not None:
                yield ready
            torch.cuda.current_stream(self.stage.device).wait_stream(stream)
            for tensor in prepared[:2]:
                tensor.record_stream(torch.cuda.current_stream(self.stage.device))
            ready = prepared
        if ready is not None:
            yield ready

    def __len__(self) -> int:
        return len(self.loader)


def erasing_seed(seed: int, epoch: int, batch: int) -> int:
    """The random-erasing seed of a training batch: depends on (seed, epoch, batch), not on how we got there."""
    return (seed * 1_000_003 + epoch) * 1_000_033 + batch
