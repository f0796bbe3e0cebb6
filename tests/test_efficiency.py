"""What makes the GPU path fast, checked on CPU: cached geometry built on the model's device, a forward that
creates nothing on the host, fullgraph compilation, FlexAttention keys without per-window copies, a fused
kernel for padded inputs, cached position tables, and stem checkpointing."""

import copy
import warnings

import pytest
import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from atlas import Atlas
from atlas.attention import WindowAttention
from atlas.msa import BlockGeometry

# Window 2 and pool stride 2 give two or three scales at a few dozen pixels; (72, 40) pads every scale.
SMALL = dict(embed_dim=32, num_heads=2, stem_width=8, num_classes=5, window_size=2, pool_stride=2)


def small_atlas(img_size, **kwargs) -> Atlas:
    depths = (1,) * Atlas(img_size=img_size, depths=None, **SMALL).config.layout.num_scales
    return Atlas(img_size=img_size, depths=depths, **SMALL, **kwargs)


class HostTensors(TorchDispatchMode):
    """Records every op that returns a tensor on the host (CPU)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(isinstance(t, torch.Tensor) and t.device.type == "cpu" for t in tree_leaves(out)):
            self.ops.append(str(func))
        return out


def test_a_forward_creates_no_tensor_on_the_host():
    """On the meta device (standing in for CUDA) nothing of a forward, geometry included, is built on the CPU."""
    with torch.device("meta"):
        model = small_atlas((72, 40))
    x = torch.empty(2, 3, 72, 40, device="meta")
    for training in (False, True):  # in eval the position tables are cached, in training recomputed
        model.train(training)
        with HostTensors() as host:
            model(x)
        assert host.ops == []


def test_geometry_is_built_once_per_input_size(monkeypatch):
    model = small_atlas((72, 40)).eval()
    builds = []
    original = BlockGeometry.build.__func__
    monkeypatch.setattr(
        BlockGeometry, "build", classmethod(lambda cls, *a, **k: builds.append(a) or original(cls, *a, **k))
    )
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(1, 3, 72, 40))
        assert len(builds) == len(model.stages)  # once, for the one input size
        model(torch.randn(1, 3, 96, 40))
    assert len(builds) == 2 * len(model.stages)
    for size in range(model.GEOMETRY_CACHE_SIZE + 2):  # the cache keeps a bounded number of sizes
        model.geometry(model.config.stage_plan((96 + 16 * size, 40)), torch.device("cpu"))
    assert len(model._geometry) == model.GEOMETRY_CACHE_SIZE


@pytest.mark.parametrize("img_size", [64, (72, 40)], ids=["2 scales square", "3 scales padded"])
def test_the_whole_model_compiles_as_one_graph(img_size):
    """``fullgraph=True`` fails on any graph break; the compiled model computes what the eager one does."""
    torch._dynamo.reset()
    model = small_atlas(img_size).eval()
    x = torch.randn(2, 3, *((img_size, img_size) if isinstance(img_size, int) else img_size))
    with torch.no_grad():
        want = model(x)
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        for _ in range(2):
            torch.testing.assert_close(compiled(x), want)


@pytest.mark.parametrize("attention", ["sdpa", "flex"])
def test_a_fresh_model_compiles_once_for_its_training_steps(attention):
    """The first compiled call builds the geometry inside the graph without storing it, so the second call's
    guards see what the first one's saw: one compilation per input size (a failing guard raises here)."""
    torch._dynamo.reset()
    model = small_atlas((72, 40), attention=attention)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    x = torch.randn(2, 3, 72, 40)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(3):
            if attention == "flex":  # FlexAttention trains on CUDA only: forward passes here
                with torch.no_grad():
                    compiled(x)
            else:
                compiled(x).square().sum().backward()
    assert not model._geometry  # nothing was stored while tracing


def test_regional_compilation_compiles_each_distinct_unit_once():
    """``compile_regions``: units of equal shapes share a graph, and a second step compiles nothing new."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    torch.manual_seed(1)
    model = Atlas(img_size=128, depths=(2, 1, 1), stem_depth=2, **SMALL)  # three scales
    model.set_grad_checkpointing(True)  # eager checkpoints around compiled units, as training at 4096px runs
    eager = copy.deepcopy(model)
    units = len(model.stem.units()) + sum(len(stage.blocks) for stage in model.stages)
    symbolic = []  # per graph: does any input have a size the compiler treats as a variable?

    def backend(graph_module, example_inputs):
        values = [node.meta.get("example_value") for node in graph_module.graph.find_nodes(op="placeholder")]
        symbolic.append(any(isinstance(n, torch.SymInt) for v in values if hasattr(v, "shape") for n in v.shape))
        return graph_module.forward

    model.compile_regions(backend=backend)
    x = torch.randn(2, 3, 128, 128)
    for step in range(2):
        with torch._dynamo.config.patch(error_on_recompile=step > 0):
            model(x).square().sum().backward()
        eager(x).square().sum().backward()
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert graphs < units, (graphs, units)  # the two residual blocks of stem stage 1 and the two first MSA blocks
    assert symbolic and not any(symbolic)  # a new shape compiles a static graph, not one for every size
    for got, want in zip(model.parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(got.grad, want.grad)


@pytest.mark.parametrize("checkpointed", [False, True], ids=["plain", "checkpointed"])
def test_compiled_training_step_gives_the_eager_gradients_and_statistics(checkpointed):
    """One graph for forward and backward, with or without checkpointing (stem included)."""
    torch._dynamo.reset()
    x = torch.randn(2, 3, 72, 40)
    results = []
    for compiled in (False, True):
        torch.manual_seed(1)
        model = small_atlas((72, 40))
        model.set_grad_checkpointing(checkpointed)
        run = torch.compile(model, fullgraph=True, backend="aot_eager") if compiled else model
        run(x).square().sum().backward()
        results.append([p.grad for p in model.parameters()] + list(model.buffers()))
    for eager, compiled in zip(*results, strict=True):
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-6)


def test_flex_top_down_reads_each_scale_once_and_matches_windowed_sdpa(monkeypatch):
    """With ``attention="flex"`` the keys are every scale's tokens once, not a copy per fine window."""
    x = torch.randn(2, 3, 72, 40)
    sdpa = small_atlas((72, 40)).eval()
    flex = small_atlas((72, 40), attention="flex").eval()
    flex.load_state_dict(sdpa.state_dict())
    keys = []
    original = WindowAttention.flex
    monkeypatch.setattr(
        WindowAttention, "flex", lambda self, q, kv, m: keys.append(kv.shape[1]) or original(self, q, kv, m)
    )
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*without torch.compile")  # the unfused CPU kernel
        torch.testing.assert_close(flex(x), sdpa(x), rtol=1e-4, atol=1e-5)
    layout = sdpa.config.layout_for((72, 40))
    scales = layout.scales
    expected = []  # stage by stage, block by block, finest to second-coarsest scale: tokens of scales l..L-1
    for first in range(layout.num_scales):
        for l in reversed(range(first, layout.num_scales - 1)):
            expected.append(sum(sc.num_windows * sc.tokens_per_window for sc in scales[l:]))
    assert sorted(keys) == sorted(expected)
    per_window_copies = scales[0].num_windows * sum(sc.tokens_per_window for sc in scales)
    assert max(keys) < per_window_copies


def test_padded_inputs_keep_the_fused_attention_kernel():
    model = small_atlas((72, 40)).eval()
    assert any(sc.padded for sc in model.config.layout_for((72, 40)).scales)
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        model(torch.randn(1, 3, 72, 40))
    names = {event.name for event in prof.events()}
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in names
    assert "aten::_scaled_dot_product_attention_math" not in names


def test_position_tables_are_cached_in_eval_and_follow_weight_updates():
    model = small_atlas(64).eval()
    x = torch.randn(1, 3, 64, 64)
    calls = []
    for module in model.modules():
        if module.__class__.__name__ == "PositionMLP":
            module.fc1.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        first = model(x)
        computed = len(calls)
        assert computed > 0 and torch.equal(model(x), first) and len(calls) == computed  # no recomputation
        pos = model.stages[0].blocks[0].scales[0].pos
        pos.fc2.weight.add_(0.5)  # an in-place update, as an optimizer step makes
        changed = model(x)
    assert len(calls) > computed and not torch.allclose(changed, first)
    fresh = small_atlas(64).eval()
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), changed)
    model.train()
    model(x).sum().backward()  # in training the tables are computed with gradients
    assert pos.fc1.weight.grad is not None and pos.fc1.weight.grad.abs().sum() > 0


def test_stem_checkpointing_keeps_gradients_and_running_statistics():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    results = []
    for checkpointed in (False, True):
        torch.manual_seed(1)
        model = small_atlas(64).train()
        model.set_grad_checkpointing(checkpointed)
        assert model.stem.grad_checkpointing is checkpointed
        model(x).square().sum().backward()
        stats = [b.clone() for name, b in model.named_buffers() if name.startswith("stem.")]
        results.append(([p.grad.clone() for p in model.parameters()], stats))
    (grads, stats), (grads_ckpt, stats_ckpt) = results
    for a, b in zip(grads, grads_ckpt, strict=True):
        torch.testing.assert_close(a, b)
    for a, b in zip(stats, stats_ckpt, strict=True):  # one update per step, not one more in the recomputation
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_stem_checkpointing_keeps_fewer_activations():
    """The stem's saved activations shrink to the input of each of its units."""

    def saved_bytes(model, x):
        total = []

        def pack(t):
            total.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x)
        return sum(total)

    x = torch.randn(1, 3, 128, 128)
    stem = small_atlas(128).stem.train()
    plain = saved_bytes(stem, x)
    stem.grad_checkpointing = True
    assert saved_bytes(stem, x) < plain / 3
