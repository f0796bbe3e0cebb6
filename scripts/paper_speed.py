"""The runtime columns of the paper's Tables 1, 2, 3 and 6, timed side by side on one GPU: one table per paper table.

    python scripts/paper_speed.py                          # one CUDA GPU (80 GB or more), 4 to 6 minutes
    python scripts/paper_speed.py --device cpu --smoke     # the same code path, tiny, on a CPU (CI), about a minute

Every row is the training step of a config of scripts/configs (Table 1: ``table1_*``, Table 2: ``table2_*``,
Table 3: ``table3_*``; Table 6 has none: the Table 1 configs at 1024 and 2048px, its window ViT Atlas-B/16 with
``multiscale: false``), built as scripts/train.py builds it (model, gradient checkpointing, channels-last, AdamW,
loss and mixup, bf16 autocast on CUDA), eager unless ``--compile`` says otherwise, on a fixed random batch of the
config's size, halved while it does not fit. For each row: images/s (the median step after warm-up), peak memory,
MFU (the training FLOPs per image that ``atlas.profiling.count_flops`` counts, times images/s, over the rate of a
large matrix product timed here) and the time per image relative to Atlas's in the same table at the same size,
next to the paper's relative runtime (a row's runtime over Atlas's, from scripts/data/paper_results.yaml).

Each table has a time budget, counted from the start of this script, and what one leaves unused goes to the next:
a row that would not finish in its table's time is a ``skip`` row that says so, as is a row whose optional package
(fastervit) is missing. Each table runs Atlas first, then the rows by importance, MambaVision's last (without
mamba-ssm they are by far the slowest), and is printed in the paper's order. An error fails its row and the rest
still runs; the exit status is 1 if any row failed. The tables, with notes on what differs from the authors' runs
(results.md, printed at the end), and every row (results.csv) are written to ``--out`` after each row.

The smoke plan (``--smoke``) runs the same configs with tiny widths (overrides of ``model.kwargs``), a sixteenth
of the image side (at least 64px) and batch 2, in fp32: its figures check that everything runs, not speed.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import shlex
import sys
import time
import traceback
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from unittest import mock

STARTED = time.perf_counter()  # the tables' budgets count from here: the imports below and start-up included
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `import atlas` from a checkout, installed or not

import baselines  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from baselines import mamba  # noqa: E402
from timm.layers import use_fused_attn  # noqa: E402
from trainlib.building import build_model, build_optimization, build_training_model, compile_mode  # noqa: E402
from trainlib.compiling import COMPILE_MODES  # noqa: E402
from trainlib.config import Config, load_config, to_dict  # noqa: E402
from trainlib.timing import device_name, free_memory, matmul_flop_rate, median_seconds, peak_memory  # noqa: E402

from atlas.profiling import build_on, count_flops  # noqa: E402

CONFIGS = ROOT / "scripts" / "configs"
PAPER = ROOT / "scripts" / "data" / "paper_results.yaml"

# paper row -> config, in the order they run: Atlas first (every row is timed against it), then by importance.
TABLE1 = {
    "Atlas-B": "table1_atlas_b16_1024",
    "ViT-B": "table1_vit_b16_1024",
    "Swin-B": "table1_swin_b_1024",
    "LongViT-B": "table1_longvit_b16_1024",
    "ConvNext-B": "table1_convnext_b_1024",
    "FasterViT-4": "table1_fastervit4_1024",
    "MambaVision-B": "table1_mambavision_b_1024",
}
TABLE2 = {"Atlas-S/16": "table2_atlas_s16", "MambaVision-S/16": "table2_mambavision_s16"}  # config: + _<size>
TABLE3 = {
    "Multi-scale attention (Atlas)": "table3_msa",
    "ViT": "table3_vit",
    "Window ViT": "table3_window_vit",
    "Shifted-window ViT (Swin)": "table3_swin",
    "Dilated attention (LongViT)": "table3_longvit_dilated",
    "Hierarchical attention (FasterViT)": "table3_fastervit_hat",
    "MambaVisionMixer": "table3_mambavision_mixer",  # last: without mamba-ssm, 1152 Python steps of scan per block
}
# Table 6: the model of a Table 1 config at the size, and `--set` overrides (the window ViT: one scale of windows).
TABLE6 = {
    "Atlas-B/16": ("table1_atlas_b16_1024",),
    "ViT-B/16": ("table1_vit_b16_1024",),
    "WViT-B/16": ("table1_atlas_b16_1024", "model.kwargs={multiscale: false}"),
    "MambaVision-B/16": ("table1_mambavision_b_1024",),
    "LongViT-B/16": ("table1_longvit_b16_1024",),
    "ConvNext-B/16": ("table1_convnext_b_1024",),
    "FasterViT-4": ("table1_fastervit4_1024",),
}

# --smoke: each model's tiny widths, merged into its config's model.kwargs (Atlas: 4x4 patches and windows of 4x4
# tokens, so that each size keeps its number of scales). A model without an entry is a skip row.
SMOKE_VIT = {"embed_dim": 32, "num_heads": 2, "depth": 2}
SMOKE_ATLAS = {"embed_dim": 32, "num_heads": 2, "stem_width": 8, "patch_size": 4, "window_size": 4}
SMOKE_ATLAS["depths_by_scales"] = {1: [1], 2: [1, 1], 3: [1, 1, 1]}  # Table 3 keeps its depths: [4]
SMOKE_MAMBA = {"dim": 8, "stem_dim": 8, "depths": [1, 1, 2, 2], "num_heads": [1, 1, 1, 1], "window_size": [4, 4, 2, 2]}
SMOKE_KWARGS = {
    "atlas_base_patch16": SMOKE_ATLAS,
    "atlas_small_patch16": SMOKE_ATLAS,
    "vit_base_patch16_224": SMOKE_VIT,
    "longvit_base_patch16": SMOKE_VIT,
    "hat_vit_base_patch16": SMOKE_VIT,
    "vit_mambavision_mixer_base_patch16": SMOKE_VIT,
    "swin_base_patch4_window7_224": {"embed_dim": 24, "window_size": 4},  # 24: 4 to 32 heads (Table 1), 12 (Table 3)
    "convnext_base": {"dims": [8, 16, 32, 64], "depths": [1, 1, 1, 1]},
    "mambavision_base": SMOKE_MAMBA,
    "mambavision_small": SMOKE_MAMBA,
}
CSV_COLUMNS = (
    "table", "row", "config", "overrides", "px", "config_batch", "batch", "step", "images_per_s", "peak_gib", "mfu",
    "tflop_per_image", "first_step_s", "seconds", "time_vs_atlas", "paper_time_vs_atlas", "paper_runtime",
    "paper_unit", "result", "why",
)  # fmt: skip


@dataclass(frozen=True)
class Row:
    """One row of a paper table: the config that trains its model, and the Atlas row it is timed against."""

    table: int
    paper_row: str  # as in scripts/data/paper_results.yaml
    config: str  # scripts/configs/<config>.yaml
    overrides: tuple[str, ...]  # `--set` overrides of the config
    atlas: str  # the paper row of Atlas at the same size (itself for Atlas)
    pytorch_scan: bool = False  # a MambaVision row once more, with the selective scan in plain PyTorch

    @property
    def name(self) -> str:
        return self.paper_row + " (PyTorch scan)" * self.pytorch_scan


@dataclass(frozen=True)
class Plan:
    budgets_s: dict[int, float]  # seconds per table, in the order the tables run (Table 1's: start-up included)
    warmup: int  # untimed steps (at least 2), the first one included (it allocates, autotunes and compiles)
    timed: int  # at most; fewer (at least one) where the table's time runs short
    matmul_size: int
    smoke: bool


# Sized from the first run on one H200 (2026-12-04, docs/benchmarks.md): each row took 3 to 15 s (ConvNeXt-B 34 s:
# cuDNN's autotuning in NCHW), except the MambaVision rows with the selective scan in plain PyTorch, 31 to 57 s each.
# Every other row fits in about 290 s with start-up; the MambaVision rows run last in each table, in what is left
# (the whole plan would take about 8.5 minutes), and the time guard skips those that do not fit.
GPU_PLAN = Plan(budgets_s={1: 90, 2: 70, 3: 95, 6: 105}, warmup=2, timed=4, matmul_size=8192, smoke=False)
SMOKE_PLAN = Plan(budgets_s={1: 45, 2: 40, 3: 30, 6: 40}, warmup=2, timed=2, matmul_size=512, smoke=True)


def is_mamba(model_name: str) -> bool:
    """Whether the model is one of scripts/baselines/mamba.py (whose scan mamba-ssm's kernel replaces)."""
    return timm.is_model(model_name) and timm.models.model_entrypoint(model_name).__module__ == mamba.__name__


def scan_kernel(device: torch.device) -> bool:
    """Whether MambaVision's selective scan runs mamba-ssm's CUDA kernel here."""
    return mamba.selective_scan_fn is not None and device.type == "cuda"


def model_name(row: Row) -> str:
    """The timm name of the model a row trains."""
    return load_config(CONFIGS / f"{row.config}.yaml", list(row.overrides)).model.name


def plan_rows(kernel: bool) -> list[Row]:
    """Every row of the four tables; with mamba-ssm's kernel (``kernel``), also each MambaVision row with the scan
    in plain PyTorch, last in its table."""
    rows = [Row(1, name, config, (), "Atlas-B") for name, config in TABLE1.items()]
    for size in (1024, 2048, 4096):
        rows += [Row(2, f"{m} @{size}", f"{c}_{size}", (), f"Atlas-S/16 @{size}") for m, c in TABLE2.items()]
    rows += [Row(3, name, config, (), "Multi-scale attention (Atlas)") for name, config in TABLE3.items()]
    for size in (1024, 2048):
        for model, (config, *overrides) in TABLE6.items():
            rows.append(
                Row(6, f"{model} @{size}", config, (*overrides, f"model.img_size={size}"), f"Atlas-B/16 @{size}")
            )
    if kernel:
        rows += [
            Row(r.table, r.paper_row, r.config, r.overrides, r.atlas, pytorch_scan=True)
            for r in rows
            if is_mamba(model_name(r))
        ]
    # By table, MambaVision rows (the slowest by far without mamba-ssm) last in each; otherwise the order above.
    return sorted(rows, key=lambda r: (list(GPU_PLAN.budgets_s).index(r.table), is_mamba(model_name(r))))


def row_config(row: Row, plan: Plan, compile_setting: str) -> tuple[Config | None, str]:
    """The config of a row as it runs in ``plan`` (--smoke: shrunk), or None and why the row is skipped."""
    path = CONFIGS / f"{row.config}.yaml"
    overrides = [*row.overrides, *([f"train.compile={compile_setting}"] if compile_setting != "config" else [])]
    cfg = load_config(path, overrides)
    package = cfg.model.name.partition("/")[0]
    if package in baselines.OPTIONAL_PACKAGES and importlib.util.find_spec(package) is None:
        return None, f"{package} is not installed ({baselines.OPTIONAL_PACKAGES[package][0]})"
    if not plan.smoke:
        return cfg, ""
    if cfg.model.name not in SMOKE_KWARGS:
        return None, f"no tiny {cfg.model.name} for --smoke"
    kwargs = SMOKE_KWARGS[cfg.model.name].items()
    tiny = [f"model.kwargs.{key}={yaml.safe_dump(value, default_flow_style=True).strip()}" for key, value in kwargs]
    side = max(64, cfg.model.img_size // 16)
    return load_config(path, [*overrides, *tiny, f"model.img_size={side}", "train.batch_size=2", "train.amp=none"]), ""


# -- timing one row ----------------------------------------------------------------------------------------
def time_at_batch(cfg: Config, batch: int, plan: Plan, device: torch.device, deadline: float) -> dict:
    """Images/s of the config's training step at ``batch`` (the median step after warm-up), peak memory, how it
    compiled and the first step's time. The last warm-up step is timed too, to time ``plan.timed`` steps after it
    or as many as fit before ``deadline`` (at least one)."""
    size = cfg.model.img_size
    with peak_memory(device) as memory:
        with torch.device(device):  # the weights made on the device (train.py makes them on the CPU, then moves)
            raw_model, model, _, _ = build_training_model(cfg, device, distributed=False, resume=None)
        opt = build_optimization(cfg, raw_model, steps_per_epoch=1, world=1, device=device)
        images = torch.randn(batch, 3, size, size, device=device)
        if cfg.train.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = torch.randint(0, cfg.data.num_classes, (batch,), device=device)

        def step() -> None:
            inputs, targets = opt.mixup(images, labels) if opt.mixup else (images, labels)
            with opt.autocast():
                loss = opt.loss_fn(model(inputs), targets)
            loss.backward()
            opt.optimizer.step()
            opt.optimizer.zero_grad(set_to_none=True)

        first_step_s = median_seconds(step, 0, 1, device)["wall"]  # allocates, autotunes, compiles
        step_s = median_seconds(step, plan.warmup - 2, 1, device)["wall"]
        timed = min(max(int((deadline - time.perf_counter()) / step_s), 1), plan.timed)
        seconds = median_seconds(step, 0, timed, device)["wall"]
    return dict(
        batch=batch,
        images_per_s=batch / seconds,
        peak_gib=memory["mib"] / 1024,
        compile=compile_mode(cfg.train.compile, raw_model, device),
        first_step_s=first_step_s,
    )


def time_row(cfg: Config, plan: Plan, device: torch.device, deadline: float) -> dict:
    """:func:`time_at_batch` at the config's batch, halved while it does not fit (down to 2: mixup pairs images),
    and the training FLOPs per image."""
    torch.backends.cudnn.benchmark = not cfg.train.deterministic  # as train.py sets it
    size, batch = cfg.model.img_size, cfg.train.batch_size
    # Forward and backward on the meta device, without the forward pass that checkpointing recomputes, and without
    # MambaVision's selective scan (under 1% of its FLOPs, but in plain PyTorch a loop over chunks of 8 tokens that
    # takes minutes to count at Table 3's 9216 tokens).
    with mock.patch.object(mamba, "selective_scan", lambda u, *args, **kwargs: u):
        flops = count_flops(build_on("meta", partial(build_model, cfg)), (1, 3, size, size), backward=True)
    while batch >= 2:
        try:
            return dict(
                flops=flops, config_batch=cfg.train.batch_size, **time_at_batch(cfg, batch, plan, device, deadline)
            )
        except torch.cuda.OutOfMemoryError:
            pass  # released below, after the except block (whose traceback holds the step's tensors)
        free_memory()
        batch //= 2
    raise torch.cuda.OutOfMemoryError(f"out of memory at every batch from {cfg.train.batch_size} down to 2")


def step_text(cfg: Config, mode: str, row: Row, device: torch.device) -> str:
    """How a row's step ran: eager or compiled, with gradient checkpointing or not, and which selective scan."""
    parts = ["eager" if mode == "none" else f"compiled ({mode})"] + ["ckpt"] * cfg.train.grad_checkpointing
    if is_mamba(cfg.model.name):
        parts.append("mamba-ssm scan" if scan_kernel(device) and not row.pytorch_scan else "PyTorch scan")
    return ", ".join(parts)


def measure(row: Row, cfg: Config, plan: Plan, device: torch.device, deadline: float, rate: float) -> tuple:
    """(result, why, figures) of one row: ok with its figures, or fail with the error."""
    begin = time.perf_counter()
    try:
        with mock.patch.object(mamba, "selective_scan_fn", None) if row.pytorch_scan else nullcontext():
            measured = time_row(cfg, plan, device, deadline)
        figures = dict(measured, px=cfg.model.img_size, step=step_text(cfg, measured["compile"], row, device))
        outcome = "ok", "", dict(figures, mfu=measured["flops"] * measured["images_per_s"] / rate)
    except Exception as error:  # one row failing is a row of the table, not the end of the run
        traceback.print_exc()
        lines = str(error).strip().splitlines()
        outcome = "fail", f"{type(error).__name__}: {lines[0] if lines else ''}"[:240], {}
    free_memory()  # after the except block, whose traceback held the row's tensors
    outcome[2]["seconds"] = round(time.perf_counter() - begin, 1)
    return outcome


@dataclass
class Budget:
    """A table's time guard: a row starts only while more time is left than the longest row so far took."""

    deadline: float  # time.perf_counter() by which the table's rows must be done
    longest: float = 0.0

    def stop(self) -> str:
        """Why no row may start now, or ""."""
        left = self.deadline - time.perf_counter()
        if left > self.longest:
            return ""
        return f"time guard: {max(left, 0):.0f} s of the table's time left, a row took {self.longest:.0f} s"


# -- the tables ------------------------------------------------------------------------------------------
@dataclass
class Report:
    """Every row so far next to the paper's numbers, written to ``out`` (results.csv, results.md) after each row."""

    out: Path
    header: str
    notes: list[str]
    paper: dict = field(default_factory=lambda: yaml.safe_load(PAPER.read_text()))
    rows: list[tuple[Row, str, str, dict]] = field(default_factory=list)  # (row, result, why, figures)

    def add(self, row: Row, result: str, why: str = "", figures: dict | None = None) -> None:
        figures = figures or {}
        self.rows.append((row, result, why, figures))
        if "images_per_s" in figures:
            why = (
                f"{figures['images_per_s']:.3g} img/s at batch {figures['batch']}, peak {figures['peak_gib']:.1f} "
                f"GiB, MFU {figures['mfu']:.1%}, first step {figures['first_step_s']:.1f} s"
            )
        print(f"  Table {row.table}, {row.name}: {result} {why}", flush=True)
        self.save()

    def runtime(self, table: int, paper_row: str) -> float | None:
        """The paper's runtime of a row, in the table's unit (None where the paper has none)."""
        return next(r["runtime"] for r in self.paper[table]["rows"] if r["row"] == paper_row)

    def records(self) -> list[dict]:
        """One record per row, the CSV's columns, in the tables' order and each table in the paper's."""
        speeds = {(row.table, row.name): figures.get("images_per_s") for row, _, _, figures in self.rows}
        records = []
        for row, result, why, figures in self.rows:
            paper_rows = [r["row"] for r in self.paper[row.table]["rows"]]
            runtime, atlas_runtime = self.runtime(row.table, row.paper_row), self.runtime(row.table, row.atlas)
            speed, atlas_speed = figures.get("images_per_s"), speeds.get((row.table, row.atlas))
            record = {column: figures.get(column, "") for column in CSV_COLUMNS}
            record.update(
                table=row.table,
                row=row.name,
                config=row.config,
                overrides=shlex.join(row.overrides),  # as `--set` takes them
                tflop_per_image=figures["flops"] / 1e12 if "flops" in figures else "",
                time_vs_atlas=atlas_speed / speed if speed and atlas_speed else "",
                paper_time_vs_atlas=runtime / atlas_runtime if runtime and atlas_runtime else "",
                paper_runtime="" if runtime is None else runtime,
                paper_unit=self.paper[row.table]["runtime_unit"],
                result=result,
                why=why,
            )
            order = (list(GPU_PLAN.budgets_s).index(row.table), paper_rows.index(row.atlas))
            records.append((order + (paper_rows.index(row.paper_row), row.pytorch_scan), record))
        return [record for _, record in sorted(records, key=lambda pair: pair[0])]

    def markdown(self, records: list[dict]) -> str:
        lines = [f"# The paper's runtimes, timed here\n\n{self.header}\n"]
        for table in dict.fromkeys(r["table"] for r in records):
            lines += [
                f"## Table {table}: {self.paper[table]['title']}\n",
                "| row | config | px | batch | step | img/s | peak GiB | MFU | time vs Atlas | paper: time vs Atlas "
                f"| paper runtime ({self.paper[table]['runtime_unit']}) | result |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|",
            ]
            for r in (r for r in records if r["table"] == table):
                config = f"`{r['config']}`" + (f" `--set {r['overrides']}`" if r["overrides"] else "")
                cells = (
                    r["row"], config, r["px"], r["batch"], r["step"], fmt(r["images_per_s"], ".3g"),
                    fmt(r["peak_gib"], ".1f"), fmt(r["mfu"], ".1%"), fmt(r["time_vs_atlas"], ".2f", "x"),
                    fmt(r["paper_time_vs_atlas"], ".2f", "x"), fmt(r["paper_runtime"], "g"),
                    r["result"] + (f": {r['why']}" if r["why"] else ""),
                )  # fmt: skip
                lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
            lines.append("")
        halved = [
            f"{r['row']} (Table {r['table']}) {r['config_batch']} -> {r['batch']}"
            for r in records
            if r["batch"] != r["config_batch"]
        ]
        notes = [*self.notes, *([f"Batches halved to fit here: {', '.join(halved)}."] if halved else [])]
        return "\n".join([*lines, "Notes:\n", *(f"- {note}" for note in notes), ""])

    def save(self) -> str:
        """Write results.csv and results.md; the Markdown."""
        records = self.records()
        with (self.out / "results.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
            writer.writeheader()
            writer.writerows(records)
        text = self.markdown(records)
        (self.out / "results.md").write_text(text)
        return text


def fmt(value, spec: str, suffix: str = "") -> str:
    return "" if value == "" else f"{value:{spec}}{suffix}"


def notes(plan: Plan, device: torch.device, rate: float, compile_setting: str) -> list[str]:
    """What differs from the authors' runs that moves a row's speed, and how the figures are made."""
    dtype = "bf16" if device.type == "cuda" else "fp32"
    swin = "fused SDPA" if use_fused_attn(experimental=True) else "softmax(q k^T) in plain ops (timm's default)"
    scan = (
        "mamba-ssm's CUDA kernel, as the authors run it; the rows marked (PyTorch scan) time the same models with "
        "the plain-PyTorch scan of scripts/baselines/mamba.py"
        if scan_kernel(device)
        else "the selective scan in plain PyTorch, in chunks (scripts/baselines/mamba.py), not mamba-ssm's CUDA "
        "kernel that the authors use: slower than theirs (the kernel: pip install -e '.[mamba]')"
    )
    compiled = {
        "none": "every row eager (--compile none, the default): no config file sets train.compile, and compiling "
        "each Atlas row would not fit the plan's time. train.py's default (train.compile: auto) compiles Atlas "
        "models block by block (regional) on a GPU and runs the others eager: --compile config times each row as "
        "train.py trains it",
        "config": "each config's train.compile (auto: Atlas models compiled block by block on a GPU, the others "
        "eager, as train.py trains them), so that Atlas's rows include a speed-up that the baselines' do not get",
    }.get(compile_setting, f"train.compile={compile_setting} in every row (--compile)")
    fastervit = baselines.OPTIONAL_PACKAGES["fastervit"][0]
    lines = [
        "The paper's runtimes are whole training runs on one node of 8x H100 (data loading and evaluation "
        "included); its relative time is a row's runtime over Atlas's in the same table (Tables 2 and 6: at the "
        "same size). Here: the training step alone, on a fixed random batch on one device; time vs Atlas is "
        "Atlas's images/s over the row's (the time per image relative to Atlas's).",
        "Batch: each config's per-GPU batch (train.batch_size: 32; Table 2: 16 at 2048px and 4 at 4096px, with "
        "gradient checkpointing), halved until it fits; the paper's runs reach a global batch of 2048 by "
        "accumulation over 8 GPUs. Table 6 has no configs: the Table 1 configs at the size (its 1024px rows are "
        "Table 1's measurements); WViT-B/16 is Atlas-B/16 with multiscale: false.",
        f"Compilation: {compiled}. The step column says how each row ran; its first step (first_step_s in the "
        "CSV) includes any compiling.",
        "Attention kernels: ViT-B, Atlas (MSA and the window ViT) and the hierarchical-attention block call "
        "F.scaled_dot_product_attention (fused kernels on CUDA); Swin-B runs timm's window attention with "
        f"{swin}, TIMM_FUSED_ATTN=2 turns on its SDPA path; LongViT is our dilated attention "
        "(scripts/baselines/dilated.py), each pair's score matrix in full, not torchscale's flash-attention "
        "kernel: slower and larger than the authors'.",
        f"MambaVision-B, -S and Table 3's mixer: {scan}.",
        f"FasterViT-4: the authors' package, only with its optional extra ({fastervit}), a skip row without it; "
        "Table 3's hierarchical attention is our block (scripts/baselines/hierarchical.py).",
        "ConvNeXt-B: timm's, in NCHW memory format, as its config trains it (train.channels_last: false).",
        "MFU: training FLOPs per image (forward and backward, counted on the meta device, without the forward "
        "pass that gradient checkpointing recomputes nor MambaVision's selective scan, under 1% of its FLOPs) x "
        f"images/s / {rate / 1e12:.3g} TFLOP/s, the rate of a "
        f"{dtype} {plan.matmul_size}^3 matrix product here. Peak memory: the row's allocations on the GPU (on a "
        "CPU: the peak resident memory above the start).",
    ]
    if plan.smoke:
        lines.append(
            "Smoke plan: tiny widths, a sixteenth of the image side (at least 64px), batch 2, fp32; the figures "
            "check that everything runs, not speed."
        )
    return lines


# -- main ------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda if a GPU is visible, else cpu")
    parser.add_argument("--smoke", action="store_true", help="tiny widths and sizes, fp32 (CI on a CPU)")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "paper_speed", help="(%(default)s)")
    tables = list(GPU_PLAN.budgets_s)
    parser.add_argument("--tables", type=int, nargs="+", choices=tables, default=tables, help="(default: all)")
    parser.add_argument(
        "--compile",
        choices=["config", "auto", *COMPILE_MODES],
        default="none",
        help="train.compile of every row; config: each config's own (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    if args.device == "cuda" and not cuda:
        parser.error("--device cuda: no CUDA GPU is visible; on a CPU run --device cpu --smoke")
    args.device = args.device or ("cuda" if cuda else "cpu")
    if args.device == "cpu" and not args.smoke:
        parser.error("the full plan is sized for one GPU of 80 GB or more; on a CPU run --device cpu --smoke")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device, plan = torch.device(args.device), SMOKE_PLAN if args.smoke else GPU_PLAN
    args.out.mkdir(parents=True, exist_ok=True)
    if device.type == "cpu":  # speed is not the point on a CPU; 2 threads on a busy 2-core machine crawl
        torch.set_num_threads(1)
    name = device_name(device)
    rate = matmul_flop_rate(plan.matmul_size, device)
    header = (
        f"device: {name}; torch {torch.__version__}, timm {timm.__version__}; plan: "
        f"{'smoke' if plan.smoke else 'full'}, {plan.warmup} warm-up and up to {plan.timed} timed steps per row"
    )
    print(f"{header}\ntable budgets (s): {plan.budgets_s}", flush=True)
    report = Report(args.out, header, notes(plan, device, rate, args.compile))
    rows, cache = plan_rows(scan_kernel(device)), {}  # cache: a config's (result, why, figures), for Table 6
    deadline = STARTED
    for table in (t for t in plan.budgets_s if t in args.tables):
        deadline += plan.budgets_s[table]
        budget = Budget(deadline)
        print(f"Table {table}: {deadline - time.perf_counter():.0f} s left", flush=True)
        for row in (r for r in rows if r.table == table):
            cfg, why = row_config(row, plan, args.compile)
            if cfg is None:
                report.add(row, "skip", why)
                continue
            key = (json.dumps(to_dict(cfg), sort_keys=True), row.pytorch_scan)
            if key not in cache and (why := budget.stop()):
                report.add(row, "skip", why)
                continue
            if key not in cache:
                cache[key] = measure(row, cfg, plan, device, budget.deadline, rate)
                budget.longest = max(budget.longest, cache[key][2]["seconds"])
            report.add(row, *cache[key])
    print(f"\nresults in {args.out}\n\n{report.save()}")
    failed = sum(result == "fail" for _, result, _, _ in report.rows)
    print(f"total {time.perf_counter() - STARTED:.0f} s; {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
