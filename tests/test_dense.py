"""What notebook 08 (dense prediction) relies on: a small Atlas's per-scale maps, and who sees the far bar."""

import timm
import torch

import atlas  # noqa: F401  (registers the models)

# The notebook's backbone (narrower): 64px images, 4x4-pixel tokens, windows of 4x4 tokens, one block per stem stage.
MODEL = dict(
    img_size=64, patch_size=4, window_size=4, pool_stride=4, embed_dim=32, num_heads=4, stem_width=8, stem_depth=1
)
BAR = 16  # the notebook's bar width in pixels: one column of windows


def test_features_only_gives_the_fine_and_the_coarse_map_of_forward_intermediates():
    torch.manual_seed(0)
    backbone = timm.create_model("atlas_tiny_patch16", depths=(2, 1), features_only=True, **MODEL).eval()
    assert backbone.feature_info.reduction() == [4, 16] and backbone.feature_info.channels() == [32, 32]
    full = timm.create_model("atlas_tiny_patch16", depths=(2, 1), **MODEL).eval()
    full.load_state_dict(backbone.model.state_dict(), strict=False)  # the getter pruned only the classifier
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        got, want = backbone(x), full.forward_intermediates(x, intermediates_only=True)
    assert [tuple(f.shape) for f in got] == [(2, 32, 16, 16), (2, 32, 4, 4)]
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)


def pixels_behind(feature_map_of, row: int, col: int) -> torch.Tensor:
    """``(64, 64)`` bool: the input pixels that token ``(row, col)`` of the finest map depends on (by gradients)."""
    x = torch.randn(1, 3, 64, 64, requires_grad=True)
    feature_map_of(x)[0, :, row, col].abs().sum().backward()
    return x.grad[0].abs().sum(0) > 0


def test_the_fine_map_over_one_bar_sees_the_other_bar_with_msa_only():
    """Window attention's finest map over the left bar is blind to the right bar; MSA's (top-down) is not."""
    torch.manual_seed(0)
    window = timm.create_model("atlas_tiny_patch16", depths=(3,), multiscale=False, features_only=True, **MODEL)
    msa = timm.create_model("atlas_tiny_patch16", depths=(2, 1), features_only=True, **MODEL)
    for model in (window.eval(), msa.eval()):
        assert model.feature_info.reduction()[0] == 4
    for row in (0, 7, 15):
        for col in (0, 3, 12, 15):  # tokens on the left bar (columns 0-3) and on the right bar (12-15)
            far = slice(64 - BAR, 64) if col < 8 else slice(0, BAR)
            assert not pixels_behind(lambda x: window(x)[0], row, col)[:, far].any()
            assert pixels_behind(lambda x: msa(x)[0], row, col)[:, far].any()
