"""What attention costs as the image grows: one training step's time and peak memory, model by model, size by size.

Used by ``scripts/demo.py`` (its cost part): window attention, MSA and a ViT of the same width, each at a series
of image sizes, on the CPU at batch 1 (forward and backward of the output's sum), the models interleaved at each
size in one process so that they meet the same machine state, after one unrecorded step of each at the smallest
size (the process's one-time set-up: thread pools, oneDNN's first kernels). Time: the median of three steps after
a warm-up step; a warm-up step longer than ``single_step_s`` is the measurement itself (its allocations are then
a small part of it). Memory: the peak resident memory of the process above its level before the warm-up step
(`trainlib.timing.peak_memory`).
"""

from __future__ import annotations

import csv
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .timing import median_seconds, peak_memory

CPU = torch.device("cpu")
COLUMNS = ("model", "px", "tokens", "seconds", "peak_mib", "timed_steps")


def step_cost(model: nn.Module, px: int, single_step_s: float = 1.0) -> dict:
    """Seconds and peak MiB of one forward and backward pass of ``model`` on one random ``px`` x ``px`` image."""
    images = torch.randn(1, 3, px, px)

    def step() -> None:
        model(images).float().sum().backward()
        model.zero_grad(set_to_none=True)

    with peak_memory(CPU) as memory:
        begin = time.perf_counter()
        step()  # the warm-up: allocations, oneDNN's kernel choice
        first_s = time.perf_counter() - begin
    if first_s > single_step_s:
        return dict(seconds=first_s, peak_mib=memory["mib"], timed_steps=1)
    seconds = median_seconds(step, 0, 3, CPU)["wall"]
    return dict(seconds=seconds, peak_mib=memory["mib"], timed_steps=3)


def measure_costs(
    builders: dict[str, Callable[[int], nn.Module]],
    sizes_px: tuple[int, ...],
    tokens: Callable[[int], int],
    report: Callable[[dict], None] = print,
) -> list[dict]:
    """One row per (size, model), sizes in increasing order, the models interleaved at each size.

    ``builders[name](px)`` builds the model ``name`` for ``px`` pixels; ``tokens(px)`` is the number of tokens of
    the finest scale at that size. ``report`` gets each row as it is measured.
    """
    for build in builders.values():  # the process's one-time set-up, before anything is recorded
        step_cost(build(min(sizes_px)), min(sizes_px))
    rows = []
    for px in sorted(sizes_px):
        for name, build in builders.items():
            torch.manual_seed(0)
            model = build(px)
            row = dict(model=name, px=px, tokens=tokens(px), **step_cost(model, px))
            del model
            rows.append(row)
            report(row)
    return rows


def growth(rows: list[dict], model: str) -> float:
    """How many times longer ``model``'s step is at the largest size than at the smallest."""
    mine = sorted((r for r in rows if r["model"] == model), key=lambda r: r["tokens"])
    return mine[-1]["seconds"] / mine[0]["seconds"]


def write_costs(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({k: row[k] for k in COLUMNS} for row in rows)


def cost_table(rows: list[dict], labels: dict[str, str]) -> str:
    """Markdown: a line per size, each model's step time and peak memory, and the time ratios to the first model."""
    models = list(labels)
    by_size: dict[int, dict[str, dict]] = {}
    for row in rows:
        by_size.setdefault(row["tokens"], {})[row["model"]] = row
    head = (
        ["tokens", "px"]
        + [f"{labels[m]} s" for m in models]
        + [f"{labels[m]} / {labels[models[0]]}" for m in models[1:]]
    )
    head += [f"{labels[m]} MiB" for m in models]
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for n, by_model in sorted(by_size.items()):
        first = by_model[models[0]]["seconds"]
        cells = [f"{n:,}", str(next(iter(by_model.values()))["px"])]
        cells += [f"{by_model[m]['seconds']:.3g}" for m in models]
        cells += [f"{by_model[m]['seconds'] / first:.2f}x" for m in models[1:]]
        cells += [f"{by_model[m]['peak_mib']:.0f}" for m in models]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_costs(rows: list[dict], labels: dict[str, str], guides: dict[str, str], path: Path, title: str) -> None:
    """Step time and peak memory against tokens, log-log, with dashed N, N log N and N^2 guides.

    ``guides`` maps "N", "N log N" and "N^2" to the model whose largest point the guide passes through.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = {"N": lambda n: n, "N log N": lambda n: n * math.log2(n), "N^2": lambda n: n * n}
    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(11, 4.2))
    tokens = sorted({r["tokens"] for r in rows})
    for model, label in labels.items():
        mine = sorted((r for r in rows if r["model"] == model), key=lambda r: r["tokens"])
        ax_time.plot([r["tokens"] for r in mine], [r["seconds"] for r in mine], "o-", label=label)
        ax_mem.plot([r["tokens"] for r in mine], [r["peak_mib"] for r in mine], "o-", label=label)
    for (shape, model), style in zip(guides.items(), (":", "--", "-."), strict=True):
        end = max((r for r in rows if r["model"] == model), key=lambda r: r["tokens"])
        scale = end["seconds"] / shapes[shape](end["tokens"])
        ax_time.plot(tokens, [scale * shapes[shape](n) for n in tokens], style, color="grey", lw=1, label=f"∝ {shape}")
    for ax, what in ((ax_time, "training step (s), batch 1"), (ax_mem, "peak memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens at the finest scale (N)")
        ax.set_ylabel(what)
        ax.grid(True, which="major", alpha=0.3)
    ax_time.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
