"""The paper's communication ablation (Table 4) at CPU scale: ``make demo``, i.e. ``python scripts/demo.py``.

Trains the variants of Table 4 (window attention, multi-scale only, + bottom-up, + top-down, full MSA) and a
global-attention ViT of the same size on the long-range matching task of ``atlas/longrange.py``, each through
``scripts/train.py`` with its config in ``scripts/configs/demo/``, then prints our accuracy and training time
next to the paper's top-1 and writes to ``results/demo/``:

    table.csv, table.md     accuracy, final loss, training time and size of each variant, next to the paper's
                            Table 4 top-1
    learning_curves.png     validation accuracy and training loss after every epoch
    accuracy.png            the final accuracies as bars, next to the paper's
    atlas_msa.pt            the trained MSA model: {"model_name", "model_kwargs", "state_dict", "task", ...}
    runs/<variant>/         train.py's output folder of each variant (config, metrics, checkpoints)

The attention notebook reads its copy of a model trained this way, in float16, from
``notebooks/assets/atlas_tiny_longrange.pt``; ``--save-asset`` replaces it with this run's MSA model (nbval then
compares the notebook against its stored outputs, which a retrained model changes: re-execute it too). The
paper trains on ImageNet-100 at 256px; we train on a synthetic task that needs long-range communication, so
compare the ordering and the gaps, not the values.

    python scripts/demo.py                              # all variants, about 6 minutes on 2 CPU cores
    python scripts/demo.py --variants window msa        # a subset
    python scripts/demo.py --seed 2                     # another initialisation and data order
    python scripts/demo.py --quick --out /tmp/demo      # a smoke test in seconds (tiny data, 2 epochs)
"""

from __future__ import annotations

import os

# OpenMP threads that spin while they wait stall badly when other jobs share the cores; passive ones yield.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import csv  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402
import textwrap  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import train  # noqa: E402  (scripts/train.py: this folder is on sys.path when the demo runs as a script)
from trainlib.config import Config, load_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "scripts" / "configs" / "demo"
ASSET = ROOT / "notebooks" / "assets" / "atlas_tiny_longrange.pt"
VARIANTS = ("window", "multiscale", "bottom_up", "top_down", "msa", "vit")  # table order; each has a config
QUICK = [
    "data.kwargs.train_size=16",
    "data.kwargs.val_size=8",
    "train.batch_size=8",
    "schedule.epochs=2",
    "schedule.warmup_epochs=0",
]


@dataclass
class Result:
    """One trained variant, as its config and train.py's metrics.jsonl describe it."""

    variant: str
    name: str  # the config's description
    paper_top1: float | None
    top1: float  # validation top-1 after the last epoch (%)
    loss: float  # mean training loss of the last epoch: tells a confident solution from a barely correct one
    train_s: float  # training time, evaluation excluded
    params: int
    epochs: list[dict]  # train.py's "epoch" records: step, val_top1, epoch_time_s, ...
    steps: list[dict]  # its "step" records (every train.log_every steps): step, loss, ...


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "demo", help="where results go")
    parser.add_argument("--quick", action="store_true", help="tiny data and 2 epochs: checks the pipeline only")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--seed", type=int, help="seed of every run (default: the configs' seed, 0)")
    parser.add_argument("--save-asset", action="store_true", help=f"also save the MSA model to {ASSET.name}")
    return parser.parse_args(argv)


def read_records(run_dir: Path, kind: str) -> list[dict]:
    """The records of one kind ("epoch", "step", ...) in a run's metrics.jsonl."""
    records = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return [r for r in records if r["kind"] == kind]


def train_variant(variant: str, out: Path, overrides: list[str]) -> tuple[Result, Config]:
    """Train one variant with scripts/train.py into ``out/runs/<variant>`` (replacing an earlier run)."""
    config = CONFIGS / f"{variant}.yaml"
    run_dir = out / "runs" / variant
    shutil.rmtree(run_dir, ignore_errors=True)
    settings = [f"output_dir={run_dir}", *overrides]
    train.main(["--config", str(config), "--set", *settings])
    cfg = load_config(config, settings)
    epochs = read_records(run_dir, "epoch")
    result = Result(
        variant=variant,
        name=cfg.description,
        paper_top1=cfg.paper_top1,
        top1=epochs[-1]["val_top1"],
        loss=epochs[-1]["train_loss"],
        train_s=sum(e["epoch_time_s"] for e in epochs),
        params=read_records(run_dir, "run")[-1]["params"],
        epochs=epochs,
        steps=read_records(run_dir, "step"),
    )
    return result, cfg


def save_model(run_dir: Path, cfg: Config, top1: float, path: Path, dtype: torch.dtype = torch.float32) -> None:
    """The final weights of a run and what rebuilds the model, loadable with ``torch.load(weights_only=True)``.

    ``timm.create_model(ckpt["model_name"], **ckpt["model_kwargs"]).load_state_dict(ckpt["state_dict"])``
    (after ``import atlas``); ``ckpt["task"]`` holds the options of the dataset it was trained on.
    """
    state = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)["model"]
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    kwargs = dict(img_size=cfg.model.img_size, num_classes=cfg.data.num_classes, **cfg.model.kwargs)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "model_name": cfg.model.name,
            "model_kwargs": kwargs,
            "state_dict": state,
            "task": {"name": cfg.data.name, **cfg.data.kwargs},
            "val_top1": top1,
            "description": f"{cfg.description}, trained by scripts/demo.py",
        },
        path,
    )


def table_rows(results: list[Result]) -> list[dict]:
    def fmt(x):
        return "-" if x is None else f"{x:.2f}"

    return [
        {
            "variant": r.name,
            "paper top-1 (%)": fmt(r.paper_top1),
            "our top-1 (%)": fmt(r.top1),
            "our last-epoch train loss": f"{r.loss:.3f}",
            "train time (s)": f"{r.train_s:.0f}",
            "parameters": f"{r.params:,}",
        }
        for r in results
    ]


def markdown(rows: list[dict]) -> str:
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row[k] for k in header) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_tables(results: list[Result], out: Path) -> str:
    """table.csv and table.md in ``out``; returns the Markdown."""
    rows = table_rows(results)
    with open(out / "table.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    text = markdown(rows)
    (out / "table.md").write_text(text)
    return text


def plot_curves(results: list[Result], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(11, 4.6))
    for r in results:
        acc_ax.plot([e["step"] for e in r.epochs], [e["val_top1"] for e in r.epochs], marker="o", label=r.name)
        loss_ax.plot([s["step"] for s in r.steps], [s["loss"] for s in r.steps], label=r.name)
    acc_ax.axhline(50, color="grey", linestyle="--", linewidth=1, label="chance")
    acc_ax.set(xlabel="training step", ylabel="validation top-1 (%)", title="accuracy after each epoch", ylim=(0, 102))
    loss_ax.axhline(math.log(2), color="grey", linestyle="--", linewidth=1)
    loss_ax.set(xlabel="training step", ylabel="cross-entropy", title="training loss")
    handles, labels = acc_ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8)
    fig.suptitle("long-range matching task (atlas/longrange.py)")
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_bars(results: list[Result], path: Path) -> None:
    import matplotlib.pyplot as plt
    import numpy as np

    x = np.arange(len(results))
    fig, ax = plt.subplots(figsize=(10, 4.8))
    ours = ax.bar(x - 0.2, [r.top1 for r in results], 0.4, label="ours: long-range matching task, CPU")
    paper = [np.nan if r.paper_top1 is None else r.paper_top1 for r in results]
    ax.bar(x + 0.2, paper, 0.4, label="paper, Table 4: ImageNet-100, 256px")
    ax.bar_label(ours, fmt="%.1f", fontsize=8)
    ax.axhline(50, color="grey", linestyle="--", linewidth=1, label="chance (ours)")
    ax.set_xticks(x, [textwrap.fill(r.name, 18) for r in results], fontsize=8)
    ax.set(ylabel="top-1 (%)", ylim=(0, 108), title="communication ablation")
    fig.legend(loc="lower center", ncol=3, fontsize=8)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[Result]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    overrides = (QUICK if args.quick else []) + ([] if args.seed is None else [f"seed={args.seed}"])
    start = time.time()
    results = []
    for i, variant in enumerate(args.variants, 1):
        print(f"\n[{i}/{len(args.variants)}] {variant}: {CONFIGS / f'{variant}.yaml'}", flush=True)
        result, cfg = train_variant(variant, args.out, overrides)
        results.append(result)
        if variant == "msa":
            run_dir = args.out / "runs" / variant
            save_model(run_dir, cfg, result.top1, args.out / "atlas_msa.pt")
            if args.save_asset:
                save_model(run_dir, cfg, result.top1, ASSET, torch.float16)
    text = write_tables(results, args.out)
    plot_curves(results, args.out / "learning_curves.png")
    plot_bars(results, args.out / "accuracy.png")
    print(
        f"\n{text}\nchance is 50%, and a loss of ln 2 = 0.693. The paper's column is ImageNet-100 at 256px on "
        "8 H100s (Table 4)."
    )
    seconds = time.time() - start
    print(f"{len(results)} variants in {seconds:.0f} s on {torch.get_num_threads()} threads; results in {args.out}")
    return results


if __name__ == "__main__":
    main()
