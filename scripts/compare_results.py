"""Print training runs next to the paper's tables (arXiv:2503.12355).

    python scripts/compare_results.py runs/table1_atlas_b16_1024 runs/table1_vit_b16_1024
    python scripts/compare_results.py runs/*/metrics.jsonl --all
    python scripts/compare_results.py --params

Each run is an output folder of scripts/train.py (or its metrics.jsonl). The run's config keys paper_table and
paper_row place it in a table of scripts/data/paper_results.yaml; runs without them are listed at the end.
The paper's runtimes come from one node of 8x H100: compare runtimes only on the same hardware.

``--params`` builds the model of every Table 1-3 config (on the meta device: no memory) and prints its
parameter count at the config's size, where the config leaves the architecture as its authors define it also
at their setting (224px, 1000 classes) next to the count they report, and where the model's code comes from.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import yaml

SCRIPTS = Path(__file__).resolve().parent
PAPER = SCRIPTS / "data" / "paper_results.yaml"
CONFIGS = SCRIPTS / "configs"

# model.name -> (millions of parameters its authors report at 224px with 1000 classes, where they report it)
AUTHORS_PARAMS_M = {
    "vit_base_patch16_224": (86.0, "ViT-B/16: Dosovitskiy et al. 2021, Table 1"),
    "swin_base_patch4_window7_224": (88.0, "Swin-B: Liu et al. 2021, Table 1"),
    "convnext_base": (89.0, "ConvNeXt-B: Liu et al. 2022, Table 1"),
    # the README's number; its package's FasterViT-4 (faster_vit_4_224 as the any-resolution one) has 365.6M
    "fastervit/faster_vit_4_any_res": (424.6, "FasterViT-4: NVlabs/FasterViT README"),
    "mambavision_base": (97.7, "MambaVision-B: NVlabs/MambaVision README"),
    "mambavision_small": (50.1, "MambaVision-S: NVlabs/MambaVision README"),
}


@dataclass
class Run:
    """What one run's metrics.jsonl says about it."""

    name: str
    paper_table: int | None
    paper_row: str | None
    hardware: str
    epochs_done: int
    epochs: int | None
    best_top1: float | None
    last_top1: float | None
    elapsed_h: float | None
    evaluation: str  # the validation protocol the run used


def read_run(path: Path) -> Run:
    metrics = path / "metrics.jsonl" if path.is_dir() else path
    if not metrics.is_file():
        raise SystemExit(f"error: {metrics} not found; pass a run's output folder or its metrics.jsonl")
    info, epochs = {}, {}
    for n, line in enumerate(metrics.read_text().splitlines(), 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            print(f"warning: {metrics}:{n} is not JSON; skipped", file=sys.stderr)
            continue
        if record.get("kind") == "run":
            info = record
        elif record.get("kind") == "epoch":
            epochs[record["epoch"]] = record  # a resumed run repeats epochs: the last record wins
    evaluated = [r for _, r in sorted(epochs.items()) if r.get("val_top1") is not None]
    scores = [max(r["val_top1"], r.get("ema_top1") or 0.0) for r in evaluated]
    last = epochs[max(epochs)] if epochs else {}
    if "eval_every" in info:
        images = evaluated[-1].get("val_images", "?") if evaluated else "?"
        protocol = ", per-rank drop_last: the released protocol" if info.get("eval_drop_last") else ""
        evaluation = f"every {info['eval_every']} epoch(s) on {images} validation images{protocol}"
    else:
        evaluation = "protocol not recorded"
    return Run(
        name=str(metrics.parent if metrics.name == "metrics.jsonl" else metrics),
        paper_table=info.get("paper_table"),
        paper_row=info.get("paper_row"),
        hardware=f"{info['world_size']}x {info['device'].split(':')[0]}" if info else "?",
        epochs_done=max(epochs, default=0),
        epochs=info.get("epochs"),
        best_top1=max(scores, default=None),
        last_top1=evaluated[-1]["val_top1"] if evaluated else None,
        elapsed_h=last.get("elapsed_h"),
        evaluation=evaluation,
    )


def fmt(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table_lines(title: str, unit: str, rows: list[dict], runs: list[Run]) -> list[str]:
    """A markdown table: each paper row, then the runs that reproduce it."""
    lines = [
        f"## {title}",
        "",
        f"| row | paper top-1 | run best top-1 | run last top-1 | best - paper | paper runtime ({unit}) "
        f"| run runtime ({unit}) | epochs | hardware | run |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    scale = 60 if unit == "min" else 1
    for paper in rows:
        matching = [run for run in runs if run.paper_row == paper["row"]]
        for run in matching or [None]:
            if run is None:
                lines.append(f"| {paper['row']} | {fmt(paper['top1'])} | | | | {fmt(paper['runtime'])} | | | | |")
                continue
            delta = None if run.best_top1 is None or paper["top1"] is None else run.best_top1 - paper["top1"]
            runtime = None if run.elapsed_h is None else run.elapsed_h * scale
            lines.append(
                f"| {paper['row']} | {fmt(paper['top1'])} | {fmt(run.best_top1)} | {fmt(run.last_top1)} "
                f"| {'-' if delta is None else f'{delta:+.2f}'} | {fmt(paper['runtime'])} | {fmt(runtime)} "
                f"| {run.epochs_done}/{run.epochs or '?'} | {run.hardware} | {run.name} |"
            )
    shown = [run for paper in rows for run in runs if run.paper_row == paper["row"]]
    lines += [""] + [f"* {run.name}: evaluated {run.evaluation}" for run in shown]
    return lines + ([""] if shown else [])


def code_source(name: str) -> str:
    """Where the code of model ``name`` comes from: this repository, a peer's optional package, or timm."""
    import baselines  # here, not at the top: reading runs needs neither torch nor timm
    import timm

    package = name.partition("/")[0]
    if package in baselines.OPTIONAL_PACKAGES:
        return f"authors' code, optional: {baselines.OPTIONAL_PACKAGES[package][0]}"
    module = timm.models.model_entrypoint(name).__module__
    if module.startswith("baselines."):
        return f"own implementation (scripts/{module.replace('.', '/')}.py)"
    return "Atlas (this repository)" if module.startswith("atlas.") else "timm"


def params_lines() -> list[str]:
    """A markdown table: every Table 1-3 config's model, its parameter count and what its authors report."""
    import baselines
    from trainlib.building import TrainingError, build_model  # builds the models as training does
    from trainlib.config import load_config

    from atlas.profiling import build_on

    def millions(cfg) -> str:
        try:
            model = build_on("meta", partial(build_model, cfg))
            return f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}"
        except TrainingError:
            if cfg.model.name.partition("/")[0] not in baselines.OPTIONAL_PACKAGES:
                raise
            return "not installed"

    lines = [
        "| config | table, row | model | code | params (M) | at 224px, 1000 classes (M) | authors (M) | source |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for path in sorted(CONFIGS.glob("table[123]_*.yaml")):
        cfg = load_config(path)
        authors, source = AUTHORS_PARAMS_M.get(cfg.model.name, (None, "")) if not cfg.model.kwargs else (None, "")
        at_224 = (
            "-" if authors is None else millions(load_config(path, ["model.img_size=224", "data.num_classes=1000"]))
        )
        lines.append(
            f"| {path.name} | {cfg.paper_table}, {cfg.paper_row} | {cfg.model.name} | {code_source(cfg.model.name)} "
            f"| {millions(cfg)} | {at_224} | {fmt(authors, 1)} | {source} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", type=Path, help="run output folders or metrics.jsonl files")
    parser.add_argument("--paper", type=Path, default=PAPER, help="the paper's numbers (YAML)")
    parser.add_argument("--all", action="store_true", help="also print the tables that no run reproduces")
    parser.add_argument("--params", action="store_true", help="print the parameter counts of the Table 1-3 models")
    args = parser.parse_args(argv)
    if not args.runs and not args.params:
        parser.error("give run folders (or metrics.jsonl files), --params, or both")
    if args.params:
        print("\n".join(["## Parameters of the Table 1-3 models", "", *params_lines(), ""]))
    if not args.runs:
        return 0

    paper = yaml.safe_load(args.paper.read_text())
    runs = [read_run(path) for path in args.runs]
    placed = set()
    for number, table in paper.items():
        in_table = [run for run in runs if run.paper_table == number]
        names = {row["row"] for row in table["rows"]}
        for run in in_table:
            if run.paper_row in names:
                placed.add(run.name)
            else:
                print(f"warning: {run.name}: {run.paper_row!r} is not a row of Table {number}", file=sys.stderr)
        if in_table or args.all:
            title = f"Table {number}: {table['title']}"
            print("\n".join(table_lines(title, table["runtime_unit"], table["rows"], in_table)))
    others = [run for run in runs if run.name not in placed]
    if others:
        print("## Runs without a paper row\n\n| run | best top-1 | last top-1 | runtime (h) | epochs | hardware |")
        print("|---|---|---|---|---|---|")
        for run in others:
            print(
                f"| {run.name} | {fmt(run.best_top1)} | {fmt(run.last_top1)} | {fmt(run.elapsed_h)} "
                f"| {run.epochs_done}/{run.epochs or '?'} | {run.hardware} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
