"""scripts/baselines: each own implementation's defining property, and every Table 1-3 config building its model."""

import sys
from functools import partial
from pathlib import Path

import pytest
import timm
import torch
import yaml

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))

import baselines  # noqa: E402
from baselines.dilated import dilated_attention, longvit_segment_lengths  # noqa: E402
from baselines.hierarchical import HATBlock  # noqa: E402
from baselines.mamba import MambaVisionMixer, selective_scan  # noqa: E402
from trainlib.building import TrainingError, build_model  # noqa: E402
from trainlib.config import load_config  # noqa: E402

from atlas.profiling import build_on  # noqa: E402

CONFIGS = sorted((SCRIPTS / "configs").glob("table[123]_*.yaml"))


# -- dilated attention (LongNet / LongViT) ---------------------------------------------------------------
def dense_dilated_attention(q, k, v, segment_lengths, ratios):
    """Reference from LongNet's definition: one softmax over the keys each (segment, ratio) pair lets a query
    read (same segment, both at the head's offset h mod r), a key read in m pairs weighing m times."""
    h, n = q.shape[1], q.shape[2]
    i, j = torch.arange(n)[:, None], torch.arange(n)[None]
    count = torch.zeros(h, n, n)
    for head in range(h):
        for w, r in zip(segment_lengths, ratios, strict=True):
            offset = head % r
            count[head] += ((i // w == j // w) & (i % r == offset) & (j % r == offset)).float()
    scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5 + count.log()
    out = scores.softmax(-1).nan_to_num(0.0) @ v  # rows without any key: no pair covers the query
    return out, count


@pytest.mark.parametrize("segments, ratios", [((8, 16, 32), (1, 2, 4)), ((4, 32), (1, 8)), ((16,), (2,))])
def test_dilated_attention_reads_exactly_the_keys_of_its_pairs(segments, ratios):
    q, k, v = (torch.randn(2, 5, 32, 8, dtype=torch.float64) for _ in range(3))
    expected, count = dense_dilated_attention(q, k, v, segments, ratios)
    torch.testing.assert_close(dilated_attention(q, k, v, segments, ratios), expected)
    if 1 not in ratios:  # ratio 2 alone: head 0 reads even positions only, odd queries read nothing
        assert count[0, 1].sum() == 0 and count[0, 0, 1::2].sum() == 0


def test_dilated_attention_is_not_global_attention():
    """The property can fail: a query of one segment at ratio 1 does not read the next segment."""
    q, k, v = (torch.randn(1, 1, 16, 4) for _ in range(3))
    out = dilated_attention(q, k, v, (8,), (1,))
    v2 = v.clone()
    v2[:, :, 8:] += 1.0
    out2 = dilated_attention(q, k, v2, (8,), (1,))
    torch.testing.assert_close(out[:, :, :8], out2[:, :, :8])
    assert not torch.allclose(out[:, :, 8:], out2[:, :, 8:])


def test_segment_lengths_follow_longvit_and_bad_lengths_are_clear_errors():
    assert longvit_segment_lengths(1024) == (64, 128, 256, 512, 1024)  # LongViT at 1024px, 32x32 patches
    assert longvit_segment_lengths(16384) == (1024, 2048, 4096, 8192, 16384)  # LongViT at 4096px
    assert longvit_segment_lengths(9216) == (576, 1152, 2304, 4608, 9216)  # Table 3
    q = torch.zeros(1, 2, 24, 4)
    with pytest.raises(ValueError, match="segment 16 with ratio 2"):
        dilated_attention(q, q, q, (16,), (2,))


# -- selective scan and MambaVision mixer ----------------------------------------------------------------
def scan_per_step(u, delta, A, B, C, D, delta_bias):
    """Mamba's recurrence, one step at a time (as state-spaces/mamba's selective_scan_ref)."""
    delta = torch.nn.functional.softplus(delta + delta_bias[:, None])
    state = torch.zeros(u.shape[0], u.shape[1], A.shape[1], dtype=u.dtype)
    ys = []
    for t in range(u.shape[-1]):
        state = (
            torch.exp(delta[:, :, t, None] * A) * state + (delta[:, :, t] * u[:, :, t])[..., None] * B[:, None, :, t]
        )
        ys.append((state * C[:, None, :, t]).sum(-1))
    return torch.stack(ys, dim=-1) + D[:, None] * u


@pytest.mark.parametrize("chunk_size", [1, 5, 16, 64])
def test_selective_scan_matches_the_recurrence_step_by_step(chunk_size):
    b, d, n, length = 2, 3, 4, 37
    u, delta = torch.randn(b, d, length, dtype=torch.float64), 3 * torch.randn(b, d, length, dtype=torch.float64)
    A = -torch.rand(d, n, dtype=torch.float64) * 8  # steps decaying by up to e^-50: no overflow in the chunks
    B, C = torch.randn(b, n, length, dtype=torch.float64), torch.randn(b, n, length, dtype=torch.float64)
    D, bias = torch.randn(d, dtype=torch.float64), torch.randn(d, dtype=torch.float64)
    delta.requires_grad_(True)
    y = selective_scan(u, delta, A, B, C, D, bias, chunk_size=chunk_size)
    torch.testing.assert_close(y, scan_per_step(u, delta, A, B, C, D, bias))
    (grad,) = torch.autograd.grad(y.sum(), delta)
    assert torch.isfinite(grad).all()


def test_mixer_reads_the_past_through_the_scan_and_one_token_ahead_through_its_convolutions():
    """A token changes the outputs from one step before it on (width-3 convolutions, then a causal scan)."""
    mixer = MambaVisionMixer(16).double()
    x = torch.randn(1, 20, 16, dtype=torch.float64)
    x2 = x.clone()
    x2[:, 10] += 1.0
    diff = (mixer(x2) - mixer(x)).abs().amax(-1)[0]
    assert diff[:9].max() < 1e-12 and diff[9:].min() > 0
    assert mixer(x).shape == x.shape


# -- hierarchical attention (FasterViT) ------------------------------------------------------------------
def test_hat_windows_see_other_windows_only_through_their_carriers():
    torch.manual_seed(0)
    block = HATBlock(dim=16, num_heads=2, window=4, ct=2, mlp_ratio=2.0, drop_path=0.0).eval()
    x, carriers = torch.randn(1, 8, 8, 16), torch.randn(1, 4, 4, 16)
    out, out_carriers = block(x, carriers)
    assert out.shape == x.shape and out_carriers.shape == carriers.shape
    x2 = x.clone()
    x2[:, :4, :4] += torch.randn(4, 4, 16)  # tokens of the top-left window only (not a constant: LayerNorm)
    out2, _ = block(x2, carriers)
    torch.testing.assert_close(out2[:, 4:], out[:, 4:])  # the other windows did not see them
    torch.testing.assert_close(out2[:, :4, 4:], out[:, :4, 4:])
    c2 = carriers.clone()
    c2[:, :2, :2] += torch.randn(2, 2, 16)  # the top-left window's carriers reach every window
    out3, _ = block(x, c2)
    assert (out3[:, 4:, 4:] - out[:, 4:, 4:]).abs().amax() > 1e-3  # through the global carrier attention


# -- the models at a small size: CPU forward and backward ------------------------------------------------
@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("longvit_base_patch16", dict(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=4)),
        ("vit_mambavision_mixer_base_patch16", dict(img_size=32, patch_size=4, embed_dim=32, depth=2)),
        ("hat_vit_base_patch16", dict(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=4, window_size=4)),
        ("mambavision_small", dict(dim=16, depths=(1, 1, 3, 2), num_heads=(1, 1, 2, 2), window_size=(4, 4, 3, 2))),
    ],
)
def test_small_models_train_on_the_cpu(name, kwargs):
    model = timm.create_model(name, num_classes=5, drop_path_rate=0.1, **kwargs)
    images = torch.randn(2, 3, 32, 40 if name.startswith("mamba") else 32)  # MambaVision: any size, padded windows
    logits = model(images)
    assert logits.shape == (2, 5)
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_mambavision_has_the_authors_parameter_counts():
    """The authors' README: MambaVision-S 50.1M, MambaVision-B 97.7M parameters (1000 classes)."""
    with torch.device("meta"):
        counts = {
            v: sum(p.numel() for p in timm.create_model(f"mambavision_{v}").parameters()) for v in ("small", "base")
        }
    assert (round(counts["small"] / 1e6, 1), round(counts["base"] / 1e6, 1)) == (50.1, 97.7)


# -- the configs -----------------------------------------------------------------------------------------
def test_every_row_of_tables_1_to_3_has_a_config():
    paper = yaml.safe_load((SCRIPTS / "data" / "paper_results.yaml").read_text())
    rows = {(cfg.paper_table, cfg.paper_row) for cfg in map(load_config, CONFIGS)}
    assert rows == {(n, row["row"]) for n in (1, 2, 3) for row in paper[n]["rows"]}


@pytest.mark.parametrize("path", [p for p in CONFIGS if "atlas" not in load_config(p).model.name], ids=lambda p: p.stem)
def test_baseline_configs_build_at_the_papers_size(path):
    cfg = load_config(path)
    try:
        model = build_on("meta", partial(build_model, cfg))  # FasterViT: on the CPU
    except TrainingError as error:  # an optional package that is not installed: the install command
        assert cfg.model.name.startswith("fastervit/") and "pip install -e '.[fastervit]'" in str(error)
        return
    if cfg.paper_table == 3:  # 384px, 4x4 patches: 9216 tokens, 4 Base-size blocks
        blocks = model.layers[0].blocks if hasattr(model, "layers") else model.blocks  # Swin: one stage
        assert (tuple(model.patch_embed.grid_size), len(blocks), model.num_features) == ((96, 96), 4, 768)


def test_an_unknown_optional_package_is_a_clear_error():
    with pytest.raises(ValueError, match="fastervit/<model>, mambavision/<model>"):
        baselines.create_optional("fastervit", 224)
