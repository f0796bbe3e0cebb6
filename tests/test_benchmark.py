"""scripts/benchmark.py on tiny models at tiny sizes: the table it returns, the CSV it writes, its errors."""

import argparse
import csv
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
SCRIPT = SCRIPTS / "benchmark.py"
CONFIGS = SCRIPTS / "configs"
sys.path.insert(0, str(SCRIPTS))  # benchmark.py imports its siblings (baselines, train), as when run as a script


@pytest.fixture(scope="module")
def benchmark():
    spec = importlib.util.spec_from_file_location("benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_times_a_tiny_atlas_and_writes_every_column(benchmark, tmp_path, capsys):
    out = tmp_path / "bench.csv"
    args = ["--models", "atlas_tiny_patch16", "--sizes", "64", "--repeats", "1", "--warmup", "0", "--profile", "3"]
    args += ["--matmul-size", "256"]
    rows = benchmark.main([*args, "--device", "cpu", "--csv", str(out)])
    assert "Self CPU" in capsys.readouterr().out
    with out.open() as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == benchmark.COLUMNS
    assert len(table) == len(rows) == 1
    row = table[0]
    assert (row["model"], row["height"], row["width"], row["device"]) == ("atlas_tiny_patch16", "64", "64", "cpu")
    assert min(float(row[k]) for k in ("fwd_ms", "train_ms", "fwd_cpu_ms", "train_cpu_ms", "fwd_fused_ms")) > 0
    assert 0 < float(row["stem_gflops_per_image"]) < float(row["gflops_per_image"])
    assert 0 < float(row["stem_share"]) < 1
    for rate in ("fwd_gflop_s", "train_gflop_s", "matmul_gflop_s"):
        assert float(row[rate]) > 0
    train_rate = float(row["train_gflops_per_image"]) / float(row["train_ms"]) * 1e3
    assert float(row["train_gflop_s"]) == pytest.approx(train_rate, rel=0.01, abs=0.1)


def test_flops_only_skips_timing_and_takes_non_square_sizes(benchmark, tmp_path):
    out = tmp_path / "flops.csv"
    rows = benchmark.main(["--models", "vit_tiny_patch16_224", "--sizes", "32x64", "--flops-only", "--csv", str(out)])
    assert (rows[0]["height"], rows[0]["width"]) == (32, 64)
    assert "fwd_ms" not in rows[0] and rows[0]["stem_share"] == ""
    with out.open() as f:
        assert "train_ms" not in next(csv.DictReader(f))


def test_matmul_reference_can_be_skipped_but_not_negative(benchmark, capsys):
    args = ["--models", "atlas_tiny_patch16", "--sizes", "64", "--repeats", "1", "--warmup", "0", "--device", "cpu"]
    row = benchmark.main([*args, "--matmul-size", "0"])[0]
    assert row["matmul_gflop_s"] == "" and row["train_gflop_s"] > 0
    assert "reference:" not in capsys.readouterr().out
    with pytest.raises(SystemExit):
        benchmark.main([*args, "--matmul-size", "-1"])
    assert "--matmul-size must be >= 0" in capsys.readouterr().err


def test_parse_size(benchmark):
    assert benchmark.parse_size("512") == (512, 512)
    assert benchmark.parse_size("512x1024") == (512, 1024)
    for bad in ("abc", "8", "512x", "1x2x3", "-64"):
        with pytest.raises(argparse.ArgumentTypeError):
            benchmark.parse_size(bad)


def test_unknown_model_lists_close_names(benchmark, capsys):
    with pytest.raises(SystemExit):
        benchmark.main(["--models", "atlas_tiny_patch_16", "--flops-only"])
    assert "atlas_tiny_patch16" in capsys.readouterr().err


def test_size_a_model_cannot_take_is_a_clear_error(benchmark):
    """Atlas-T has default depths for up to 4 scales; 65536px would need 5."""
    with pytest.raises(SystemExit, match="atlas_tiny_patch16 at 65536x65536: .*scales"):
        benchmark.main(["--models", "atlas_tiny_patch16", "--sizes", "65536", "--flops-only"])


def test_peak_memory_sees_a_64_mib_tensor(benchmark):
    with benchmark.peak_memory(torch.device("cpu")) as memory:
        big = torch.ones(16 * 2**20)  # 64 MiB, written so that every page is resident
    del big
    assert memory["method"]
    if "ru_maxrss" not in memory["method"]:  # the lower-bound fallback may legitimately read 0
        assert memory["mib"] > 60


def test_speedups_compare_models_at_the_same_size(benchmark):
    times = ("fwd_ms", "train_ms", "fwd_cpu_ms", "train_cpu_ms")
    rows = [
        {"model": "a", "height": 64, "width": 64, **dict(zip(times, (10.0, 30.0, 20.0, 60.0), strict=True))},
        {"model": "b", "height": 64, "width": 64, **dict(zip(times, (20.0, 90.0, 30.0, 240.0), strict=True))},
        {"model": "b", "height": 32, "width": 32, **dict(zip(times, (1.0, 1.0, 1.0, 1.0), strict=True))},
    ]
    assert benchmark.speedups(rows, "b") == [
        "64x64: a vs b: forward 2.00x (CPU time 1.50x), forward+backward 3.00x (CPU time 4.00x)"
    ]
    rows[0].update(fwd_fused_ms=5.0, fwd_fused_cpu_ms=10.0)
    assert benchmark.speedups(rows, "b")[0].endswith("fused forward 4.00x (CPU time 3.00x)")


def test_configs_are_timed_at_their_size_as_training_builds_them(benchmark):
    args = ["--configs", str(CONFIGS / "tiny_cpu_synthetic.yaml"), "--repeats", "1", "--warmup", "0"]
    rows = benchmark.main([*args, "--device", "cpu", "--matmul-size", "0", "--baseline", "tiny_cpu_synthetic"])
    assert [(r["model"], r["height"], r["width"]) for r in rows] == [("tiny_cpu_synthetic", 64, 64)]  # its img_size
    assert rows[0]["fwd_ms"] > 0 and rows[0]["train_ms"] > 0


def test_table3_blocks_side_by_side_dilated_attention_costs_less_than_global(benchmark):
    """Table 3 at its size (384px, 9216 tokens): LongViT's dilated attention reads 1/16 of the keys per pair."""
    names = ["table3_vit", "table3_longvit_dilated", "table3_swin"]
    rows = benchmark.main(["--configs", *(str(CONFIGS / f"{n}.yaml") for n in names), "--flops-only"])
    flops = {r["model"]: r["gflops_per_image"] for r in rows}
    assert [(r["model"], r["height"]) for r in rows] == [(n, 384) for n in names]
    assert flops["table3_swin"] < flops["table3_longvit_dilated"] < flops["table3_vit"] / 2


def test_a_missing_config_or_baseline_is_a_clear_error(benchmark, capsys):
    with pytest.raises(SystemExit):
        benchmark.main(["--configs", str(CONFIGS / "table3_nope.yaml"), "--flops-only"])
    assert "config file not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        benchmark.main(["--configs", str(CONFIGS / "table3_vit.yaml"), "--baseline", "vit", "--flops-only"])
    assert "'table3_vit'" in capsys.readouterr().err
