"""The block compositions of the paper's Table 5: Atlas (the default), a stack, convolutional down-sampling."""

import pytest
import timm
import torch

from atlas import Atlas
from atlas.scales import build_pyramid, map_to_tokens

# 16x16 tokens at 256px: windows of 4 and pooling by 2 give scales of 16, 8 and 4 tokens per side.
TINY = dict(embed_dim=32, num_heads=2, stem_width=8, num_classes=5, window_size=4, pool_stride=2)


def all_parameters_get_a_gradient(model: Atlas, x: torch.Tensor) -> list[str]:
    model(x).sum().backward()
    return [name for name, p in model.named_parameters() if p.grad is None]


def test_stack_runs_one_stage_over_every_scale_and_reads_out_all_of_them():
    torch.manual_seed(0)
    model = Atlas(img_size=256, composition="stack", depths=(2,), **TINY).eval()
    assert len(model.stages) == 1 and [len(b.scales) for b in model.stages[0].blocks] == [3, 3]
    assert model.config.readout == "all_scales"
    x = torch.randn(2, 3, 256, 256)
    with torch.no_grad():
        _, (maps,) = model.forward_stages(x)
        assert [m.shape[1:3] for m in maps] == [(16, 16), (8, 8), (4, 4)]
        # Every token of every scale, normalised, averaged with equal weight per token.
        tokens_bnc = model.readout_norm(torch.cat([m.reshape(2, -1, 32) for m in maps], dim=1))
        expected = model.head(model.fc_norm(tokens_bnc.mean(dim=1)))
        torch.testing.assert_close(model(x), expected)


def test_a_one_stage_conv_composition_is_a_stack_read_out_at_its_coarsest_scale():
    torch.manual_seed(0)
    conv = Atlas(img_size=256, composition="conv_downsample", depths=(2,), **TINY).eval()
    stack = Atlas(img_size=256, composition="stack", depths=(2,), readout="coarsest", **TINY).eval()
    stack.load_state_dict(conv.state_dict())
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        torch.testing.assert_close(conv(x), stack(x), rtol=0, atol=0)


def test_conv_downsample_halves_the_finest_map_and_rebuilds_its_scales_after_each_stage():
    torch.manual_seed(0)
    model = Atlas(img_size=256, composition="conv_downsample", depths=(1, 1, 1), **TINY).eval()
    assert [len(s.blocks[0].scales) for s in model.stages] == [3, 2, 1]
    assert [s.downsample is not None for s in model.stages] == [True, True, False]
    assert [f["reduction"] for f in model.feature_info] == [16, 32, 64]
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        _, outputs = model.forward_stages(x)
        assert [[m.shape[1:3] for m in maps] for maps in outputs] == [
            [(16, 16), (8, 8), (4, 4)],
            [(8, 8), (4, 4)],
            [(4, 4)],
        ]
        # Stage 2 reads the halved finest map of stage 1 and the scales pooled from it, nothing else.
        plan = model.config.stage_plan((256, 256))
        halved = model.stages[0].downsample(outputs[0][0].permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        stage2 = model.stages[1](build_pyramid(halved, plan[1][0]), model.geometry(plan, x.device)[1])
        torch.testing.assert_close(stage2, outputs[1])
        torch.testing.assert_close(model(x), model.forward_head(map_to_tokens(outputs[-1][-1])))
    # Non-square and padded sizes run through every stage.
    assert model(torch.randn(1, 3, 200, 136)).shape == (1, 5)


@pytest.mark.parametrize(
    "composition, switches",
    [
        ("stack", dict()),
        ("stack", dict(top_down=False)),
        ("stack", dict(bottom_up=False)),
        ("stack", dict(top_down=False, bottom_up=False)),
        ("stack", dict(readout="coarsest")),
        ("conv_downsample", dict()),
        ("conv_downsample", dict(bottom_up=False)),
        ("conv_downsample", dict(multiscale=False)),
        ("atlas", dict(bottom_up=False)),
    ],
)
def test_every_built_weight_gets_a_gradient(composition, switches):
    """What distributed training needs: no weight whose output nothing reads (DDP would wait for it)."""
    depths = (2,) if composition == "stack" else (2, 2, 2)
    model = Atlas(img_size=256, composition=composition, depths=depths, **TINY, **switches)
    assert all_parameters_get_a_gradient(model, torch.randn(1, 3, 256, 256)) == []


def test_the_last_block_before_conv_down_sampling_skips_the_bottom_up_pass_nothing_reads():
    model = Atlas(img_size=256, composition="conv_downsample", depths=(2, 2, 2), **TINY)
    assert [[b.bottom_up for b in s.blocks] for s in model.stages] == [[True, False], [True, False], [True, True]]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(composition="pyramid"), "composition must be one of"),
        (dict(composition="stack", depths=(2, 2)), "runs one stage over all scales"),
        (dict(composition="stack", depths=(2,), readout="coarsest", bottom_up=False), "use readout='all_scales'"),
        (dict(composition="conv_downsample", top_down=False), "use top_down=True or multiscale=False"),
        (dict(readout="mean"), "readout must be one of"),
        (dict(depths=(2,)), "for each of the 3 scales"),
    ],
)
def test_bad_compositions_say_what_is_accepted(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Atlas(img_size=256, **{**TINY, **kwargs})


@pytest.mark.parametrize("composition, strides", [("stack", [16, 32, 64]), ("conv_downsample", [16, 32, 64, 128])])
def test_features_only_follows_the_composition(composition, strides):
    depths = (2,) if composition == "stack" else (1, 1, 1, 1)
    backbone = timm.create_model(
        "atlas_tiny_patch16", img_size=256, composition=composition, depths=depths, features_only=True, **TINY
    )
    assert backbone.feature_info.reduction() == strides
    features = backbone(torch.randn(1, 3, 256, 256))
    assert [f.shape[-2:] for f in features] == [(256 // s, 256 // s) for s in strides]
