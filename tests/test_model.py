"""Atlas as a whole: size, timm, receptive field, padding, QKV reuse, errors, conversion."""

import copy
import re
import warnings

import pytest
import timm
import torch

import atlas
from atlas import Atlas, AtlasConfig, convert_released_state_dict
from atlas.msa import BlockGeometry, MSABlock
from atlas.scales import MultiScaleLayout, build_pyramid

TINY = dict(embed_dim=32, num_heads=2, stem_width=8, num_classes=5)


def test_atlas_b16_1024_has_the_papers_parameter_count():
    model = timm.create_model("atlas_base_patch16", img_size=1024, num_classes=100, drop_path_rate=0.3)
    assert isinstance(model, Atlas)
    assert sum(p.numel() for p in model.parameters()) == 118_253_604
    assert model.config.depths == (2, 10)
    rates = [
        [
            b.scales[0].drop_path.drop_prob if b.scales[0].drop_path.__class__.__name__ == "DropPath" else 0.0
            for b in stage.blocks
        ]
        for stage in model.stages
    ]
    assert rates[0] == pytest.approx([0.0, 0.3]) and rates[1][0] == 0.0 and rates[1][-1] == pytest.approx(0.3)


@pytest.mark.parametrize("name", ["atlas_tiny_patch16", "atlas_small_patch16", "atlas_base_patch16"])
def test_named_models_are_registered_with_timm(name):
    assert name in timm.list_models("atlas_*")
    model = timm.create_model(name, img_size=320, num_classes=3, in_chans=1, depths=(1, 1))
    out = model(torch.randn(2, 1, 320, 288))
    assert out.shape == (2, 3)


def test_one_channel_non_square_input_runs_and_backpropagates():
    model = Atlas(img_size=(80, 300), in_chans=1, **TINY)
    x = torch.randn(2, 1, 80, 300, requires_grad=True)
    model(x).sum().backward()
    assert x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.parameters())


def test_grad_checkpointing_gives_the_same_gradients():
    model = Atlas(img_size=128, **TINY).eval()
    x = torch.randn(1, 3, 128, 128)
    model(x).sum().backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    for a, p in zip(plain, model.parameters(), strict=True):
        torch.testing.assert_close(a, p.grad)


def test_a_channels_last_stem_hands_the_stages_a_contiguous_map():
    model = Atlas(img_size=64, memory_format="channels_last", **TINY).eval()
    stem_bchw, stages = model.forward_stages(torch.randn(1, 3, 64, 48))
    assert stem_bchw.is_contiguous(memory_format=torch.channels_last)
    assert stem_bchw.permute(0, 2, 3, 1).is_contiguous()  # the (B, h, w, C) token map is a free view


def test_both_memory_formats_compute_the_same_outputs_and_gradients():
    torch.manual_seed(0)
    model = Atlas(img_size=64, **TINY)
    x = torch.randn(2, 3, 64, 40)
    results = {}
    for memory_format in ("channels_last", "contiguous"):
        assert model.set_memory_format(memory_format) is model and model.config.memory_format == memory_format
        model.zero_grad()
        stem_bchw, _ = model.forward_stages(x)
        assert stem_bchw.is_contiguous(memory_format=atlas.stem.MEMORY_FORMATS[memory_format])
        model(x).square().sum().backward()
        results[memory_format] = [model(x).detach()] + [p.grad.clone() for p in model.parameters()]
    for a, b in zip(results["channels_last"], results["contiguous"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_auto_memory_format_is_channels_last_on_cuda_and_avx512_cpus_only(monkeypatch):
    from atlas.stem import preferred_memory_format

    assert Atlas(img_size=64, **TINY).stem.memory_format == "auto"
    assert preferred_memory_format(torch.device("cuda")) == "channels_last"
    for capability, expected in [("AVX512", "channels_last"), ("AVX2", "contiguous"), ("DEFAULT", "contiguous")]:
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=capability: c)
        assert preferred_memory_format(torch.device("cpu")) == expected
        assert Atlas(img_size=64, **TINY).stem.resolved_memory_format(torch.device("cpu")) == expected
        assert (
            Atlas(img_size=64, memory_format="contiguous", **TINY).stem.resolved_memory_format(torch.device("cpu"))
            == "contiguous"
        )


def test_an_unknown_memory_format_is_a_clear_error():
    with pytest.raises(ValueError, match=r"memory_format must be 'auto' or one of \['channels_last', 'contiguous'\]"):
        Atlas(img_size=64, memory_format="nhwc", **TINY)
    with pytest.raises(ValueError, match="got 'nchw'"):
        Atlas(img_size=64, **TINY).set_memory_format("nchw")
    with pytest.raises(ValueError, match="stem_depth must be >= 0"):
        Atlas(img_size=64, stem_depth=-1, **TINY)


def test_fused_batchnorm_gives_the_same_outputs_and_no_batchnorm_is_left():
    model = Atlas(img_size=64, **TINY)
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):  # non-trivial statistics
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.data.uniform_(0.5, 2)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model.eval()(x)
        with pytest.raises(RuntimeError, match=r"call \.eval\(\) first"):
            Atlas(img_size=64, **TINY).stem.fuse_batchnorm()
        assert model.fuse_for_inference() is model
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


def scale0_receptive_field(multiscale: bool, token: tuple[int, int]):
    layout = MultiScaleLayout((32, 32), 8, 4, multiscale=multiscale)
    block = MSABlock(16, 2, layout.num_scales).eval()
    x_map = torch.randn(1, 32, 32, 16, requires_grad=True)
    out = block(build_pyramid(x_map, layout), BlockGeometry.build(layout, 0, "containing", True))
    out[0][0, token[0], token[1]].sum().backward()
    per_window = x_map.grad.abs().sum(-1)[0].reshape(4, 8, 4, 8).permute(0, 2, 1, 3).reshape(16, 64)
    return per_window


def test_top_down_reaches_every_window_after_one_block():
    per_window = scale0_receptive_field(True, (3, 5))
    assert (per_window.sum(1) > 0).all()  # every window of the input contributes
    assert (per_window == 0).any()  # max-pooling passes gradient only to each region's maximum


def test_window_attention_alone_stays_in_its_window():
    per_window = scale0_receptive_field(False, (3, 5))
    assert per_window[0].sum() > 0
    assert (per_window[1:] == 0).all()


def test_padded_token_content_never_reaches_real_tokens(monkeypatch):
    """Fill the padding of every window with noise instead of zeros: no output may move."""
    model = Atlas(img_size=(200, 340), window_size=4, pool_stride=2, **TINY).eval()
    assert any(sc.padded for sc in model.config.layout.scales)
    x = torch.randn(2, 3, 200, 340)
    with torch.no_grad():
        reference = model(x)
    import atlas.msa
    from atlas.scales import map_to_windows

    def noisy_windows(x_map, window):
        h, w = x_map.shape[1:3]
        ph, pw = -h % window[0], -w % window[1]
        noise = 100 * torch.randn(x_map.shape[0], h + ph, w + pw, x_map.shape[3], dtype=x_map.dtype)
        noise[:, :h, :w] = x_map
        return map_to_windows(noise, window)

    monkeypatch.setattr(atlas.msa, "map_to_windows", noisy_windows)
    with torch.no_grad():
        noisy = model(x)
    torch.testing.assert_close(noisy, reference, atol=1e-5, rtol=1e-5)


def count_projection_calls(block: MSABlock, layout, **switches):
    calls = {"q": 0, "kv": 0}
    hooks = []

    def counter(name):
        def hook(*_):
            calls[name] += 1

        return hook

    for layer in block.scales:
        for name in calls:
            hooks.append(getattr(layer.attn, name).register_forward_hook(counter(name)))
    x_map = torch.randn(1, *layout.token_size, 16)
    block(build_pyramid(x_map, layout), BlockGeometry.build(layout, 0, "containing", block.top_down))
    for h in hooks:
        h.remove()
    return calls


@pytest.mark.parametrize("tokens", [(32, 32), (128, 128)])
@pytest.mark.parametrize(("top_down", "bottom_up"), [(True, True), (True, False), (False, True), (False, False)])
def test_qkv_reuse_projection_counts(tokens, top_down, bottom_up):
    """q/kv of a scale are recomputed only after its tokens change (spec, QKV reuse).

    Top-down, coarse to fine: each scale projects q and kv once; a coarser scale's kv is recomputed once after
    its own update, when top-down reads it, and is then shared by all finer scales and windows. Bottom-up:
    each refined scale recomputes q, and the scale it reads recomputes kv (both changed since).
    """
    layout = MultiScaleLayout(tokens, 8, 4)
    n = layout.num_scales
    block = MSABlock(16, 2, n, top_down=top_down, bottom_up=bottom_up)
    q = n + (n - 1) * bottom_up
    kv = n + (n - 1) * top_down + (n - 1) * bottom_up
    assert count_projection_calls(block, layout) == {"q": q, "kv": kv}
    if (top_down, bottom_up) == (True, True):
        assert (q, kv) == ((3, 4) if n == 2 else (5, 7))


def test_clear_errors_for_bad_inputs_and_configs():
    model = Atlas(img_size=320, **TINY)
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 3, H, W\).*got \(1, 1, 320, 320\)"):
        model(torch.randn(1, 1, 320, 320))
    with pytest.raises(ValueError, match="smaller than one 16x16 patch"):
        model(torch.randn(1, 3, 8, 64))
    with pytest.raises(ValueError, match="gives 1 scales but this model was built for 2"):
        model(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"unknown Atlas config key 'num_head' \(did you mean 'num_heads'\?\)"):
        Atlas(num_head=3)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        AtlasConfig(embed_dim=100, num_heads=3, stem_width=25)
    with pytest.raises(ValueError, match="routing must be one of"):
        AtlasConfig(routing="nearest")
    with pytest.raises(ValueError, match=r"depths \(2, 10\) must give >= 1 block for each of the 3 scales"):
        AtlasConfig(img_size=2048, depths=(2, 10))
    with pytest.raises(ValueError, match="multiple of pool_stride"):
        AtlasConfig(window_size=10, pool_stride=4)


def released_b16_state_dict(data_dir):
    state_dict = {}
    for line in (data_dir / "official_atlas_b16_1024_state_dict.txt").read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, shape = re.match(r"(\S+) \((.*)\)", line).groups()
        dims = tuple(int(d) for d in shape.split(",") if d.strip())
        state_dict[key] = torch.randn(dims) if dims else torch.tensor(0)
    return state_dict


def test_converter_maps_every_released_b16_key_strictly(data_dir):
    released = released_b16_state_dict(data_dir)
    converted = convert_released_state_dict(released)
    model = timm.create_model("atlas_base_patch16", img_size=1024, num_classes=100)
    model.load_state_dict(converted, strict=True)
    torch.testing.assert_close(model.head.weight, released["fc.weight"])
    torch.testing.assert_close(
        model.stages[1].blocks[9].scales[0].pos.fc2.weight,
        released["atlas_models.1.levels.0.blocks.9.posemb.0.projector.2.weight"],
    )
    unused = sum(v.numel() for k, v in released.items() if re.match(r"atlas_models\.\d\.(norm|head)\.(weight|bias)", k))
    assert unused == 156_872


def test_converter_rejects_unknown_keys_and_loads_files_safely(tmp_path, data_dir):
    with pytest.raises(KeyError, match="atlas_models.0.mystery.weight"):
        convert_released_state_dict({"atlas_models.0.mystery.weight": torch.zeros(1)})
    ref = torch.load(data_dir / "official_tiny_512.pt", weights_only=False)
    path = tmp_path / "released.pth"
    torch.save({"model": ref["state_dict"]}, path)
    model = Atlas(img_size=512, embed_dim=64, num_heads=2, stem_width=16, depths=(1, 2), num_classes=10)
    atlas.load_released(model, path)
    torch.testing.assert_close(model.head.bias, ref["state_dict"]["fc.bias"])
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        atlas.load_released(model, tmp_path / "missing.pth")


@pytest.mark.parametrize("top_down", [True, False])
@pytest.mark.parametrize("img_size", [64, 128], ids=["2 scales", "3 scales"])
def test_without_bottom_up_no_weight_is_built_that_nothing_reads(img_size, top_down):
    """The last block of a stage would update its finest scale for nothing: that scale keeps its position MLP
    only, every parameter left gets a gradient (as DDP requires), and the logits are what the full block gave."""
    from atlas.msa import ScaleLayer

    kwargs = dict(TINY, window_size=2, pool_stride=2, bottom_up=False, top_down=top_down)
    model = Atlas(img_size=img_size, depths=None if img_size == 64 else (1, 1, 1), **kwargs)
    x = torch.randn(2, 3, img_size, img_size)
    model(x).sum().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    trimmed = [b for stage in model.stages[:-1] for b in stage.blocks[-1:]]
    assert trimmed and all(not b.update_finest and list(b.scales[0].children()) == [b.scales[0].pos] for b in trimmed)
    full = copy.deepcopy(model)
    for stage in full.stages[:-1]:
        block = stage.blocks[-1]
        layer = ScaleLayer(model.config.embed_dim, model.config.num_heads, model.config.mlp_ratio, 0.0)
        layer.pos = block.scales[0].pos
        block.scales[0], block.update_finest = layer, True
    model.eval(), full.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), full(x), rtol=0, atol=0)


def test_released_training_checkpoints_load_safely(tmp_path, monkeypatch):
    """latest.ckpt / epoch=N.ckpt pickle an EasyDict of arguments next to the weights: it loads as a plain dict
    (without easydict installed), and a checkpoint naming any other global is refused, not executed."""
    import pickle
    import sys
    import types
    from collections import OrderedDict

    from atlas.convert import load_state_dict_file, safe_load

    easydict = types.ModuleType("easydict")

    class EasyDict(dict):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.__dict__.update(self)

    EasyDict.__module__, EasyDict.__qualname__ = "easydict", "EasyDict"
    easydict.EasyDict = EasyDict
    monkeypatch.setitem(sys.modules, "easydict", easydict)
    weights = {"atlas_models.fc.weight": torch.randn(3, 4)}
    torch.save({"model": weights, "epoch": 7, "args": EasyDict(lr=5e-4, img_size=1024)}, tmp_path / "latest.ckpt")
    monkeypatch.delitem(sys.modules, "easydict")
    loaded = safe_load(tmp_path / "latest.ckpt")
    assert isinstance(loaded["args"], OrderedDict) and loaded["args"]["img_size"] == 1024
    assert torch.equal(
        load_state_dict_file(tmp_path / "latest.ckpt")["atlas_models.fc.weight"], weights[next(iter(weights))]
    )

    class Exploit:
        def __reduce__(self):
            return (print, ("this must never run",))

    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"model": Exploit()}, protocol=2))
    (tmp_path / "text.pt").write_text("not a checkpoint")
    for name in ("evil.pt", "text.pt"):
        with pytest.raises(ValueError, match="not a checkpoint this code can read safely"):
            safe_load(tmp_path / name)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(img_size="64"), TypeError, r"img_size must be an int or \(H, W\) of ints, got '64'"),
        (dict(img_size=64.5), TypeError, r"img_size must be an int or \(H, W\) of ints, got 64.5"),
        (dict(img_size=(64, 0)), ValueError, r"img_size must be \(H, W\) with both sides >= patch_size"),
        (dict(num_heads="3"), TypeError, "num_heads must be an int, got '3'"),
        (dict(patch_size=0), ValueError, "patch_size must be >= 1, got 0"),
        (dict(num_heads=0), ValueError, "num_heads must be >= 1, got 0"),
        (dict(mlp_ratio=0), ValueError, "mlp_ratio must be > 0, got 0"),
        (dict(mlp_ratio="4"), TypeError, "mlp_ratio must be a number, got '4'"),
        (dict(window_size=0), ValueError, "window_size must be >= 1, got 0"),
    ],
)
def test_constructor_arguments_of_the_wrong_type_or_zero_are_clear_errors(kwargs, error, message):
    with pytest.raises(error, match=message):
        AtlasConfig(**kwargs)
    with pytest.raises(error, match=message):
        Atlas(**{**TINY, **kwargs})


def test_a_window_larger_than_the_token_grid_warns_that_the_model_has_one_scale():
    """Asking for a 16x16 window on a 64px image (a 4x4 token grid at patch 16) gives a single-scale model: a warning
    rather than an error, as single-scale Atlas models are legitimate (DEPTHS_BASE[1]); at the default window a
    small image is such a model on purpose, and builds without a word."""
    with pytest.warns(UserWarning, match=r"window_size 16 is larger than the 4x4 token grid .* one scale"):
        model = Atlas(img_size=64, window_size=16, **TINY)
    assert model.config.layout.num_scales == 1
    with pytest.warns(UserWarning, match="window_size 32"):
        timm.create_model("atlas_tiny_patch16", img_size=128, window_size=32, pool_stride=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Atlas(img_size=64, **TINY)  # the default window: single scale on purpose
        Atlas(img_size=256, window_size=16, **TINY)  # 16x16 tokens: exactly one window
        Atlas(img_size=64, window_size=16, multiscale=False, **TINY)  # asked for
        Atlas(img_size=64, window_size=2, pool_stride=2, **TINY)


def test_check_input_names_what_the_model_expects():
    model = Atlas(img_size=320, **TINY).eval()
    with pytest.raises(TypeError, match=r"expected a torch.Tensor of images \(B, 3, H, W\), got numpy.ndarray"):
        model(torch.zeros(1, 3, 320, 320).numpy())
    with pytest.raises(
        TypeError, match=r"floating-point images in torch.float32 \(the weights. dtype\), got torch.uint8.*normalised"
    ):
        model(torch.zeros(1, 3, 320, 320, dtype=torch.uint8))
    with pytest.raises(TypeError, match=r"in torch.float32 .*, got torch.float64"):
        model(torch.zeros(1, 3, 320, 320, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"an empty batch \(0, 3, 320, 320\)"):
        model(torch.zeros(0, 3, 320, 320))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts: float32 images are fine
        assert model(torch.zeros(1, 3, 320, 320)).shape == (1, 5)


def test_convert_command_failures_are_one_line_errors_and_it_never_overwrites_its_input(tmp_path, data_dir):
    from atlas.convert import main as convert

    ref = torch.load(data_dir / "official_tiny_512.pt", weights_only=False)
    released = tmp_path / "released.pth"
    torch.save({"model": ref["state_dict"]}, released)
    before = released.read_bytes()
    (tmp_path / "text.pt").write_text("not a checkpoint")
    torch.save({"head.weight": torch.zeros(2, 2)}, tmp_path / "ours.pt")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    torch.save({"atlas_models.0.mystery.weight": torch.zeros(1)}, tmp_path / "unknown.pt")
    cases = {
        (tmp_path / "missing.pth", tmp_path / "out.pt"): "checkpoint not found",
        (tmp_path / "text.pt", tmp_path / "out.pt"): "not a checkpoint this code can read safely",
        (tmp_path / "ours.pt", tmp_path / "out.pt"): "not in the released Atlas format",
        (tmp_path / "tensor.pt", tmp_path / "out.pt"): "holds no state dict",
        (tmp_path / "unknown.pt", tmp_path / "out.pt"): "'atlas_models.0.mystery.weight' is not part of the released",
        (released, tmp_path / "no-such-folder" / "out.pt"): "output folder .*no-such-folder does not exist",
        (released, tmp_path / "." / "released.pth"): "released.pth is the input",
        (released, tmp_path): "is a folder: name the file",
    }
    for (source, output), message in cases.items():
        with pytest.raises(SystemExit, match="^error: .*" + message) as error:
            convert([str(source), str(output)])
        assert "\n" not in str(error.value), message
    assert released.read_bytes() == before and not (tmp_path / "out.pt").exists()
    convert([str(released), str(tmp_path / "out.pt")])
    assert torch.equal(torch.load(tmp_path / "out.pt")["head.bias"], ref["state_dict"]["fc.bias"])


def test_an_initial_model_gives_finite_logits_under_bf16_autocast():
    """Fresh weights and BatchNorm statistics (as a new EMA evaluates them), normalised-image-like input: finite
    logits in eval mode at 512px (two scales, as at 1024px) and in training mode at 256px. CPUs without bf16 units
    run the stem's bf16 convolutions on a slow path, which keeps these sizes small; the GPU check's bf16 training
    rows cover 1024px and more on CUDA."""
    torch.manual_seed(0)
    for size, mode in ((512, "eval"), (256, "train")):
        model = getattr(timm.create_model("atlas_tiny_patch16", img_size=size, num_classes=10), mode)()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            assert model(torch.randn(1, 3, size, size)).float().isfinite().all(), (size, mode)
