"""atlas.datasets: the registry, the synthetic images and the image folder that skips unreadable files."""

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from atlas.datasets import DATASETS, build_dataset, collate_skip_unreadable, register_dataset


def test_synthetic_is_deterministic_per_index_and_balanced():
    a = build_dataset("synthetic", "train", num_classes=4, train_size=12, image_size=16, seed=3)
    b = build_dataset("synthetic", "train", num_classes=4, train_size=12, image_size=16, seed=3)
    assert len(a) == 12
    assert np.array_equal(np.asarray(a[5][0]), np.asarray(b[5][0]))
    assert not np.array_equal(np.asarray(a[5][0]), np.asarray(a[9][0]))  # same class, another sample
    assert [a[i][1] for i in range(8)] == [0, 1, 2, 3, 0, 1, 2, 3]
    val = build_dataset("synthetic", "val", num_classes=4, val_size=6, image_size=16, seed=3)
    assert len(val) == 6 and not np.array_equal(np.asarray(val[5][0]), np.asarray(a[5][0]))
    assert a[0][0].size == (16, 16) and a[0][0].mode == "RGB"


def test_synthetic_classes_are_separable():
    """The class sets the grating's colour and orientation: a nearest-mean classifier already does well."""
    data = build_dataset("synthetic", "train", num_classes=4, train_size=80, image_size=16)
    x = torch.stack([torch.from_numpy(np.asarray(img, dtype=np.float32)).flatten() for img, _ in data])
    x = torch.cat([x.view(len(x), -1, 3).mean(1), x.view(len(x), -1, 3).std(1)], dim=1)  # colour statistics
    y = torch.tensor([label for _, label in data])
    means = torch.stack([x[:40][y[:40] == c].mean(0) for c in range(4)])
    predicted = torch.cdist(x[40:], means).argmin(1)
    assert (predicted == y[40:]).float().mean() > 0.9


def test_transform_is_applied():
    data = build_dataset("synthetic", "val", transform=lambda img: torch.zeros(1), num_classes=2, val_size=2)
    assert torch.equal(data[0][0], torch.zeros(1))


def test_unknown_names_and_options_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'; registered datasets: .*synthetic"):
        build_dataset("imagenet", "train")
    with pytest.raises(ValueError, match="does not take option 'size'; accepted: num_classes, train_size"):
        build_dataset("synthetic", "train", num_classes=2, size=3)
    with pytest.raises(ValueError, match="needs option.* root"):
        build_dataset("imagefolder", "train", num_classes=2)
    with pytest.raises(ValueError, match="unknown split 'test'"):
        build_dataset("synthetic", "test", num_classes=2)


def test_new_datasets_register_by_name():
    @register_dataset("constant")
    def build_constant(split, transform, num_classes, size=3):
        return [(torch.zeros(2), 0)] * size

    try:
        assert len(build_dataset("constant", "train", num_classes=1, size=5)) == 5
    finally:
        del DATASETS["constant"]


def make_folder(root, classes=("a", "b"), per_class=2):
    for split in ("train", "val"):
        for name in classes:
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (8, 8), (i * 50, 0, 0)).save(root / split / name / f"{i}.png")


def test_image_folder_skips_unreadable_images(tmp_path, caplog):
    make_folder(tmp_path)
    (tmp_path / "train" / "b" / "bad.jpg").write_bytes(b"not an image")
    data = build_dataset("imagefolder", "train", root=str(tmp_path), num_classes=2)
    assert data.classes == ["a", "b"] and len(data) == 5
    index = [path for path, _ in data.samples].index(str(tmp_path / "train" / "b" / "bad.jpg"))
    with caplog.at_level(logging.WARNING, logger="atlas.datasets"):
        assert data[index] is None
    assert "skipping unreadable image" in caplog.text and "bad.jpg" in caplog.text

    images, labels, skipped = collate_skip_unreadable([(torch.ones(3), 1), None, (torch.zeros(3), 0)])
    assert images.shape == (2, 3) and labels.tolist() == [1, 0] and skipped == 1
    images, labels, skipped = collate_skip_unreadable([None, None])  # the trainer skips such a batch
    assert len(images) == 0 and labels.shape == (0,) and skipped == 2
    crops, labels, skipped = collate_skip_unreadable([None], stack=False)
    assert crops == [] and labels.shape == (0,) and skipped == 1


def test_image_folder_layout_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"data root {tmp_path / 'nope'} does not exist.*ROOT/train/<class>"):
        build_dataset("imagefolder", "train", root=str(tmp_path / "nope"), num_classes=2)
    (tmp_path / "train").mkdir()
    with pytest.raises(FileNotFoundError, match=f"data folder {tmp_path / 'val'} does not exist"):
        build_dataset("imagefolder", "val", root=str(tmp_path), num_classes=2)
    make_folder(tmp_path / "three", classes=("a", "b", "c"))
    with pytest.raises(ValueError, match="has 3 class folders but data.num_classes is 2"):
        build_dataset("imagefolder", "train", root=str(tmp_path / "three"), num_classes=2)


def test_val_class_folders_must_be_trains_by_name(tmp_path):
    """Labels are the class folders in sorted order: a val split with other folders would shift them silently."""
    make_folder(tmp_path, classes=("cat", "dog", "owl"), per_class=1)
    (tmp_path / "val" / "dog").rename(tmp_path / "val" / "dgo")
    assert build_dataset("imagefolder", "train", root=str(tmp_path), num_classes=3).classes == ["cat", "dog", "owl"]
    with pytest.raises(ValueError, match=r"not those of .*train .*: 1 missing \(dog\), 1 not in train \(dgo\)"):
        build_dataset("imagefolder", "val", root=str(tmp_path), num_classes=3)
    (tmp_path / "val" / "dgo").rename(tmp_path / "val" / "dog")
    val = build_dataset("imagefolder", "val", root=str(tmp_path), num_classes=3)
    assert val.class_to_idx == {"cat": 0, "dog": 1, "owl": 2}
