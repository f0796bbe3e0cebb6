"""The attention explorer (built without a browser: its callbacks are called directly) and its static view."""

import base64

import matplotlib
import numpy as np
import pytest
import torch

from atlas import Atlas
from atlas.viz import AttentionExplorer, plot_attention_view, record_attention, token_colors

matplotlib.use("Agg")

# 64x96 pixels, 16-pixel patches: 4x6 tokens; windows of 2, stride 2 -> scales of 4x6, 2x3 and 1x2 tokens
SMALL = dict(img_size=(64, 96), embed_dim=32, num_heads=2, stem_width=8, num_classes=2, window_size=2, pool_stride=2)


@pytest.fixture
def model():
    return Atlas(depths=(1, 1, 1), **SMALL).eval()


@pytest.fixture
def pixels():
    return np.random.default_rng(0).random((64, 96, 3)).astype(np.float32)


def explorer_for(model, pixels, **kwargs):
    inputs = torch.from_numpy(pixels).permute(2, 0, 1)[None]
    return AttentionExplorer(model, inputs, pixels, **kwargs)


def percentages(fig):
    return [float(ax.get_title().split(": ")[1].split("%")[0]) for ax in fig.axes]


def test_static_view_has_one_panel_per_key_scale_and_the_shares_add_up(model, pixels):
    with torch.no_grad(), record_attention(model) as maps:
        model(torch.from_numpy(pixels).permute(2, 0, 1)[None])
    fig = plot_attention_view(pixels, maps, stage=0, block=0, scale=0, query=(3, 5), head=1)
    assert [ax.get_title().split(":")[0] for ax in fig.axes] == [f"keys at scale {s}" for s in (1, 2, 3)]
    assert abs(sum(percentages(fig)) - 100) <= 2  # each share is rounded to a whole percent
    assert "head 2" in fig._suptitle.get_text() and "(3, 5) at scale 1" in fig._suptitle.get_text()
    fig = plot_attention_view(pixels, maps, stage=0, block=0, scale=1, query=(1, 2), kind="bottom_up")
    assert percentages(fig) == [100.0] and fig.axes[0].get_title().startswith("keys at scale 1")
    assert "mean of the heads" in fig._suptitle.get_text()


def test_explorer_offers_what_each_block_recorded(model, pixels):
    explorer = explorer_for(model, pixels, class_names=["different", "same"])
    assert [value for _, value in explorer.block.options] == [(0, 0), (1, 0), (2, 0)]
    assert [value for _, value in explorer.kind.options] == ["top_down", "bottom_up"]
    assert [value for _, value in explorer.scale.options] == [0, 1, 2]
    assert len(explorer.figure.axes) == 3  # a scale-1 query reads scales 1, 2 and 3
    assert bytes(explorer.view.value).startswith(b"\x89PNG")  # the figure, shown as a picture
    assert len(explorer.grid.children) == 4 * 6

    explorer.scale.value = 1
    assert (explorer.row.max, explorer.col.max) == (1, 2)
    assert len(explorer.grid.children) == 2 * 3 and len(explorer.figure.axes) == 2

    explorer.kind.value = "bottom_up"
    assert [value for _, value in explorer.scale.options] == [1, 2]
    assert explorer.scale.value == 1  # kept: still a valid choice
    assert len(explorer.figure.axes) == 1 and percentages(explorer.figure) == [100.0]

    explorer.block.value = (2, 0)  # the last stage holds only the coarsest scale: top-down self-attention
    assert [value for _, value in explorer.kind.options] == ["top_down"]
    assert [value for _, value in explorer.scale.options] == [2]
    assert (explorer.row.max, explorer.col.max) == (0, 1)

    explorer.head.value = 1
    assert "head 2" in explorer.figure._suptitle.get_text()


def test_clicking_a_grid_cell_selects_its_token(model, pixels):
    explorer = explorer_for(model, pixels)
    cell = explorer.grid.children[1 * 6 + 4]  # row 1, column 4 of the 4x6 token grid
    assert cell.tooltip == "token (1, 4)"
    before = bytes(explorer.view.value)
    cell.click()
    assert (explorer.row.value, explorer.col.value) == (1, 4)
    assert bytes(explorer.view.value) != before  # redrawn
    assert "query token (1, 4) at scale 1" in explorer.figure._suptitle.get_text()
    expected = explorer.maps.query(0, 0, 0, (1, 4))
    assert percentages(explorer.figure) == [round(100 * expected[s].sum()) for s in sorted(expected)]


def test_large_grids_are_subsampled_and_clicks_stay_inside(model, pixels):
    explorer = explorer_for(model, pixels, max_cells=2)  # 4x6 tokens in blocks of 3x3: a 2x2 grid
    assert len(explorer.grid.children) == 4
    assert explorer.grid.layout.grid_template_columns.startswith("repeat(2,")
    assert [cell.tooltip for cell in explorer.grid.children] == [
        "token (1, 1)",
        "token (1, 4)",
        "token (3, 1)",
        "token (3, 4)",  # block middles, clipped to the grid
    ]
    explorer.grid.children[-1].click()
    assert (explorer.row.value, explorer.col.value) == (3, 4)


def test_explorer_shows_as_a_widget_with_a_short_text_fallback(model, pixels):
    bundle = explorer_for(model, pixels)._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert bundle["text/plain"].startswith("attention explorer: 3 blocks, 3 scales, 2 heads")


def test_explorer_stores_a_static_png_of_its_view_and_its_grid_has_no_gaps(model, pixels):
    explorer = explorer_for(model, pixels)
    png = base64.b64decode(explorer._repr_mimebundle_()["image/png"])
    assert png.startswith(b"\x89PNG") and png == explorer.view.value  # the view as drawn now
    explorer.select((1, 2))
    assert base64.b64decode(explorer._repr_mimebundle_()["image/png"]) == explorer.view.value
    assert explorer.view.layout.width == "auto"  # its own size, not the width of the output area
    assert {(cell.layout.margin, cell.layout.padding) for cell in explorer.grid.children} == {("0px", "0px")}
    assert explorer.grid.layout.grid_gap == "0px"


def test_token_colors_average_each_token():
    image = np.zeros((32, 48, 3), dtype=np.float32)
    image[:16, :, 0] = 1.0  # the top half red
    colors = token_colors(image, (2, 3))
    assert colors.shape == (2, 3, 3)
    np.testing.assert_allclose(colors[0, :, 0], 1.0, atol=1e-6)
    np.testing.assert_allclose(colors[1], 0.0, atol=1e-6)
