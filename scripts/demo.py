"""The paper's two claims at CPU scale, ``make demo`` (``python scripts/demo.py``): communication and cost.

**Communication** (Table 4). Trains the variants of Table 4 (window attention, multi-scale only, + bottom-up,
+ top-down, full MSA) and a global-attention ViT of the same size on the long-range matching task of
``atlas/longrange.py``, each through ``scripts/train.py`` with its config in ``scripts/configs/demo/`` and once
for each of three seeds (the seed sets the initialisation and the images), then prints, per variant, how many
seeds solved the task, the mean and range of the accuracy, the steps each seed took to solve it (evaluated after
every epoch), the accuracy of the trained weights with each direction of communication the variant has closed
(top-down, bottom-up: what the trained models route through it) and the training time, next to the paper's
top-1, and writes to ``results/demo/``:

    table.csv, table.md     that table
    runs.csv                one row per variant and seed: accuracy, with each direction closed, final loss, time
    learning_curves.png     validation accuracy and training loss after every epoch, every run
    accuracy.png            each run's accuracy as a dot, the mean as a bar, next to the paper's
    atlas_msa.pt            the trained MSA model of the first seed: {"model_name", "model_kwargs", "state_dict", ...}
    runs/<variant>_seed<N>/ train.py's output folder of each run (config, metrics, checkpoints)

**Cost** (the paper's headline, Table 6's runtime column). Times one training step (batch 1, forward and
backward) of three blocks of window attention, of MSA (a stack over every scale) and of a ViT, all at the demo's
width, from 8x8 to 128x128 tokens (32 to 512px), interleaved in one process (``trainlib/cost.py``), and writes
``cost.csv``, ``cost.md`` and ``cost.png`` (log-log, with N, N log N and N^2 guides) next to the table above.

A run *solves* the task when its validation top-1 is at least 90% (chance is 50%). Which runs solve it can
depend on the CPU: a run that sits on the initial plateau at chance may leave it a few steps earlier or later
when its float rounding differs, so compare the number of solving seeds, not single accuracies. The paper
trains on ImageNet-100 at 256px; we train on a synthetic task that needs long-range communication, so compare
what each kind of communication makes possible, not the values.

    python scripts/demo.py                              # all variants, 3 seeds
    python scripts/demo.py --variants window msa        # a subset
    python scripts/demo.py --seeds 0 1 2 3 4            # other or more seeds
    python scripts/demo.py --quick --out /tmp/demo      # a smoke test in seconds (tiny data, 2 epochs)
    python scripts/demo.py --parts cost                 # only the cost part
"""

from __future__ import annotations

import os

# OpenMP threads that spin while they wait stall badly when other jobs share the cores; passive ones yield.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import csv  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import multiprocessing as mp  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import textwrap  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import train  # noqa: E402  (scripts/train.py: this folder is on sys.path when the demo runs as a script)
import yaml  # noqa: E402
from trainlib.building import build_model, build_transforms  # noqa: E402
from trainlib.config import Config, load_config  # noqa: E402
from trainlib.cost import cost_table, growth, measure_costs, plot_costs, write_costs  # noqa: E402
from trainlib.evaluation import evaluate, load_dataset  # noqa: E402

from atlas.profiling import cpu_name  # noqa: E402
from atlas.viz import cut_routes  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "scripts" / "configs" / "demo"
PAPER = ROOT / "scripts" / "data" / "paper_results.yaml"
VARIANTS = ("window", "multiscale", "bottom_up", "top_down", "msa", "vit")  # table order; each has a config
QUICK = [
    "data.kwargs.train_size=16",
    "data.kwargs.val_size=8",
    "train.batch_size=8",
    "schedule.epochs=2",
    "schedule.warmup_epochs=0",
]


# The cost part: 8x8 to 128x128 tokens of 4x4 pixels (64 to 16,384), three blocks of each kind at the demo's width.
COST_SIZES = (32, 64, 128, 256, 512)
COST_QUICK_SIZES = (32, 64)
COST_MODELS = {  # name -> (config, overrides); MSA as a stack: three MSA blocks over every scale, none dropped
    "window": ("window.yaml", ()),
    # pooled by 4 (k = s), so that the number of scales grows as log_4 N, as Atlas-B's (k = 16, s = 4) does
    "msa": ("msa.yaml", ("model.kwargs.composition=stack", "model.kwargs.depths=[3]", "model.kwargs.pool_stride=4")),
    "vit": ("vit.yaml", ()),
}
COST_LABELS = {"window": "window attention", "msa": "MSA", "vit": "ViT"}
PAPER_TABLE6 = {"window": "WViT-B/16", "msa": "Atlas-B/16", "vit": "ViT-B/16"}  # runtime (min) at 1024, 2048px

SEEDS = (0, 1, 2)
SOLVED = 90.0  # validation top-1 (%) from which a run counts as having solved the task
CUTS = ("top-down", "bottom-up")  # the directions of communication closed, one at a time, after training


@dataclass
class Result:
    """One trained run (variant and seed), as its config and train.py's metrics.jsonl describe it."""

    variant: str
    seed: int
    name: str  # the config's description
    paper_top1: float | None
    top1: float  # validation top-1 after the last epoch (%)
    loss: float  # mean training loss of the last epoch: tells a confident solution from a barely correct one
    train_s: float  # training time, evaluation excluded
    params: int
    epochs: list[dict]  # train.py's "epoch" records: step, val_top1, epoch_time_s, ...
    steps: list[dict]  # its "step" records (every train.log_every steps): step, loss, ...
    cuts: dict[str, float]  # validation top-1 (%) with one direction the variant has closed (see route_cuts)

    @property
    def solved(self) -> bool:
        return self.top1 >= SOLVED

    @property
    def steps_to_solve(self) -> int | None:
        """The training step of the first evaluation at which the run had solved the task (None: never)."""
        return next((e["step"] for e in self.epochs if e["val_top1"] >= SOLVED), None)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS), help="one run per variant and seed")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "demo", help="where results go")
    parser.add_argument("--quick", action="store_true", help="tiny data and 2 epochs: checks the pipeline only")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads of each run")
    parser.add_argument(
        "--jobs",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="runs trained at once, in separate processes (default: 2, or 1 on a single core)",
    )
    parser.add_argument(
        "--parts", nargs="+", choices=("communication", "cost"), default=["communication", "cost"], help="what to run"
    )
    return parser.parse_args(argv)


def read_records(run_dir: Path, kind: str) -> list[dict]:
    """The records of one kind ("epoch", "step", ...) in a run's metrics.jsonl."""
    records = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return [r for r in records if r["kind"] == kind]


def run_settings(run_dir: Path, seed: int, overrides: list[str]) -> list[str]:
    """The ``--set`` overrides of one run: its output folder, its seed, then ``overrides``."""
    return [f"output_dir={run_dir}", f"seed={seed}", *overrides]


def run_config(config: Path, run_dir: Path, seed: int, overrides: list[str]) -> Config:
    """The config of one run: ``config`` with :func:`run_settings`."""
    return load_config(config, run_settings(run_dir, seed, overrides))


def train_run(config: Path, run_dir: Path, seed: int, overrides: list[str], threads: int, quiet: bool) -> Result:
    """Train one config with scripts/train.py into ``run_dir`` (replacing an earlier run) on ``threads`` threads.

    ``quiet`` sends train.py's progress to ``run_dir.with_suffix(".log")`` instead of the terminal (parallel runs).
    """
    torch.set_num_threads(threads)
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        if quiet:
            log = stack.enter_context(open(run_dir.with_suffix(".log"), "w"))
            stack.enter_context(contextlib.redirect_stdout(log))
            stack.enter_context(contextlib.redirect_stderr(log))
        train.main(["--config", str(config), "--set", *run_settings(run_dir, seed, overrides)])
    cfg = run_config(config, run_dir, seed, overrides)
    epochs = read_records(run_dir, "epoch")
    result = Result(
        variant=config.stem,
        seed=seed,
        name=cfg.description,
        paper_top1=cfg.paper_top1,
        top1=epochs[-1]["val_top1"],
        loss=epochs[-1]["train_loss"],
        train_s=sum(e["epoch_time_s"] for e in epochs),
        params=read_records(run_dir, "run")[-1]["params"],
        epochs=epochs,
        steps=read_records(run_dir, "step"),
        cuts=route_cuts(config, run_dir, seed, overrides),
    )
    return result


def val_top1(model: torch.nn.Module, cfg: Config) -> float:
    """Validation top-1 (%) of ``model`` on the task and with the evaluation transform of ``cfg``, as train.py
    evaluates it (one batch of the whole validation split, on the CPU)."""
    val = load_dataset(cfg, "val", build_transforms(cfg)[1])
    images, labels = zip(*(val[i] for i in range(len(val))), strict=True)
    batch = (torch.stack(images), torch.tensor(labels), 0)
    with torch.no_grad():
        return evaluate(model, [batch], torch.device("cpu"), contextlib.nullcontext, False)["top1"]


def route_cuts(config: Path, run_dir: Path, seed: int, overrides: list[str]) -> dict[str, float]:
    """Validation top-1 (%) of a run's final weights with each direction of communication it has closed.

    Top-down: the same weights in the model built with ``top_down=False`` (top-down adds no weights, so they load
    as they are); bottom-up: the bottom-up passes skipped (``atlas.viz.cut_routes``). Empty for models that have
    neither (window attention, ViT). What a trained model loses here is what it came to route through that
    direction, not what the task needs.
    """
    cfg = run_config(config, run_dir, seed, overrides)
    model = build_model(cfg)
    switches = getattr(model, "config", None)
    if switches is None or not switches.multiscale:
        return {}
    state = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)["model"]
    model.load_state_dict(state)
    cuts = {}
    if switches.top_down:
        closed = build_model(run_config(config, run_dir, seed, [*overrides, "model.kwargs.top_down=false"]))
        closed.load_state_dict(state)
        cuts["top-down"] = val_top1(closed, cfg)
    if switches.bottom_up:
        with cut_routes(model, bottom_up=False):
            cuts["bottom-up"] = val_top1(model, cfg)
    return cuts


def save_model(run_dir: Path, cfg: Config, top1: float, path: Path) -> None:
    """The final weights of a run and what rebuilds the model, loadable with ``torch.load(weights_only=True)``.

    ``timm.create_model(ckpt["model_name"], **ckpt["model_kwargs"]).load_state_dict(ckpt["state_dict"])``
    (after ``import atlas``); ``ckpt["task"]`` holds the options of the dataset it was trained on.
    """
    state = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)["model"]
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


def by_variant(results: list[Result]) -> dict[str, list[Result]]:
    """The runs of each variant, in table order."""
    groups: dict[str, list[Result]] = {}
    for r in results:
        groups.setdefault(r.variant, []).append(r)
    return groups


def table_rows(results: list[Result]) -> list[dict]:
    """One row per variant: how many seeds solved the task, the accuracy's mean and range, time and size."""
    rows = []
    for runs in by_variant(results).values():
        top1 = [r.top1 for r in runs]
        first = runs[0]
        rows.append(
            {
                "variant": first.name,
                "paper top-1 (%)": "-" if first.paper_top1 is None else f"{first.paper_top1:.2f}",
                "seeds solved (top-1 >= 90%)": f"{sum(r.solved for r in runs)} of {len(runs)}",
                "our top-1, mean (%)": f"{statistics.mean(top1):.1f}",
                "our top-1, range (%)": f"{min(top1):.1f} to {max(top1):.1f}",
                "steps to solve, per seed": " ".join(str(r.steps_to_solve or "-") for r in runs),
                **{
                    f"without {cut}, mean (%)": (
                        f"{statistics.mean(r.cuts[cut] for r in runs):.1f}" if cut in first.cuts else "-"
                    )
                    for cut in CUTS
                },
                "train time per run (s)": f"{statistics.mean(r.train_s for r in runs):.0f}",
                "parameters": f"{first.params:,}",
            }
        )
    return rows


def run_rows(results: list[Result]) -> list[dict]:
    return [
        {
            "variant": r.name,
            "seed": r.seed,
            "top-1 (%)": f"{r.top1:.2f}",
            "steps to solve": r.steps_to_solve or "-",
            **{f"without {cut} (%)": f"{r.cuts[cut]:.2f}" if cut in r.cuts else "-" for cut in CUTS},
            "last-epoch train loss": f"{r.loss:.4f}",
            "train time (s)": f"{r.train_s:.1f}",
        }
        for r in results
    ]


def markdown(rows: list[dict]) -> str:
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(row[k]) for k in header) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def write_tables(results: list[Result], out: Path) -> str:
    """table.csv, table.md (per variant) and runs.csv (per run) in ``out``; returns the Markdown table."""
    rows = table_rows(results)
    write_csv(rows, out / "table.csv")
    write_csv(run_rows(results), out / "runs.csv")
    text = markdown(rows)
    (out / "table.md").write_text(text)
    return text


def plot_curves(results: list[Result], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(11, 4.6))
    for i, runs in enumerate(by_variant(results).values()):
        color = f"C{i}"
        for j, r in enumerate(runs):
            label = r.name if j == 0 else None
            steps = [e["step"] for e in r.epochs]
            acc_ax.plot(steps, [e["val_top1"] for e in r.epochs], marker="o", color=color, alpha=0.7, label=label)
            loss_ax.plot([s["step"] for s in r.steps], [s["loss"] for s in r.steps], color=color, alpha=0.7)
    acc_ax.axhline(50, color="grey", linestyle="--", linewidth=1, label="chance")
    acc_ax.set(xlabel="training step", ylabel="validation top-1 (%)", title="accuracy after each epoch", ylim=(0, 102))
    loss_ax.axhline(math.log(2), color="grey", linestyle="--", linewidth=1)
    loss_ax.set(xlabel="training step", ylabel="cross-entropy", title="training loss (one line per seed)")
    handles, labels = acc_ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8)
    fig.suptitle("long-range matching task (atlas/longrange.py)")
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_bars(results: list[Result], path: Path) -> None:
    import matplotlib.pyplot as plt
    import numpy as np

    groups = list(by_variant(results).values())
    x = np.arange(len(groups))
    fig, ax = plt.subplots(figsize=(10, 4.8))
    means = [statistics.mean(r.top1 for r in runs) for runs in groups]
    ours = ax.bar(x - 0.2, means, 0.4, label="ours: mean over seeds, long-range matching task, CPU")
    for xi, runs in zip(x, groups, strict=True):
        ax.scatter([xi - 0.2] * len(runs), [r.top1 for r in runs], color="black", s=12, zorder=3)
    paper = [np.nan if runs[0].paper_top1 is None else runs[0].paper_top1 for runs in groups]
    ax.bar(x + 0.2, paper, 0.4, label="paper, Table 4: ImageNet-100, 256px")
    ax.bar_label(ours, fmt="%.1f", fontsize=8)
    ax.axhline(50, color="grey", linestyle="--", linewidth=1, label="chance (ours)")
    ax.set_xticks(x, [textwrap.fill(runs[0].name, 18) for runs in groups], fontsize=8)
    ax.set(ylabel="top-1 (%)", ylim=(0, 108), title="communication ablation (dots: one run each)")
    fig.legend(loc="lower center", ncol=3, fontsize=8)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cost_builder(config: str, overrides: tuple[str, ...]):
    """The demo model of ``config`` (with ``overrides``) built for an image of ``px`` pixels."""
    return lambda px: build_model(load_config(CONFIGS / config, [*overrides, f"model.img_size={px}"]))


def tokens_at(px: int) -> int:
    """Tokens of the demo models' finest scale (4x4-pixel patches) at ``px`` x ``px`` pixels."""
    return (px // load_config(CONFIGS / "msa.yaml").model.kwargs["patch_size"]) ** 2


def paper_runtimes() -> str:
    """Table 6's training runtimes of the window ViT, Atlas and ViT (Base) at 1024 and 2048px, as a line of text."""
    rows = {r["row"]: r["runtime"] for r in yaml.safe_load(PAPER.read_text())[6]["rows"]}
    parts = []
    for px in (1024, 2048):
        cells = ", ".join(f"{PAPER_TABLE6[m]} {rows[f'{PAPER_TABLE6[m]} @{px}']}" for m in COST_MODELS)
        parts.append(f"{px}px ({(px // 16) ** 2:,} tokens): {cells}")
    return "; ".join(parts)


def run_cost(sizes: tuple[int, ...], threads: int, out: Path) -> str:
    """The cost part: measure, write cost.csv, cost.md and cost.png to ``out``; returns the printed text."""
    torch.set_num_threads(threads)
    builders = {name: cost_builder(config, overrides) for name, (config, overrides) in COST_MODELS.items()}

    def report(row: dict) -> None:
        print(
            f"  {COST_LABELS[row['model']]:>16} at {row['tokens']:>6,} tokens ({row['px']}px): "
            f"{row['seconds']:.3g} s, peak {row['peak_mib']:.0f} MiB",
            flush=True,
        )

    rows = measure_costs(builders, sizes, tokens_at, report)
    write_costs(rows, out / "cost.csv")
    machine = (
        f"{cpu_name() or platform.machine()}, {threads} threads, CPU kernels {torch.backends.cpu.get_cpu_capability()}"
    )
    plot_costs(
        rows,
        COST_LABELS,
        {"N": "window", "N log N": "msa", "N^2": "vit"},
        out / "cost.png",
        f"one training step (forward + backward, batch 1, fp32) as the image grows; {machine}",
    )
    ratio = growth(rows, "vit") / growth(rows, "msa")
    text = (
        f"{cost_table(rows, COST_LABELS)}\n\n"
        f"From {rows[0]['tokens']:,} to {rows[-1]['tokens']:,} tokens the step grows {growth(rows, 'window'):.0f}x "
        f"for window attention, {growth(rows, 'msa'):.0f}x for MSA and {growth(rows, 'vit'):.0f}x for ViT "
        f"({ratio:.1f}x MSA's growth). The paper's Table 6, training runtime in minutes on 8 H100s (Base models, "
        f"16x16 patches): {paper_runtimes()}.\n"
    )
    (out / "cost.md").write_text(f"{text}\nMachine: {machine}.\n")
    return text


def main(argv: list[str] | None = None) -> list[Result]:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    results = run_communication(args) if "communication" in args.parts else []
    if "cost" in args.parts:
        sizes = COST_QUICK_SIZES if args.quick else COST_SIZES
        print(
            f"\nThe cost of attention as the image grows ({len(sizes)} sizes x {len(COST_MODELS)} models):", flush=True
        )
        print(f"\n{run_cost(sizes, max(args.threads, args.jobs), args.out)}")
    seconds = time.time() - start
    print(
        f"{seconds:.0f} s in all (CPU kernels: {torch.backends.cpu.get_cpu_capability()}, "
        f"{cpu_name() or platform.machine()}); results in {args.out}"
    )
    return results


def run_communication(args: argparse.Namespace) -> list[Result]:
    """The communication part: train every variant and seed, write the tables and figures, print the table."""
    overrides = QUICK if args.quick else []
    start = time.time()
    runs = [
        (CONFIGS / f"{v}.yaml", args.out / "runs" / f"{v}_seed{seed}", seed)
        for v in args.variants
        for seed in args.seeds
    ]
    print(
        f"{len(runs)} runs ({len(args.variants)} variants x {len(args.seeds)} seeds), {args.jobs} at a time", flush=True
    )
    results = []
    # Each run uses args.threads threads whatever args.jobs is, so the results do not depend on --jobs.
    with (
        ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn"))
        if args.jobs > 1
        else contextlib.nullcontext() as pool
    ):
        calls = [(config, run_dir, seed, overrides, args.threads, args.jobs > 1) for config, run_dir, seed in runs]
        finished = pool.map(train_run, *zip(*calls, strict=True)) if pool else (train_run(*call) for call in calls)
        for i, result in enumerate(finished, 1):
            results.append(result)
            closed = "".join(f", without {cut} {top1:.1f}%" for cut, top1 in result.cuts.items())
            print(
                f"[{i}/{len(runs)}] {result.variant}, seed {result.seed}: top-1 {result.top1:.1f}%{closed}, "
                f"last-epoch loss {result.loss:.3f}, {result.train_s:.0f} s",
                flush=True,
            )
    for (config, run_dir, seed), result in zip(runs, results, strict=True):
        if result.variant == "msa":  # the first seed's MSA model
            save_model(run_dir, run_config(config, run_dir, seed, overrides), result.top1, args.out / "atlas_msa.pt")
            break
    text = write_tables(results, args.out)
    plot_curves(results, args.out / "learning_curves.png")
    plot_bars(results, args.out / "accuracy.png")
    print(
        f"\n{text}\nchance is 50%. A run solves the task at >= {SOLVED:.0f}% top-1 (steps to solve: the step of its "
        "first evaluation that did, one evaluation per epoch); runs.csv has every run. "
        "The paper's column is ImageNet-100 at 256px on 8 H100s (Table 4)."
    )
    print(f"{len(results)} runs in {time.time() - start:.0f} s, {args.jobs} at a time on {args.threads} thread(s) each")
    return results


if __name__ == "__main__":
    main()
