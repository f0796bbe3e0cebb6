"""Atlas on a CUDA GPU: agreement with a float64 reference, fused attention kernels, no host-device sync in a
forward pass, and ``torch.compile(fullgraph=True)``.

Every test is skipped without a GPU. Run them with ``pytest -m cuda tests/test_cuda.py`` (scripts/gpu_check.py
does). Errors are relative to the reference (their definitions are next to the tolerances).
"""

import copy
from dataclasses import dataclass

import pytest
import timm
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import atlas  # noqa: F401  (registers the Atlas models with timm)

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# Relative errors allowed against the float64 CPU reference. Every test passed with them on one H200 (torch 2.11,
# CUDA 13.0) in both runs of `make gpu-check` on 2026-12-04; the errors themselves were not recorded.
# Outputs (eval mode): max |x - ref| / max |ref|. fp32 runs with TF32 off: kernels and summation order differ,
# nothing more; bf16 keeps 8 mantissa bits (a rounding of up to 0.4%) in every block.
OUTPUT_RTOL = {"fp32": 1e-3, "bf16": 5e-2}
# Gradients (training mode) are not compared entry by entry: rounding can flip which input a max-pool picks (the
# scales are max-pooled) or which side of zero a ReLU input falls, which moves single entries by their whole size,
# and some gradients are sums that cancel (a convolution's bias before a batch norm has none at all). Compared
# instead: all parameters' gradients as one vector, ||g - ref|| / ||ref||, and the median over parameters of each
# one's ||g - ref|| / ||ref||, which a wrong kernel would move for most parameters at once.
GRAD_RTOL = {"fp32": 2e-2, "bf16": 2.5e-1}
GRAD_MEDIAN_RTOL = {"fp32": 1e-4, "bf16": 5e-2}
COMPILE_RTOL = 1e-3  # inductor's fused kernels against eager, both fp32 with TF32 off
NUM_CLASSES = 10

# name -> (model, image side, batch, constructor overrides): Atlas-T at two and three scales, Atlas-S and -B with
# one block per stage and one residual block per stem stage, so that the float64 CPU reference stays quick.
CASES = {
    "tiny-512": ("atlas_tiny_patch16", 512, 2, {}),
    "tiny-2048": ("atlas_tiny_patch16", 2048, 1, {"depths": (1, 1, 1), "stem_depth": 1}),
    "small-512": ("atlas_small_patch16", 512, 1, {"depths": (1, 1), "stem_depth": 1}),
    "base-512": ("atlas_base_patch16", 512, 1, {"depths": (1, 1), "stem_depth": 1}),
}
SIZES = {"square": (512, 512), "padded": (520, 776)}  # 520x776: 33x49 tokens, not a multiple of the window
FUSED = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]


def relative_error(x: torch.Tensor, reference: torch.Tensor) -> float:
    """``max |x - reference| / max |reference|``, computed in float64 on the CPU."""
    return ((x.detach().cpu().double() - reference).abs().max() / reference.abs().max()).item()


def gradient_errors(grads: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> tuple[float, float]:
    """Relative error in norm of all gradients as one vector, and the median of each parameter's."""
    pairs = [(grads[name].detach().cpu().double(), ref) for name, ref in reference.items()]
    per_parameter = torch.stack([(g - ref).norm() / ref.norm() for g, ref in pairs])
    diff = torch.cat([(g - ref).flatten() for g, ref in pairs])
    whole = diff.norm() / torch.cat([ref.flatten() for _, ref in pairs]).norm()
    return whole.item(), per_parameter.nanmedian().item()  # NaN: a gradient that is 0 in both


@pytest.fixture
def ieee_fp32():
    """fp32 matrix products and convolutions without TF32 (cuDNN convolutions use it by default), then restored."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def build(name: str, size, **overrides) -> torch.nn.Module:
    return timm.create_model(name, img_size=size, num_classes=NUM_CLASSES, **overrides)


def outputs_and_gradients(model, images, cotangent, precision: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Eval-mode logits (running statistics: deterministic) and train-mode parameter gradients of
    ``(logits * cotangent).sum()``; ``precision`` "bf16" runs under bf16 autocast."""
    autocast = torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    with torch.no_grad(), autocast:
        output = model.eval()(images)
    with autocast:
        logits = model.train()(images)
    (logits.to(images.dtype) * cotangent.to(images)).sum().backward()
    return output, {name: p.grad for name, p in model.named_parameters()}


@dataclass
class Reference:
    model: torch.nn.Module  # fp32 on the CPU, as initialised
    images: torch.Tensor
    cotangent: torch.Tensor
    output: torch.Tensor  # float64, on the CPU
    grads: dict[str, torch.Tensor]


@pytest.fixture(scope="module", params=list(CASES))
def reference(request) -> Reference:
    """A model of CASES and its float64 CPU outputs and gradients, computed once for both precisions."""
    name, side, batch, overrides = CASES[request.param]
    torch.manual_seed(0)
    model = build(name, side, **overrides)
    images, cotangent = torch.randn(batch, 3, side, side), torch.randn(batch, NUM_CLASSES)
    output, grads = outputs_and_gradients(copy.deepcopy(model).double(), images.double(), cotangent, "fp32")
    return Reference(model, images, cotangent, output, grads)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_outputs_and_gradients_match_a_float64_cpu_reference(reference, precision, ieee_fp32):
    model = copy.deepcopy(reference.model).cuda()
    output, grads = outputs_and_gradients(model, reference.images.cuda(), reference.cotangent, precision)
    assert relative_error(output, reference.output) <= OUTPUT_RTOL[precision]
    whole, median = gradient_errors(grads, reference.grads)
    assert whole <= GRAD_RTOL[precision] and median <= GRAD_MEDIAN_RTOL[precision], f"{whole:.2e}, {median:.2e}"


@pytest.mark.parametrize("size", SIZES.values(), ids=SIZES.keys())
def test_fused_attention_kernels_serve_square_and_padded_inputs(size):
    """With the math backend excluded, SDPA raises unless a fused kernel takes every call (masked ones included)."""
    model = build("atlas_tiny_patch16", size).cuda()
    assert model.config.layout_for(size).scales[0].padded == (size != SIZES["square"])
    images = torch.randn(2, 3, *size, device="cuda")
    with sdpa_kernel(FUSED), torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(images)
        logits.float().sum().backward()
    assert logits.isfinite().all()


@pytest.mark.parametrize("size", SIZES.values(), ids=SIZES.keys())
def test_forward_pass_makes_no_host_device_sync(size):
    model = build("atlas_tiny_patch16", size).cuda().eval()
    images = torch.randn(2, 3, *size, device="cuda")
    with torch.no_grad():
        model(images)  # warm-up: first calls may initialise libraries (and the model may cache what it built)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # a synchronising call raises RuntimeError
        try:
            model(images)
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_compile_fullgraph_matches_eager(ieee_fp32):
    model = build("atlas_tiny_patch16", 512).cuda().eval()
    images = torch.randn(2, 3, 512, 512, device="cuda")
    compiled = torch.compile(model, fullgraph=True)  # a graph break raises instead of splitting the graph
    with torch.no_grad():
        expected, actual = model(images), compiled(images)
    torch._dynamo.reset()
    assert relative_error(actual, expected.cpu().double()) <= COMPILE_RTOL


@pytest.mark.parametrize("size", [(512, 512), (520, 776)], ids=["square", "padded"])
def test_flex_attention_trains_like_windowed_sdpa(size, ieee_fp32):
    """``attention="flex"`` (each scale's keys once, a block mask) gives the same logits and gradients."""
    torch.manual_seed(0)
    sdpa = build("atlas_tiny_patch16", size).cuda()
    flex = build("atlas_tiny_patch16", size, attention="flex").cuda()
    flex.load_state_dict(sdpa.state_dict())
    images = torch.randn(2, 3, *size, device="cuda")
    results = []
    for model in (sdpa, flex):
        logits = model.train()(images)
        logits.square().sum().backward()
        results.append((logits.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (want, want_grads), (got, got_grads) = results
    assert relative_error(got, want.cpu().double()) <= OUTPUT_RTOL["fp32"]
    whole, median = gradient_errors(got_grads, {n: g.cpu().double() for n, g in want_grads.items()})
    assert whole <= GRAD_RTOL["fp32"] and median <= GRAD_MEDIAN_RTOL["fp32"], f"{whole:.2e}, {median:.2e}"


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_stem_strips_compute_the_whole_stem_on_cuda(precision, ieee_fp32, monkeypatch):
    """The stem with its convolutions in strips (a threshold lowered to force them) against the whole stem."""
    from atlas.stem import ConvStem, StripConv2d

    torch.manual_seed(0)
    stem = ConvStem(3, 16, 16, 1).cuda().train()
    whole = copy.deepcopy(stem)
    images = torch.randn(2, 3, 256, 200, device="cuda")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16")
    with autocast:
        want = whole(images)
    monkeypatch.setattr(StripConv2d, "max_elements", 64 * 128 * 20)  # the embedding's convolutions in strips
    with autocast:
        got = stem(images)
    assert relative_error(got, want.cpu().double()) <= OUTPUT_RTOL[precision]
    got.float().square().mean().backward()
    want.float().square().mean().backward()
    grads = {n: p.grad for n, p in stem.named_parameters()}
    whole_grads = {n: p.grad.cpu().double() for n, p in whole.named_parameters()}
    total, median = gradient_errors(grads, whole_grads)
    assert total <= GRAD_RTOL[precision] and median <= GRAD_MEDIAN_RTOL[precision], f"{total:.2e}, {median:.2e}"


@pytest.mark.parametrize("attention", ["sdpa", "flex"])
def test_a_fresh_compiled_model_trains_without_recompiling(attention):
    """Three training steps of a model compiled before its first call: one graph (the geometry, FlexAttention's
    block mask included, built inside it), no recompilation."""
    torch._dynamo.reset()
    model = build("atlas_tiny_patch16", 512, attention=attention).cuda()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    images = torch.randn(2, 3, 512, 512, device="cuda")
    with torch._dynamo.config.patch(error_on_recompile=True), torch.autocast("cuda", dtype=torch.bfloat16):
        for _ in range(3):
            compiled(images).float().square().mean().backward()
    torch._dynamo.reset()
    assert not model._geometry
