"""scripts/trainlib/cost.py: the demo's cost part measures what it says, in the order it says, and reports it."""

import csv
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from trainlib import cost  # noqa: E402


class Quadratic(nn.Module):
    """Work and memory that grow with the square of the token count: a (T, T) product of 4x4-pixel tokens."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(3, 64)

    def forward(self, x):
        tokens = self.embed(nn.functional.avg_pool2d(x, 4).flatten(2).transpose(1, 2))  # (B, T, 64)
        return (tokens @ tokens.transpose(1, 2)).mean((1, 2))  # a (B, T, T) product


class Linear(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return (x.mean((2, 3)) * self.weight).sum(1)


def test_rows_come_size_by_size_with_the_models_interleaved():
    built = []

    def builder(name, module):
        return lambda px: (built.append((name, px)), module())[1]

    reported = []
    rows = cost.measure_costs(
        {"linear": builder("linear", Linear), "quadratic": builder("quadratic", Quadratic)},
        (32, 8, 16),
        tokens=lambda px: (px // 4) ** 2,
        report=reported.append,
    )
    order = [(8, "linear"), (8, "quadratic"), (16, "linear"), (16, "quadratic"), (32, "linear"), (32, "quadratic")]
    assert [(r["px"], r["model"]) for r in rows] == order
    assert built == [("linear", 8), ("quadratic", 8)] + [(name, px) for px, name in order]  # a set-up step first
    assert reported == rows
    assert [r["tokens"] for r in rows[::2]] == [4, 16, 64]
    assert all(r["seconds"] > 0 and r["timed_steps"] == 3 for r in rows)  # each under a second: three steps


def test_growth_tells_a_quadratic_model_from_a_linear_one():
    """From 32 to 256px (64 to 4096 tokens) the (T, T) product grows 4096x; the linear model stays near overhead."""
    models = {"linear": lambda px: Linear(), "quadratic": lambda px: Quadratic()}
    rows = cost.measure_costs(models, (32, 256), lambda px: (px // 4) ** 2, report=lambda row: None)
    assert cost.growth(rows, "quadratic") > 20 * cost.growth(rows, "linear")


def test_peak_memory_grows_with_what_the_step_keeps():
    """The (T, T) float32 product: 0.25 MiB at 64px (256 tokens), 64 MiB at 256px (4096 tokens)."""
    small, large = (cost.step_cost(Quadratic(), px)["peak_mib"] for px in (64, 256))
    assert large > 48 and small < 16


def test_table_csv_and_figure(tmp_path):
    rows = [
        dict(model=m, px=px, tokens=(px // 4) ** 2, seconds=s, peak_mib=mib, timed_steps=3)
        for m, px, s, mib in [("a", 32, 0.01, 10), ("b", 32, 0.02, 12), ("a", 64, 0.04, 20), ("b", 64, 0.32, 40)]
    ]
    table = cost.cost_table(rows, {"a": "window", "b": "ViT"}).splitlines()
    assert table[0] == "| tokens | px | window s | ViT s | ViT / window | window MiB | ViT MiB |"
    assert table[2] == "| 64 | 32 | 0.01 | 0.02 | 2.00x | 10 | 12 |"
    assert table[3] == "| 256 | 64 | 0.04 | 0.32 | 8.00x | 20 | 40 |"
    assert cost.growth(rows, "b") == pytest.approx(16) and cost.growth(rows, "a") == pytest.approx(4)
    cost.write_costs(rows, tmp_path / "cost.csv")
    with open(tmp_path / "cost.csv", newline="") as f:
        assert [r["model"] for r in csv.DictReader(f)] == ["a", "b", "a", "b"]
    cost.plot_costs(rows, {"a": "window", "b": "ViT"}, {"N": "a", "N log N": "a", "N^2": "b"}, tmp_path / "c.png", "t")
    assert (tmp_path / "c.png").stat().st_size > 10_000
