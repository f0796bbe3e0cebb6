"""Attention maps: recorded on request only, and each one a distribution over what the query may read; routes
closed on request only, and closing them is what the switches do."""

import matplotlib
import numpy as np
import torch

from atlas import Atlas
from atlas.viz import cut_routes, plot_attention, plot_scales, record_attention

matplotlib.use("Agg")

TINY = dict(embed_dim=32, num_heads=2, stem_width=8, num_classes=5, window_size=4, pool_stride=2)


def test_recording_is_off_by_default_and_changes_nothing():
    model = Atlas(img_size=(160, 224), **TINY).eval()
    x = torch.randn(1, 3, 160, 224)
    with torch.no_grad():
        plain = model(x)
        with record_attention(model) as maps:
            recorded = model(x)
        after = model(x)
    torch.testing.assert_close(recorded, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(after, plain)
    assert all(m.records is None for m in model.modules() if hasattr(m, "records"))
    n = maps.layout.num_scales
    assert n == 3
    kinds = {(stage, kind) for stage, _, kind, _ in maps.keys()}
    assert kinds == {(0, "top_down"), (0, "bottom_up"), (1, "top_down"), (1, "bottom_up"), (2, "top_down")}


def test_query_maps_sum_to_one_and_respect_windows():
    model = Atlas(img_size=(160, 224), **TINY).eval()
    with torch.no_grad(), record_attention(model) as maps:
        model(torch.randn(1, 3, 160, 224))
    layout = maps.layout
    grids = maps.query(stage=0, block=0, scale=0, query=(5, 6), head=1)
    assert set(grids) == {0, 1, 2}
    assert abs(sum(g.sum() for g in grids.values()) - 1) < 1e-5
    # scale 0: only the query's own 4x4 window (rows 4-7, cols 4-7) is read
    nonzero = np.argwhere(grids[0] > 0)
    assert (nonzero.min(0) >= 4).all() and (nonzero.max(0) <= 7).all()
    # scale 1: the window containing token (5, 6) // 2 = (2, 3), i.e. rows 0-3, cols 0-3
    nonzero = np.argwhere(grids[1] > 0)
    assert (nonzero.max(0) <= 3).all()
    up = maps.query(stage=0, block=0, scale=1, query=(2, 3), kind="bottom_up")
    assert set(up) == {0} and abs(up[0].sum() - 1) < 1e-5
    assert (np.argwhere(up[0] > 0).min(0) >= 4).all() and (np.argwhere(up[0] > 0).max(0) <= 7).all()
    fig = plot_attention(np.zeros((160, 224, 3)), grids, 0, (5, 6), layout)
    assert len(fig.axes) == 3
    fig = plot_scales(np.zeros((160, 224)), layout)
    assert len(fig.axes) == 3


def _tiny_atlas(**switches):
    torch.manual_seed(0)
    kwargs = dict(img_size=64, patch_size=4, window_size=4, pool_stride=4, embed_dim=32, num_heads=2, stem_width=8)
    return Atlas(stem_depth=1, depths=(2, 1), num_classes=2, **kwargs, **switches)


def test_cut_routes_without_a_cut_is_the_model_and_leaves_it_as_it_was():
    model = _tiny_atlas().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        with cut_routes(model):
            torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
        with cut_routes(model, bottom_up=False):
            assert not torch.equal(model(x), expected)  # the cut changes the answer ...
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)  # ... only while the context is open
    assert "geometry" not in vars(model) and all(b.bottom_up for s in model.stages for b in s.blocks)


def test_closing_every_coarse_key_is_the_model_without_top_down():
    model, without = _tiny_atlas().eval(), _tiny_atlas(top_down=False).eval()
    without.load_state_dict(model.state_dict())  # top-down adds no weights: the same model, one switch apart
    x = torch.randn(2, 3, 64, 64)

    def close_top_down(stage, masks):
        for l, mask in enumerate(masks):
            mask[:, model.config.layout.scales[stage + l].tokens_per_window :] = False

    with torch.no_grad(), cut_routes(model, close_top_down):
        torch.testing.assert_close(model(x), without(x))
    with torch.no_grad():
        assert not torch.allclose(model(x), without(x))
