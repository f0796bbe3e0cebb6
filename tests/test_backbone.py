"""Atlas as a timm backbone: feature_info, features_only, forward_intermediates, pruning, pooling, data config."""

import pytest
import timm
import torch
from timm.data import resolve_data_config

import atlas  # noqa: F401  (registers the models)

TINY = dict(num_classes=3, window_size=4, pool_stride=2)


def tiny(img_size, depths, **kwargs):
    return timm.create_model("atlas_tiny_patch16", img_size=img_size, depths=depths, **TINY, **kwargs)


@pytest.mark.parametrize(
    ("size", "depths"), [((128, 96), (1, 1)), ((200, 136), (1, 1, 1))], ids=["2 scales", "3 scales padded"]
)
def test_intermediates_are_each_scale_after_its_last_stage(size, depths):
    model = tiny(size, depths).eval()
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        features = model.forward_intermediates(x, intermediates_only=True)
        final, again = model.forward_intermediates(x)
        _, stages = model.forward_stages(x)
        logits = model(x)
    assert len(features) == len(depths) == len(model.feature_info)
    for i, (feature, info) in enumerate(zip(features, model.feature_info, strict=True)):
        stride = info["reduction"]
        assert stride == 16 * 2**i and info["num_chs"] == 192
        assert feature.shape == (2, 192, -(-size[0] // stride), -(-size[1] // stride))
        torch.testing.assert_close(feature.permute(0, 2, 3, 1), stages[i][0])
        torch.testing.assert_close(again[i], feature)
    torch.testing.assert_close(model.forward_head(final), logits)
    nhwc = model.forward_intermediates(x, indices=[0], output_fmt="NHWC", intermediates_only=True)
    torch.testing.assert_close(nhwc[0], features[0].permute(0, 2, 3, 1))
    with pytest.raises(ValueError, match="output_fmt"):
        model.forward_intermediates(x, output_fmt="NLC")


def test_features_only_builds_timms_getter_and_prunes_what_no_feature_needs():
    model = tiny((200, 136), (1, 1, 1), features_only=True, out_indices=(0, 1)).eval()
    assert type(model).__name__ == "FeatureGetterNet"
    assert model.feature_info.reduction() == [16, 32] and model.feature_info.channels() == [192, 192]
    assert len(model.model.stages) == 2 and isinstance(model.model.head, torch.nn.Identity)  # stage 3 pruned
    full = tiny((200, 136), (1, 1, 1)).eval()
    full.load_state_dict(model.model.state_dict(), strict=False)
    x = torch.randn(1, 3, 200, 136)
    with torch.no_grad():
        got, want = model(x), full.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)


def test_the_readme_backbone_builds_at_2048x1536_grey():
    """The issue's example, on the meta device (no weights allocated): per-scale maps at strides 16, 64, 256."""
    with torch.device("meta"):
        model = timm.create_model("atlas_small_patch16", img_size=(2048, 1536), in_chans=1, features_only=True)
        features = model(torch.empty(1, 1, 2048, 1536))
    assert [tuple(f.shape) for f in features] == [(1, 384, 128, 96), (1, 384, 32, 24), (1, 384, 8, 6)]
    assert model.feature_info.reduction() == [16, 64, 256]
    assert resolve_data_config({}, model=model)["input_size"] == (1, 2048, 1536)


def test_global_pool_no_weight_decay_and_data_config():
    model = tiny((128, 96), (1, 1), global_pool="")
    x = torch.randn(2, 3, 128, 96)
    assert model(x).shape == (2, 4 * 3, 3)  # every token of the 4x3 coarsest scale, classified
    model.reset_classifier(5, global_pool="avg")
    assert model(x).shape == (2, 5) and model.config.global_pool == "avg"
    with pytest.raises(ValueError, match="global_pool"):
        model.reset_classifier(5, global_pool="max")
    assert model.no_weight_decay() == set()
    assert resolve_data_config({}, model=model)["input_size"] == (3, 128, 96)
    with pytest.raises(ValueError, match="global_pool"):
        tiny((128, 96), (1, 1), global_pool="token")
