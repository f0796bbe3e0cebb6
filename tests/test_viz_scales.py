"""The photographs the notebooks draw scales and windows on."""

import numpy as np
import pytest

from atlas.viz import load_photo


def test_photo_is_rgb_in_unit_range_at_the_requested_size():
    photo = load_photo("coffee", (200, 296))
    assert photo.shape == (200, 296, 3) and photo.dtype == np.float32
    assert 0 <= photo.min() and photo.max() <= 1
    assert photo.std() > 0.05  # a picture, not a constant


def test_original_size_is_kept_and_grey_images_get_three_channels():
    assert load_photo("astronaut").shape == (512, 512, 3)
    grey = load_photo("camera", (64, 64))
    assert grey.shape == (64, 64, 3)
    np.testing.assert_array_equal(grey[..., 0], grey[..., 2])


def test_unknown_photo_is_an_error():
    with pytest.raises(AttributeError):
        load_photo("no_such_photo")
