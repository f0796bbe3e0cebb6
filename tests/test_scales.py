"""Multi-scale layouts: pure arithmetic, checked for big images without allocating them."""

import pytest
import torch

from atlas import AtlasConfig, MultiScaleLayout
from atlas.msa import BlockGeometry
from atlas.scales import map_to_windows, window_key_mask, windows_to_map


@pytest.mark.parametrize(
    ("image", "sides"),
    [(256, [16]), (512, [32, 8]), (1024, [64, 16]), (2048, [128, 32, 8]), (4096, [256, 64, 16])],
)
def test_square_layouts_match_the_spec_table(image, sides):
    layout = AtlasConfig(img_size=image, depths=[1] * len(sides)).layout
    assert [sc.size for sc in layout.scales] == [(s, s) for s in sides]
    for sc in layout.scales[:-1]:
        assert sc.window == (16, 16) and sc.grid == (sc.size[0] // 16,) * 2
    assert layout.scales[-1].num_windows == 1 and layout.scales[-1].window == (sides[-1],) * 2


def test_non_square_layout_pads_and_ends_in_one_window():
    layout = AtlasConfig(img_size=(1000, 3000), depths=(1, 1, 1)).layout
    assert [sc.size for sc in layout.scales] == [(63, 188), (16, 47), (4, 12)]
    assert layout.scales[0].grid == (4, 12) and layout.scales[0].padded
    assert layout.scales[1].grid == (1, 3) and layout.scales[1].padded
    assert layout.scales[2].window == (4, 12) and not layout.scales[2].padded


def test_containing_windows_follow_geometry_and_released_pairing_differs():
    layout = MultiScaleLayout((128, 128))  # 2048px: 8x8, 2x2 and 1 windows
    containing = layout.containing_windows(0, 1)
    rows, cols = torch.arange(64) // 8, torch.arange(64) % 8
    assert torch.equal(containing, (rows // 4) * 2 + cols // 4)
    assert torch.equal(layout.containing_windows(0, 2), torch.zeros(64, dtype=torch.long))
    released = layout.containing_windows(0, 1, "released")
    assert torch.equal(released, torch.arange(64) // 16)
    assert int((released != containing).sum()) == 32
    assert torch.equal(layout.containing_windows(0, 1, "released"), layout.containing_windows(0, 1, "released"))
    with pytest.raises(ValueError, match="routing must be one of"):
        layout.containing_windows(0, 1, "nearest")


def test_window_round_trip_and_mask():
    x = torch.randn(2, 10, 7, 3)
    windows = map_to_windows(x, (4, 4))
    assert windows.shape == (2, 6, 16, 3)
    assert torch.equal(windows_to_map(windows, (4, 4), (10, 7)), x)
    mask = window_key_mask((10, 7), (4, 4))
    assert mask.shape == (6, 16) and int(mask.sum()) == 70
    assert torch.equal(windows.abs().sum(-1) > 0, mask.expand(2, -1, -1))
    assert window_key_mask((8, 8), (4, 4)) is None


def test_describe_lists_every_scale():
    text = MultiScaleLayout((64, 64)).describe()
    assert "64x64" in text and "16x16" in text and len(text.splitlines()) == 3


def test_top_down_key_mask_is_the_stored_mask_or_all_keys_real():
    """BlockGeometry.top_down_key_mask: the padding mask where one is stored, else every key of the windows read."""
    for layout in (MultiScaleLayout((16, 16), 4, 2), MultiScaleLayout((22, 26), 4, 2)):
        for first in range(layout.num_scales):
            geo = BlockGeometry.build(layout, first, "containing", top_down=True)
            for l, stored in enumerate(geo.top_down_masks):
                mask = geo.top_down_key_mask(l)
                keys = sum(sc.tokens_per_window for sc in geo.scales[l:])
                assert mask.shape == (geo.scales[l].num_windows, keys) and mask.dtype == torch.bool
                assert torch.equal(mask, stored) if stored is not None else bool(mask.all())
        no_top_down = BlockGeometry.build(layout, 0, "containing", top_down=False)
        assert no_top_down.top_down_key_mask(0).shape == (
            layout.scales[0].num_windows,
            layout.scales[0].tokens_per_window,
        )
