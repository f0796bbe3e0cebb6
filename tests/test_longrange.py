"""The long-range matching task: deterministic, balanced, and only solvable by comparing far-apart sides."""

import itertools

import matplotlib
import numpy as np
import pytest
import timm
import torch

import atlas  # noqa: F401  (registers the Atlas models with timm)
from atlas.datasets import build_dataset
from atlas.longrange import PALETTE, LongRangeMatch, build_longrange, plot_examples
from atlas.scales import map_to_windows

matplotlib.use("Agg")

# The module's default geometry: 64px images, 4x4-pixel tokens, windows of 4x4 tokens, the paper's stem; narrower
# than the demo's models (which pixels a token depends on does not depend on the width).
ATLAS = dict(img_size=64, patch_size=4, window_size=4, pool_stride=4, embed_dim=16, num_heads=2, stem_width=4)
# The demo's table (scripts/configs/demo/_atlas.yaml): 32px images with 4px bars, one residual block per stem stage,
# coarse tokens that pool 2x2 fine tokens.
DEMO = {**ATLAS, "img_size": 32, "stem_depth": 1, "pool_stride": 2}
GEOMETRIES = {
    "default 64px": (ATLAS, {}, (2,), (1, 1)),
    "demo 32px": (DEMO, dict(image_size=32, bar_width=4), (3,), (2, 1)),
}


def test_samples_are_deterministic_per_seed_split_and_index():
    train = LongRangeMatch("train", 16)
    again = LongRangeMatch("train", 16)
    for index in (7, 3, 0):  # any order
        image, label = train.image(index)
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8
        assert np.array_equal(image, again.image(index)[0]) and label == again.image(index)[1]
    assert not np.array_equal(train.image(0)[0], LongRangeMatch("val", 16).image(0)[0])
    assert not np.array_equal(train.image(0)[0], LongRangeMatch("train", 16, seed=1).image(0)[0])
    with pytest.raises(IndexError):
        train.image(16)


@pytest.mark.parametrize("num_colors", [2, 4])
def test_classes_are_balanced_and_one_side_alone_is_uninformative(num_colors):
    ds = LongRangeMatch("train", 4000, num_colors=num_colors)
    scenes = [ds.scene(i) for i in range(len(ds))]
    labels = np.array([s.label for s in scenes])
    assert labels.sum() == len(ds) // 2
    for side in (0, 1):  # the colour of either bar has the same (uniform) distribution in both classes
        colors = np.array([s.colors[side] for s in scenes])
        for label in (0, 1):
            freq = np.bincount(colors[labels == label], minlength=num_colors) / (len(ds) // 2)
            np.testing.assert_allclose(freq, 1 / num_colors, atol=0.04)


def test_bars_lie_along_the_left_and_right_sides_in_their_palette_colours():
    ds = LongRangeMatch("val", 32, num_colors=4)
    w, n = ds.bar_width, ds.image_size
    for index in range(len(ds)):
        scene = ds.scene(index)
        image = ds.render(scene)
        for color, columns in zip(scene.colors, (slice(0, w), slice(n - w, n)), strict=True):
            assert (image[:, columns] == np.round(PALETTE[color] * 255)).all()
        middle = image[:, w : n - w].reshape(-1, 3).astype(int)
        assert (middle.max(1) - middle.min(1)).max() < 100  # grey noise only: no bar colour away from the sides


def test_recoloring_one_bar_flips_the_label_and_changes_only_its_side():
    ds = LongRangeMatch("train", 32, num_colors=3)
    for index in range(len(ds)):
        scene = ds.scene(index)
        left = scene.colors[0]
        other = scene.recolor(1, (left + 1) % 3 if scene.label else left)
        assert other.label == 1 - scene.label
        changed_columns = np.argwhere((ds.render(scene) != ds.render(other)).any(-1))[:, 1]
        assert len(changed_columns) > 0 and changed_columns.min() >= ds.image_size - ds.bar_width


def test_a_resampling_split_draws_new_images_every_epoch_and_a_fixed_one_does_not():
    train = build_longrange("train", None, train_size=8, resample_train=True)
    val = build_longrange("val", None, val_size=8, resample_train=True)
    first = [train.image(i)[0] for i in range(8)]
    labels = [train.image(i)[1] for i in range(8)]
    fixed = [val.image(i)[0] for i in range(8)]

    train.set_epoch(1), val.set_epoch(1)
    assert all((train.image(i)[0] != first[i]).any() for i in range(8))  # new noise (and maybe new colours)
    assert [train.image(i)[1] for i in range(8)] == labels  # labels still alternate: still balanced
    assert all((val.image(i)[0] == fixed[i]).all() for i in range(8))  # validation never changes
    again = LongRangeMatch("train", 8, resample=True)
    again.set_epoch(1)
    assert all((again.image(i)[0] == train.image(i)[0]).all() for i in range(8))  # deterministic per epoch
    train.set_epoch(0)
    assert all((train.image(i)[0] == first[i]).all() for i in range(8))


@pytest.mark.parametrize("num_colors", [2, 3, 4])
def test_no_threshold_on_left_plus_right_evidence_beats_three_in_four(num_colors):
    """The module docstring's bound on what the averaging classifier can do without comparing the sides.

    Searches every rule "same iff g(left colour) + h(right colour) >= t" (or its negation) with integer scores
    in [0, num_colors), weighting each colour pair by its probability in the task: 1/2 that the pair is the
    same, then uniform (test_classes_are_balanced_... checks that the generator draws them so).
    """
    k = num_colors
    same = np.eye(k, dtype=bool)
    prob = np.where(same, 1 / (2 * k), 1 / (2 * k * (k - 1)))
    scores = np.array(list(itertools.product(range(k), repeat=k)))  # (k^k, k): every g (and every h)
    sums = scores[:, None, :, None] + scores[None, :, None, :]  # (g, h, left, right)
    best = 0.0
    for t in range(2 * k):
        correct = ((sums >= t) == same) * prob
        accuracy = correct.sum((2, 3))
        best = max(best, accuracy.max(), (1 - accuracy).max())
    assert best == pytest.approx(3 / 4)


def pixels_seen(outputs_of, count: int, size: int) -> np.ndarray:
    """``(count, size, size)`` bool: the input pixels output ``i`` depends on, found by gradients.

    ``outputs_of(images)`` maps a ``(count, 3, size, size)`` batch to ``(count, count, ...)`` outputs; output ``i``
    of image ``i`` is back-propagated (the models are in eval mode, so the images of a batch are independent).
    """
    images = torch.randn(count, 3, size, size, requires_grad=True)
    outputs = outputs_of(images)
    outputs[torch.arange(count), torch.arange(count)].abs().sum().backward()
    return images.grad.abs().sum(1).numpy() > 0


def sees_both_bars(seen: np.ndarray, width: int) -> np.ndarray:
    """Per output: whether it depends on pixels of both the left and the right bar."""
    return seen[:, :, :width].any((1, 2)) & seen[:, :, -width:].any((1, 2))


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_window_attention_never_sees_both_bars_but_msa_does(geometry):
    """The claim of the module docstring: stem + window attention is blind to one bar, MSA's coarse tokens are not."""
    model_kwargs, task, window_depths, msa_depths = GEOMETRIES[geometry]
    width, size = LongRangeMatch("train", 1, **task).bar_width, model_kwargs["img_size"]
    window_model = timm.create_model("atlas_tiny_patch16", multiscale=False, depths=window_depths, **model_kwargs)
    (scale,) = window_model.eval().config.layout.scales

    def windows(images):  # the tokens of every window after all window-attention blocks, before the readout
        return map_to_windows(window_model.forward_stages(images)[1][-1][0], scale.window)  # (B, nW, 16, C)

    seen = pixels_seen(windows, scale.num_windows, size)
    window_pixels = (4 * scale.window[0]) ** 2
    assert seen.sum((1, 2)).min() > 2 * window_pixels  # each window sees beyond its own pixels, through the stem
    assert not sees_both_bars(seen, width).any()

    msa_model = timm.create_model("atlas_tiny_patch16", depths=msa_depths, **model_kwargs).eval()
    coarse = msa_model.config.layout.scales[-1]
    assert msa_model.config.layout.num_scales == 2
    seen = pixels_seen(msa_model.forward_features, coarse.num_tokens, size)  # the coarse tokens the readout averages
    assert sees_both_bars(seen, width).all()


def test_registered_in_the_dataset_registry():
    ds = build_dataset("longrange", "val", None, num_classes=2, val_size=6, image_size=64)
    assert len(ds) == 6
    image, label = ds[3]
    assert image.size == (64, 64) and label == 1
    with pytest.raises(ValueError, match="2 classes"):
        build_dataset("longrange", "val", None, num_classes=3)


def test_plot_examples_draws_labelled_images_with_windows():
    import matplotlib.pyplot as plt

    ds = LongRangeMatch("train", 8)
    layout = timm.create_model("atlas_tiny_patch16", **ATLAS).config.layout
    fig = plot_examples(ds, num=6, cols=4, layout=layout)
    titled = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in titled] == [f"#{i}: {'same' if i % 2 else 'different'}" for i in range(6)]
    assert all(len(ax.images) == 1 and len(ax.lines) == 10 for ax in titled)  # 5 + 5 window borders
    plt.close(fig)
