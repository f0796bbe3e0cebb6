"""Worker CPU time and bytes per training sample of the `exact` and `fast` input pipelines.

    python scripts/benchmark_data.py                       # 1024, 2048 and 4096px, 500x375 JPEG sources
    python scripts/benchmark_data.py --sizes 1024 --images 8 --source 640x480

It writes ``--images`` JPEG files of the ``--source`` size (ImageNet's typical 500x375 by default) with
photo-like content, then, on one thread of this process (as one DataLoader worker runs), times for each input
size and pipeline the worker's work per sample: decode + the training transform of the recipe config
(`exact`: timm's, at the input size, float32; `fast`: the uint8 source crop), and the handoff of the sample to
the trainer (copy into shared memory, as a DataLoader worker does). It also times the trainer's share of
`fast` (`DeviceStage`: resize, normalise, erase) on ``--device``. Finally, for every run of the paper's
Tables 1 and 2, the images/s a node must deliver (epochs x 126,689 training images / runtime) and the worker
cores each pipeline needs for it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from trainlib.building import build_transforms  # noqa: E402
from trainlib.config import load_config  # noqa: E402
from trainlib.data import isolated_rng  # noqa: E402
from trainlib.jpegs import write_jpegs  # noqa: E402
from trainlib.pipeline import DeviceStage  # noqa: E402

from atlas.datasets import load_image  # noqa: E402
from atlas.profiling import cpu_name  # noqa: E402

RECIPE = ROOT / "scripts" / "configs" / "table1_atlas_b16_1024.yaml"
TRAIN_IMAGES = 126_689  # ImageNet-100 (HR-IN100) training images
PAPER_RUNS = {1: (320, 1024), 2: (100, None)}  # table: (epochs, input size; None: in the row name "@N")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", type=int, default=[1024, 2048, 4096], help="input sizes (square)")
    parser.add_argument("--images", type=int, default=6, help="distinct JPEG files, each timed --repeats times")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--source", default="500x375", help="source JPEG size, WxH")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="for DeviceStage")
    return parser.parse_args(argv)


def cpu_seconds(fn) -> tuple[float, object]:
    start = time.process_time()
    result = fn()
    return time.process_time() - start, result


def worker_costs(paths: list[Path], transform, repeats: int) -> dict:
    """Median CPU seconds per sample of decode + transform and of the handoff, and the sample's bytes."""
    work, handoff, sizes = [], [], []
    for r in range(repeats):
        for i, path in enumerate(paths):
            with isolated_rng(1000 * r + i):
                seconds, sample = cpu_seconds(lambda p=path: transform(load_image(str(p))))
            work.append(seconds)
            handoff.append(cpu_seconds(lambda s=sample: s.clone().share_memory_())[0])
            sizes.append(sample.numel() * sample.element_size())
    return {"work": statistics.median(work), "handoff": statistics.median(handoff), "bytes": statistics.median(sizes)}


def stage_seconds(paths: list[Path], transform, stage: DeviceStage, repeats: int) -> float:
    """Median wall seconds per sample of the trainer's DeviceStage (synchronised on CUDA)."""
    crops = [transform(load_image(str(p))) for p in paths]
    times = []
    for r in range(repeats + 1):
        if stage.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        stage(crops, seed=r)
        if stage.device.type == "cuda":
            torch.cuda.synchronize()
        if r:  # the first is a warm-up
            times.append((time.perf_counter() - start) / len(crops))
    return statistics.median(times)


def paper_rates() -> list[tuple[str, int, float]]:
    """(run, input size, images/s a node delivers) for every row of the paper's Tables 1 and 2."""
    paper = yaml.safe_load((ROOT / "scripts" / "data" / "paper_results.yaml").read_text())
    runs = []
    for table, (epochs, size) in PAPER_RUNS.items():
        for row in paper[table]["rows"]:
            px = size or int(row["row"].split("@")[1])
            runs.append((f"Table {table} {row['row']}", px, epochs * TRAIN_IMAGES / (row["runtime"] * 3600)))
    return runs


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)  # one DataLoader worker is one process on one core
    source = tuple(int(v) for v in args.source.lower().split("x"))
    cpu = cpu_name() or "unknown CPU"
    print(f"# {cpu}; torch {torch.__version__}; 1 thread; {args.images} {source[0]}x{source[1]} JPEG sources")
    print(
        "| px | pipeline | worker ms/img (decode + transform) | handoff ms | worker img/s per core | bytes/sample "
        f"| trainer ms/img ({args.device}) | worker speed-up |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    per_core = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_jpegs(Path(tmp), args.images, source)
        for px in args.sizes:
            costs = {}
            for pipeline in ("exact", "fast"):
                cfg = load_config(RECIPE, [f"model.img_size={px}", f"data.pipeline={pipeline}"])
                transform = build_transforms(cfg)[0]
                costs[pipeline] = c = worker_costs(paths, transform, args.repeats)
                per_core[px, pipeline] = 1 / (c["work"] + c["handoff"])
                trainer = ""
                if pipeline == "fast":
                    a = cfg.aug
                    stage = DeviceStage(px, a.mean, a.std, args.device, re_prob=a.re_prob, re_mode=a.re_mode)
                    trainer = f"{1000 * stage_seconds(paths, transform, stage, args.repeats):.1f}"
                speedup = per_core[px, pipeline] / per_core[px, "exact"]
                cells = [px, pipeline, f"{1000 * c['work']:.1f}", f"{1000 * c['handoff']:.2f}"]
                cells += [f"{per_core[px, pipeline]:.1f}", f"{c['bytes'] / 2**20:.2f} MiB", trainer, f"{speedup:.1f}x"]
                print("| " + " | ".join(map(str, cells)) + " |")
    print("\n| paper run | px | node img/s | worker cores, exact | worker cores, fast |")
    print("|---|---:|---:|---:|---:|")
    for run, px, rate in paper_rates():
        if (px, "exact") not in per_core:
            continue
        cores = [f"{rate / per_core[px, p]:.1f}" for p in ("exact", "fast")]
        print(f"| {run} | {px} | {rate:.0f} | {cores[0]} | {cores[1]} |")


if __name__ == "__main__":
    main()
