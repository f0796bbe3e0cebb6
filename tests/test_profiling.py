"""FLOP counting on the meta device and training memory on fake tensors (atlas.profiling): exact counts for known
layers, Atlas's breakdown, scaling, what attention kernels keep."""

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import atlas  # noqa: F401  (registers the Atlas models with timm)
from atlas.profiling import (
    EXTRA_FLOP_FORMULAS,
    _LiveBytes,
    atlas_flops_breakdown,
    build_model,
    check_model_name,
    count_flops,
    training_peak_bytes,
)


def test_linear_flops_are_two_per_multiply_add_per_token():
    assert count_flops(nn.Linear(7, 3), (2, 5, 7)) == 2 * 7 * 3 * (2 * 5)


def test_backward_of_a_linear_costs_its_weight_gradient():
    """No gradient for the input is needed, so backward is one more matrix product of the forward's size."""
    forward = count_flops(nn.Linear(7, 3), (2, 5, 7))
    assert count_flops(nn.Linear(7, 3), (2, 5, 7), backward=True) == 2 * forward


def test_conv_flops():
    conv = nn.Conv2d(4, 8, 3, stride=2, padding=1)
    assert count_flops(conv, (1, 4, 10, 10)) == 2 * (4 * 9) * 8 * (5 * 5)


@pytest.mark.parametrize("device", ["meta", "cpu"])
def test_vit_flops_match_the_formula_on_meta_and_cpu(device):
    """Patch embedding + per block (qkv, proj, 2-layer MLP: 12 C^2 per token, attention 4 N^2 C) + head."""
    c, n, depth, classes = 48, 16, 2, 10
    vit = VisionTransformer(
        img_size=64, patch_size=16, embed_dim=c, depth=depth, num_heads=2, num_classes=classes,
        class_token=False, global_pool="avg",
    )  # fmt: skip
    patch_embed = 2 * (3 * 16 * 16) * c * n
    blocks = depth * (2 * n * 12 * c * c + 4 * n * n * c)
    assert count_flops(vit, (1, 3, 64, 64), device) == patch_embed + blocks + 2 * c * classes


def test_atlas_total_is_stem_plus_blocks_plus_head():
    model = build_model("atlas_tiny_patch16", (512, 512), num_classes=10)
    parts = atlas_flops_breakdown(model, (1, 3, 512, 512))
    assert parts["stem"] == count_flops(model.stem, (1, 3, 512, 512))
    assert parts["head"] == 2 * model.embed_dim * 10
    assert parts["blocks"] > 0
    assert parts["stem"] + parts["blocks"] + parts["head"] == parts["total"]


@pytest.mark.parametrize("device", ["meta", "cpu"])
def test_counting_leaves_the_model_untouched(device):
    model = build_model("atlas_tiny_patch16", (64, 64)).train()
    running_mean = model.stem.embed[1].running_mean.clone()
    count_flops(model, (2, 3, 64, 64), device, backward=True)
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(model.stem.embed[1].running_mean, running_mean)


def test_vit_grows_quadratically_in_tokens_and_atlas_linearly():
    """From 2048px to 4096px the token count grows 4x: ViT's FLOPs grow ~16x (attention), Atlas's ~4x."""

    def growth(name: str) -> float:
        small, large = (count_flops(build_model(name, (s, s), device="meta"), (1, 3, s, s)) for s in (2048, 4096))
        return large / small

    assert growth("vit_tiny_patch16_224") > 13
    assert 3.8 < growth("atlas_tiny_patch16") < 4.2


def test_build_model_passes_img_size_only_to_models_that_take_it():
    vit = build_model("vit_tiny_patch16_224", (64, 128), device="meta")
    assert vit.patch_embed.grid_size == (4, 8)
    assert next(vit.parameters()).device.type == "meta"
    convnext = build_model("convnext_atto", (64, 128), device="meta")
    assert count_flops(convnext, (1, 3, 64, 128)) > 0


def test_unknown_model_names_suggest_close_ones():
    with pytest.raises(ValueError, match="atlas_base_patch16"):
        check_model_name("atlas_base_patch_16")
    check_model_name("atlas_base_patch16")
    assert timm.is_model("atlas_small_patch16")


def test_cpu_fused_attention_is_counted():
    """PyTorch's own table misses the CPU kernel: (B=1, heads=2, T=8, d=4) costs 2 matmuls of 2*T*T*d each."""
    q = torch.randn(1, 2, 8, 4)
    with FlopCounterMode(display=False, custom_mapping=EXTRA_FLOP_FORMULAS) as counter:
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, q, q)
    assert counter.get_total_flops() == 4 * 2 * 8 * 8 * 4


def test_live_bytes_counts_each_storage_once_and_only_while_it_lives():
    with _LiveBytes() as memory:
        x = torch.zeros(1000)
        memory.hold(x)
        y = x.view(10, 100)  # a view: no new storage
        assert memory.live == 4000
        z = x * 2
        assert (memory.live, memory.peak) == (8000, 8000)
        del z
        assert memory.live == 4000
        w = y + 1
        assert (memory.live, memory.peak) == (8000, 8000)
    del w


def test_math_attention_keeps_the_weights_and_the_fused_kernel_does_not():
    """ViT-Ti/16 at 1024px: 12 layers keep softmax(q k^T) of 3 heads x 4097^2 for backward, 2.4 GB in float32;
    the fused kernel keeps a few MB per layer instead."""
    vit = build_model("vit_tiny_patch16_224", (1024, 1024), device="meta")
    weights = 12 * 3 * 4097**2 * 4
    math = training_peak_bytes(vit, (1, 3, 1024, 1024), attention="math")
    fused = training_peak_bytes(vit, (1, 3, 1024, 1024), attention="fused")
    assert math > weights > 2 * fused


def test_training_peak_bytes_counts_weights_gradients_and_kept_activations():
    """Linear -> ReLU -> Linear on a batch of 512: more than the weights and the input and hidden layer kept for
    backward; not more than that plus the weights' gradients and two hidden-sized gradients in flight (the
    gradient reaching the ReLU and the one leaving it)."""
    mlp = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 64))
    weights = 4 * sum(p.numel() for p in mlp.parameters())
    hidden = 4 * 512 * 256
    kept = 4 * 512 * 64 + hidden
    peak = training_peak_bytes(mlp, (512, 64))
    assert weights + kept < peak <= 2 * weights + kept + 2 * hidden
    assert training_peak_bytes(mlp.to("meta"), (512, 64)) == peak, "the weights' device does not matter"


def test_training_peak_bytes_rejects_unknown_kernels():
    with pytest.raises(ValueError, match="attention must be one of"):
        training_peak_bytes(nn.Linear(2, 2), (1, 2), attention="flash")
