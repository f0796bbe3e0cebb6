"""Speed, memory and FLOPs of Atlas, the paper's baselines and timm models at several image sizes.

    python scripts/benchmark.py --models atlas_base_patch16 vit_base_patch16_224 --sizes 512 1024 \\
        --baseline vit_base_patch16_224 --csv results/benchmark.csv
    python scripts/benchmark.py --models atlas_base_patch16 vit_base_patch16_224 \\
        --sizes 256 512 1024 2048 4096 --flops-only
    python scripts/benchmark.py --configs scripts/configs/table3_*.yaml --baseline table3_msa --batch-size 8 \\
        --dtype bf16   # Table 3's runtime column, every block side by side

``--configs`` builds each config's model as scripts/train.py does (its kwargs, its classes) at the config's
image size, named by the config file; ``--models`` takes timm names (the baselines of scripts/baselines
included) at every ``--sizes``.

For every model and size it reports the parameters and the forward FLOPs per image (counted on the meta
device, so even 4096px costs nothing; for Atlas models also the convolutional stem's share), then, unless
``--flops-only``, the median time of a forward pass (eval mode, no_grad) and of a forward+backward pass
(train mode) after warm-up, and the peak memory each needs above what the model and input already hold.
Models that take ``img_size`` (Atlas, ViT) are built for each size; others (ConvNeXt, ...) take any size.
"""

from __future__ import annotations

import argparse
import csv
import os
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from trainlib import building
from trainlib.config import ConfigError, load_config
from trainlib.timing import median_seconds, peak_memory, profile_table

import atlas  # noqa: F401  (registers the Atlas models with timm)
from atlas.model import Atlas
from atlas.profiling import atlas_flops_breakdown, build_model, build_on, check_model_name, count_flops

COLUMNS = [
    "model", "height", "width", "batch", "device", "dtype", "channels_last",
    "memory_format", "params_m", "gflops_per_image",
    "stem_gflops_per_image", "stem_share", "train_gflops_per_image", "fwd_ms", "train_ms", "fwd_cpu_ms",
    "train_cpu_ms", "fwd_fused_ms", "fwd_fused_cpu_ms", "fwd_gflop_s", "train_gflop_s", "matmul_gflop_s",
    "fwd_peak_mib", "train_peak_mib", "memory_method", "threads", "cpu_kernels", "torch",
]  # fmt: skip


# -- command line ----------------------------------------------------------------------------------------
def parse_size(text: str) -> tuple[int, int]:
    """``"512"`` -> (512, 512); ``"512x1024"`` -> (512, 1024) as (height, width)."""
    parts = text.lower().split("x")
    if len(parts) > 2 or not all(p.isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"size {text!r} must be an integer like 1024 or HxW like 512x1024")
    size = (int(parts[0]), int(parts[-1]))
    if min(size) < 16:
        raise argparse.ArgumentTypeError(f"size {text!r}: both sides must be at least 16 pixels (one patch)")
    return size


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", help="timm names (default without --configs: Atlas-B and ViT-B/16)")
    parser.add_argument("--sizes", nargs="+", type=parse_size, default=[(1024, 1024)], help="256 or HxW")
    parser.add_argument("--configs", nargs="+", type=Path, default=[], help="training configs, each at its size")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16 runs under autocast")
    parser.add_argument("--channels-last", action="store_true", help="model and input in channels-last memory")
    parser.add_argument(
        "--memory-format",
        choices=["auto", "channels_last", "contiguous"],
        default="auto",
        help="Atlas's stem memory format (model.set_memory_format; default: auto, chosen per device)",
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before timing")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs; the median is reported")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--flops-only", action="store_true", help="count parameters and FLOPs, time nothing")
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="after timing, print the N ops that took longest in one forward+backward pass (torch.profiler)",
    )
    parser.add_argument(
        "--matmul-size",
        type=int,
        default=4096,
        metavar="N",
        help="time an N x N x N matrix product as the device's reference FLOP rate (0: skip)",
    )
    parser.add_argument(
        "--baseline",
        help="also print every model's speed-up over this one (a --models name or a --configs file's name)",
    )
    parser.add_argument("--csv", type=Path, help="write the table to this CSV file")
    args = parser.parse_args(argv)
    if args.models is None:
        args.models = [] if args.configs else ["atlas_base_patch16", "vit_base_patch16_224"]
    for name in args.models:
        try:
            check_model_name(name)
        except ValueError as error:
            parser.error(str(error))
    try:
        args.configs = {path.stem: load_config(path) for path in args.configs}
    except ConfigError as error:
        parser.error(str(error))
    names = [*args.models, *args.configs]
    if args.baseline is not None and args.baseline not in names:
        parser.error(f"--baseline {args.baseline!r} must be one of --models or a --configs file's name {names}")
    if args.batch_size < 1 or args.repeats < 1 or args.warmup < 0 or (args.threads is not None and args.threads < 1):
        parser.error("--batch-size, --repeats and --threads must be >= 1, --warmup >= 0")
    if args.matmul_size < 0:
        parser.error(f"--matmul-size must be >= 0 (0 skips the reference product), got {args.matmul_size}")
    return args


def time_model(model: torch.nn.Module, images: torch.Tensor, args: argparse.Namespace) -> dict:
    """Forward (eval, no_grad) and forward+backward (train) wall and CPU times in ms, and each pass's peak memory.

    Models with a ``fuse_for_inference()`` method (Atlas) are then fused and their forward pass timed again
    (``fwd_fused_*``); this changes the model.
    """
    device = images.device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")

    def forward():
        with torch.no_grad(), autocast:
            model(images)

    def forward_backward():
        with autocast:
            loss = model(images).float().mean()
        loss.backward()
        model.zero_grad(set_to_none=True)

    model.eval()
    with peak_memory(device) as fwd_mem:
        fwd = median_seconds(forward, args.warmup, args.repeats, device)
    model.train()
    with peak_memory(device) as train_mem:
        train = median_seconds(forward_backward, args.warmup, args.repeats, device)
    if args.profile:
        print(f"forward+backward, {type(model).__name__} on {tuple(images.shape)}:")
        print(profile_table(forward_backward, device, args.profile))
    fused = {}
    if hasattr(model, "fuse_for_inference"):  # Atlas: forward again with the stem's batch norms folded
        model.fuse_for_inference()
        fused = median_seconds(forward, args.warmup, args.repeats, device)
    return {
        "fwd_ms": round(fwd["wall"] * 1e3, 1),
        "fwd_fused_ms": round(fused["wall"] * 1e3, 1) if fused else "",
        "fwd_fused_cpu_ms": round(fused["cpu"] * 1e3, 1) if fused else "",
        "train_ms": round(train["wall"] * 1e3, 1),
        "fwd_cpu_ms": round(fwd["cpu"] * 1e3, 1),
        "train_cpu_ms": round(train["cpu"] * 1e3, 1),
        "fwd_peak_mib": round(fwd_mem["mib"]),
        "train_peak_mib": round(train_mem["mib"]),
        "memory_method": fwd_mem["method"],
    }


def matmul_gflop_s(size: int, args: argparse.Namespace) -> float:
    """GFLOP/s of one ``size x size`` by ``size x size`` product in the run's dtype (median of at least 5 runs)."""
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    out = torch.empty(size, size, device=device, dtype=dtype)
    seconds = median_seconds(lambda: torch.mm(a, b, out=out), max(args.warmup, 1), max(args.repeats, 5), device)
    return 2 * size**3 / seconds["wall"] / 1e9


def add_flop_rates(row: dict, matmul: float | None) -> None:
    """``row``'s achieved GFLOP/s (FLOPs per image x batch / wall time), and the reference product's rate."""
    images = row["batch"]
    row["fwd_gflop_s"] = round(row["gflops_per_image"] * images / row["fwd_ms"] * 1e3, 1)
    row["train_gflop_s"] = round(row["train_gflops_per_image"] * images / row["train_ms"] * 1e3, 1)
    row["matmul_gflop_s"] = "" if matmul is None else round(matmul, 1)


# -- one model at one size -------------------------------------------------------------------------------
Builder = Callable[..., torch.nn.Module]  # build(device=...) -> the model, on that device


def model_builders(args: argparse.Namespace) -> list[tuple[str, tuple[int, int], Builder]]:
    """(name, size, build) of every --models name at every --sizes, then of every --configs file at its size
    (its model as scripts/train.py builds it; on the CPU where the meta device cannot build it)."""
    builders = [
        (name, size, partial(build_model, name, size, args.num_classes)) for name in args.models for size in args.sizes
    ]
    for name, cfg in args.configs.items():
        build = partial(build_on, build=partial(building.build_model, cfg))
        builders.append((name, (cfg.model.img_size, cfg.model.img_size), build))
    return builders


def flops_row(name: str, size: tuple[int, int], build: Builder) -> dict:
    """Parameters and FLOPs per image, counted on the meta device: forward (Atlas: with the stem's share) and
    forward+backward."""
    try:
        model = build(device="meta")
        shape = (1, 3, *size)
        if isinstance(model, Atlas):
            parts = atlas_flops_breakdown(model, shape)
            total, stem = parts["total"], parts["stem"]
        else:
            total, stem = count_flops(model, shape), None
        train = count_flops(model, shape, backward=True)
    except (ValueError, RuntimeError) as error:
        raise SystemExit(f"{name} at {size[0]}x{size[1]}: {error}") from error
    return {
        "model": name,
        "height": size[0],
        "width": size[1],
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "gflops_per_image": round(total / 1e9, 2),
        "stem_gflops_per_image": "" if stem is None else round(stem / 1e9, 2),
        "stem_share": "" if stem is None else round(stem / total, 3),
        "train_gflops_per_image": round(train / 1e9, 2),
        "built_on": next(model.parameters()).device.type,
    }


def timing_row(size: tuple[int, int], build: Builder, args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build(device=device)
    images = torch.randn(args.batch_size, 3, *size, device=device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    memory_format = ""
    if isinstance(model, Atlas):
        memory_format = model.set_memory_format(args.memory_format).stem.resolved_memory_format(device)
    return {"memory_format": memory_format, **time_model(model, images, args)}


# -- output ----------------------------------------------------------------------------------------------
def format_table(rows: list[dict], columns: list[str]) -> str:
    widths = {c: max(len(c), *(len(str(row.get(c, ""))) for row in rows)) for c in columns}
    lines = ["  ".join(c.rjust(widths[c]) for c in columns)]
    lines += ["  ".join(str(row.get(c, "")).rjust(widths[c]) for c in columns) for row in rows]
    return "\n".join(lines)


def speedups(rows: list[dict], baseline: str) -> list[str]:
    """Per size, how many times faster each model runs than ``baseline`` (its time / the model's time)."""
    lines = []
    for base in (r for r in rows if r["model"] == baseline):
        for row in rows:
            if row["model"] != baseline and (row["height"], row["width"]) == (base["height"], base["width"]):
                ratio = {key: base[key] / row[key] for key in ("fwd_ms", "train_ms", "fwd_cpu_ms", "train_cpu_ms")}
                fused = ""
                if row.get("fwd_fused_ms"):
                    fused = (
                        f", fused forward {base['fwd_ms'] / row['fwd_fused_ms']:.2f}x "
                        f"(CPU time {base['fwd_cpu_ms'] / row['fwd_fused_cpu_ms']:.2f}x)"
                    )
                lines.append(
                    f"{row['height']}x{row['width']}: {row['model']} vs {baseline}: "
                    f"forward {ratio['fwd_ms']:.2f}x (CPU time {ratio['fwd_cpu_ms']:.2f}x), "
                    f"forward+backward {ratio['train_ms']:.2f}x (CPU time {ratio['train_cpu_ms']:.2f}x){fused}"
                )
    return lines


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    setting = {
        "batch": args.batch_size,
        "device": args.device,
        "dtype": args.dtype,
        "channels_last": args.channels_last,
        "threads": torch.get_num_threads(),
        "cpu_kernels": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
    }
    # FLOPs first: cheap, and it rejects sizes a model cannot take before any long timing run starts.
    builders = model_builders(args)
    rows = [{**setting, **flops_row(name, size, build)} for name, size, build in builders]
    for name in sorted({row["model"] for row in rows if row.pop("built_on") != "meta"}):
        print(f"note: {name} cannot be constructed on the meta device; built on the CPU, its FLOPs counted on meta")
    load_before = os.getloadavg()[0]
    if not args.flops_only:
        matmul = None
        if args.matmul_size:
            n = args.matmul_size
            print(f"timing a {n}x{n}x{n} {args.dtype} matrix product ...", flush=True)
            matmul = matmul_gflop_s(n, args)
        for row, (_, size, build) in zip(rows, builders, strict=True):
            print(f"timing {row['model']} at {row['height']}x{row['width']} ...", flush=True)
            row.update(timing_row(size, build, args))
            add_flop_rates(row, matmul)
    columns = [c for c in COLUMNS if any(c in row for row in rows)]
    print(format_table(rows, [c for c in columns if c not in ("torch", "threads", "memory_method")]))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, FLOPs per image counted on the meta device")
    if not args.flops_only:
        print(f"memory: extra over weights and input, {rows[0]['memory_method']}")
        print(f"1-minute load average: {load_before:.2f} before timing, {os.getloadavg()[0]:.2f} after")
        if rows[0]["matmul_gflop_s"]:
            n = args.matmul_size
            print(f"reference: a {n}x{n}x{n} {args.dtype} matrix product runs at {rows[0]['matmul_gflop_s']} GFLOP/s")
    if args.baseline and not args.flops_only:
        print("\n".join(speedups(rows, args.baseline)))
    if args.csv:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        with args.csv.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
        print(f"wrote {args.csv}")
    return rows


if __name__ == "__main__":
    main()
