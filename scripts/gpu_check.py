"""The prepared GPU check: four timed sections, one table.

    python scripts/gpu_check.py                          # one CUDA GPU, sized for 80 GB, under 8 minutes
    python scripts/gpu_check.py --device cpu --smoke     # the same checks, tiny, on a CPU (CI), about a minute

(a) the CUDA tests: ``pytest -m cuda tests/test_cuda.py`` in a subprocess (all skipped without a GPU);
(b) scripts/train.py killed with SIGKILL once it has written its first last.pt, then run again with
    ``--resume auto`` to the end: the metrics must end at the configured number of epochs;
(c) training throughput, one model after the other in this process: Atlas against ViT, AdamW step included, eager
    and with ``torch.compile``: images/s, peak memory and MFU (the training FLOPs per image that
    ``atlas.profiling.count_flops`` counts, times images/s, over the rate of a large matrix product timed here);
(d) the largest square image Atlas-S/16 and Atlas-B/16 train on at batch 1 with gradient checkpointing.

On a GPU everything runs in bf16 autocast; the smoke plan (``--smoke``) runs tiny models at tiny sizes, in fp32 on a
CPU, without compiling. An error fails its row (or its section) and the rest still runs; the exit status is 1 if
any row failed. Each section has a time budget, and what one leaves unused goes to the next: an entry that would
start after its section's time is up is a ``skip`` row, and (c) starts an entry only if the time left is more than
the longest one of its kind took so far.
The table comes last, and goes to ``--out`` as results.csv and results.json, next to the subprocesses' logs. Runs
from a checkout with only torch, timm, einops and pyyaml installed (and pytest for (a)).
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `import atlas` from a checkout, installed or not

import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import yaml  # noqa: E402
from benchmark import median_seconds, peak_memory  # noqa: E402  (scripts/benchmark.py)

import atlas  # noqa: E402, F401  (registers the Atlas models with timm)
from atlas.profiling import count_flops, cpu_name  # noqa: E402

TINY_CONFIG = ROOT / "scripts" / "configs" / "tiny_cpu_synthetic.yaml"
NUM_CLASSES = 100
SECTIONS = {"a": "a cuda-tests", "b": "b train-resume", "c": "c throughput", "d": "d largest-image"}
RESULTS = ("ok", "fail", "skip", "oom")  # oom: the expected end of (d)'s search, not a failure
COLUMNS = ("section", "item", "result", "seconds", "figures")


@dataclass(frozen=True)
class Plan:
    """What every section runs, and the seconds each may take."""

    budgets_s: dict[str, float]
    train_overrides: tuple[str, ...]  # `--set` overrides of TINY_CONFIG for (b)
    throughput: tuple[tuple[str, int, int], ...]  # (c): (model, image side, batch); "model+flex": attention="flex"
    warmup: int  # (c): untimed steps, the first one included (it compiles)
    timed: int
    compile: bool
    matmul_size: int
    largest_models: tuple[str, ...]
    largest_sizes: tuple[int, ...]


GPU_PLAN = Plan(
    budgets_s={"a": 100, "b": 120, "c": 170, "d": 60},
    train_overrides=(
        # Atlas-T/16 at 1024px with one block per stage (two scales), compiled, bf16, channels-last, EMA.
        "model.img_size=1024",
        "model.kwargs={}",  # an empty mapping replaces the tiny config's window_size/pool_stride/depths
        "model.kwargs.depths=[1, 1]",
        "data.workers=4",
        "train.amp=bf16",
        "train.channels_last=true",
        "train.compile=true",
        "train.ema=true",
        "train.deterministic=false",
        "checkpoint.every_steps=2",  # the first last.pt, mid-epoch, after two of the run's twelve steps
    ),
    # Batches for an 80 GB card. Atlas's activations grow with the stem's feature maps; ViT-B at 2048px attends
    # over 16384 tokens: one training image is tens of TFLOP, which keeps the GPU busy on its own, and takes
    # several GB of activations, so batch 2 keeps its timed steps short and far from the memory limit without
    # gradient checkpointing. Checkpointing stays off everywhere here: it recomputes the forward pass, work that
    # the counted training FLOPs (and so MFU) would not include.
    throughput=(
        ("atlas_base_patch16", 1024, 16),
        ("vit_base_patch16_224", 1024, 16),
        ("atlas_base_patch16+flex", 1024, 16),  # top-down with FlexAttention (compiled only: eager is unfused)
        ("atlas_base_patch16", 2048, 4),
        ("atlas_base_patch16+flex", 2048, 4),
        ("vit_base_patch16_224", 2048, 2),
        ("atlas_small_patch16", 4096, 2),
    ),
    warmup=3,
    timed=5,
    compile=True,
    matmul_size=8192,
    largest_models=("atlas_small_patch16", "atlas_base_patch16"),
    largest_sizes=(4096, 8192, 16384),
)

SMOKE_PLAN = Plan(
    budgets_s={"a": 50, "b": 60, "c": 25, "d": 25},
    train_overrides=("checkpoint.every_steps=2",),  # the tiny config as it is, last.pt after 2 of its 12 steps
    throughput=(("atlas_tiny_patch16", 256, 2), ("vit_tiny_patch16_224", 256, 2)),
    warmup=1,
    timed=2,
    compile=False,
    matmul_size=1024,
    largest_models=("atlas_tiny_patch16",),
    largest_sizes=(256, 512),
)


# -- the table -------------------------------------------------------------------------------------------
@dataclass
class Section:
    """One section's rows and its time guard: the ``time.perf_counter()`` by which it must be done."""

    key: str
    deadline: float
    rows: list[dict] = field(default_factory=list)
    start: float = field(default_factory=time.perf_counter)

    def left(self) -> float:
        """Seconds left until the deadline."""
        return self.deadline - time.perf_counter()

    def add(self, item: str, result: str, figures: str = "", seconds: float | None = None, **values) -> None:
        """A row of the table; ``values`` go to results.json only."""
        assert result in RESULTS, result
        seconds = "" if seconds is None else round(seconds, 1)
        row = dict(section=SECTIONS[self.key], item=item, result=result, seconds=seconds, figures=figures)
        self.rows.append({**row, "values": values})
        print(f"  {item}: {result} {figures}", flush=True)

    def skip(self, item: str) -> None:
        self.add(item, "skip", f"time guard: {max(self.left(), 0):.0f} s left of the section's time")


def format_table(rows: list[dict]) -> str:
    """Plain-text columns, one line per row; the figures column is left unpadded."""
    widths = {c: max(len(c), *(len(str(row[c])) for row in rows)) for c in COLUMNS[:-1]}
    lines = ["  ".join(c.ljust(widths[c]) for c in COLUMNS[:-1]) + "  figures"]
    for row in rows:
        lines.append("  ".join(str(row[c]).ljust(widths[c]) for c in COLUMNS[:-1]) + "  " + row["figures"])
    return "\n".join(lines)


def summarise(error: BaseException) -> str:
    """``Type: first line of the message``, short enough for the table."""
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0] if lines else ''}"
    return text if len(text) <= 240 else text[:237] + "..."


# -- subprocesses ----------------------------------------------------------------------------------------
def subprocess_env(device: torch.device) -> dict[str, str]:
    """This environment, with the checkout importable; on a CPU run no GPU is visible to the subprocesses."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, PYTHONPATH=path)
    if device.type == "cpu":
        env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")  # one thread: see main()
    return env


def start(cmd: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    """``cmd`` in its own process group (its data-loader and compile workers included), output to ``log``."""
    with log.open("w") as out:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def kill(proc: subprocess.Popen) -> int:
    """SIGKILL the process group of ``proc``; its return code."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    return proc.wait()


def run(cmd: list[str], log: Path, env: dict[str, str], timeout: float) -> int | None:
    """Run ``cmd`` (see :func:`start`) to its end; None if it was killed at ``timeout`` seconds."""
    proc = start(cmd, log, env)
    try:
        return proc.wait(timeout=max(timeout, 1))
    except subprocess.TimeoutExpired:
        kill(proc)
        return None


def last_line(log: Path) -> str:
    """The last non-empty line of a log (a progress bar's last state included), shortened."""
    lines = [line.strip() for line in log.read_text(errors="replace").replace("\r", "\n").splitlines()]
    lines = [line for line in lines if line]
    text = lines[-1] if lines else "(no output)"
    return text if len(text) <= 200 else text[:197] + "..."


# -- (a) the CUDA tests ----------------------------------------------------------------------------------
def junit_counts(path: Path) -> dict[str, int]:
    """passed, skipped and failed (errors included) tests of a pytest --junitxml report."""
    suite = ElementTree.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    tests, skipped = int(suite.get("tests")), int(suite.get("skipped"))
    failed = int(suite.get("failures")) + int(suite.get("errors"))
    return {"passed": tests - skipped - failed, "skipped": skipped, "failed": failed}


def check_cuda_tests(section: Section, device: torch.device, out: Path) -> None:
    report, log = out / "pytest_cuda.xml", out / "pytest_cuda.log"
    report.unlink(missing_ok=True)
    item = "pytest -m cuda tests/test_cuda.py"
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "tests/test_cuda.py", "-q", "-p", "no:cacheprovider"]
    begin = time.perf_counter()
    rc = run([*cmd, f"--junitxml={report}"], log, subprocess_env(device), section.left())
    seconds = time.perf_counter() - begin
    if rc is None:
        section.add(item, "fail", f"timed out after {seconds:.0f} s (see {log.name})", seconds)
        return
    if not report.exists():
        section.add(item, "fail", f"pytest exited with {rc} and no report: {last_line(log)}", seconds)
        return
    counts = junit_counts(report)
    figures = f"{counts['passed']} passed, {counts['skipped']} skipped, {counts['failed']} failed"
    if rc != 0:
        section.add(item, "fail", f"{figures} (exit status {rc}, see {log.name})", seconds, **counts)
    elif device.type == "cuda" and counts["skipped"]:
        section.add(item, "fail", f"{figures}: tests were skipped on a CUDA device", seconds, **counts)
    else:
        section.add(item, "ok", figures, seconds, **counts)


# -- (b) kill and resume a training run -----------------------------------------------------------------
def metrics(run_dir: Path) -> dict[str, list[dict]]:
    """The records of a run's metrics.jsonl, by kind (run, step, epoch, final)."""
    records: dict[str, list[dict]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        records.setdefault(record["kind"], []).append(record)
    return records


def check_train_resume(section: Section, plan: Plan, device: torch.device, out: Path) -> None:
    run_dir = out / "train_run"
    shutil.rmtree(run_dir, ignore_errors=True)  # train.py refuses to start over a previous run
    env, last = subprocess_env(device), run_dir / "last.pt"
    cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), "--config", str(TINY_CONFIG)]
    cmd += ["--set", f"output_dir={run_dir}", f"train.device={device.type}", *plan.train_overrides]

    item, log = "first run, SIGKILL at the first last.pt", out / "train_first.log"
    begin = time.perf_counter()
    proc = start(cmd, log, env)
    try:
        while not last.exists() and proc.poll() is None and section.left() > 0:
            time.sleep(0.05)
    finally:
        rc = kill(proc)
    seconds = time.perf_counter() - begin
    if not last.exists():
        why = f"exited with {rc}: {last_line(log)}" if rc != -signal.SIGKILL else f"not after {seconds:.0f} s"
        section.add(item, "fail", f"no last.pt ({why})", seconds)
        return
    if rc != -signal.SIGKILL:
        section.add(item, "fail", f"train.py ended by itself (exit status {rc}) before it could be killed", seconds)
        return
    state = torch.load(last, map_location="cpu", weights_only=True)
    where = f"epoch {state['epoch'] + 1}, step {state['step_in_epoch']} of it (global step {state['global_step']})"
    section.add(item, "ok", f"killed; last.pt continues at {where}", seconds, global_step=state["global_step"])

    item, log = "second run, --resume auto to the end", out / "train_resume.log"
    begin = time.perf_counter()
    rc = run([*cmd, "--resume", "auto"], log, env, section.left())
    seconds = time.perf_counter() - begin
    if rc != 0:
        why = f"timed out after {seconds:.0f} s" if rc is None else f"exit status {rc}: {last_line(log)}"
        section.add(item, "fail", why, seconds)
        return
    epochs = yaml.safe_load((run_dir / "config.yaml").read_text())["schedule"]["epochs"]
    records = metrics(run_dir)
    run_record, final = records["run"][-1], records.get("final", [{}])[-1]
    last_epoch = records.get("epoch", [{}])[-1]
    problems = []
    if not str(run_record.get("resumed_from")).endswith("last.pt"):
        problems.append(f"the second run did not resume (resumed_from: {run_record.get('resumed_from')})")
    if last_epoch.get("epoch") != epochs or final.get("epochs") != epochs:
        problems.append(f"metrics end at epoch {last_epoch.get('epoch')}, final record {final or 'missing'}")
    if final.get("step") != epochs * run_record["steps_per_epoch"]:
        problems.append(f"final step {final.get('step')} != {epochs} epochs x {run_record['steps_per_epoch']} steps")
    if problems:
        section.add(item, "fail", "; ".join(problems), seconds)
        return
    figures = (
        f"ended at epoch {epochs} of {epochs}, step {final['step']}; last epoch {last_epoch['images_per_s']:.1f} img/s,"
        f" val top-1 {final['final_top1']:.1f}%"
    )
    section.add(item, "ok", figures, seconds, epochs=epochs, steps=final["step"])


# -- (c) and (d): training steps in this process --------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory() -> None:
    """Drop what the last entry left: compiled graphs, garbage, the CUDA caching allocator's free blocks."""
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass
class Failure:
    message: str
    out_of_memory: bool


def attempt(fn: Callable, *args) -> tuple[object, Failure | None]:
    """``(fn(*args), None)``, or ``(None, Failure)`` if it raised; the memory it held is freed either way."""
    result, failure = None, None
    try:
        result = fn(*args)
    except Exception as error:  # one entry failing is a row of the table, not the end of the check
        failure = Failure(summarise(error), isinstance(error, torch.cuda.OutOfMemoryError))
    free_memory()  # after the except block, whose traceback held the entry's tensors
    return result, failure


def build(name: str, size: int, device: torch.device) -> torch.nn.Module:
    """A timm model (Atlas after ``import atlas``) built for ``size`` px, its weights made on ``device``.

    ``name+flex`` builds an Atlas model with ``attention="flex"``.
    """
    name, _, kernel = name.partition("+")
    kwargs = {"attention": kernel} if kernel else {}
    with torch.device(device):
        return timm.create_model(name, img_size=size, num_classes=NUM_CLASSES, **kwargs)


def training_step(model: torch.nn.Module, batch: int, size: int, device: torch.device) -> Callable[[], None]:
    """One AdamW step on a fixed random batch: forward (bf16 autocast on CUDA), backward, optimizer."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    images = torch.randn(batch, 3, size, size, device=device)
    labels = torch.randint(0, NUM_CLASSES, (batch,), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step() -> None:
        with autocast:
            loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def matmul_flop_rate(size: int, device: torch.device) -> float:
    """FLOP/s of a ``size``^3 matrix product, bf16 on CUDA and fp32 on a CPU (median of 10 after 3 warm-ups)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    return 2 * size**3 / median_seconds(lambda: a @ b, 3, 10, device)["wall"]


def time_training(name: str, size: int, batch: int, compiled: bool, plan: Plan, device: torch.device) -> dict:
    """Images/s (median step after warm-up), peak memory, training FLOPs per image and the first step's time."""
    torch.manual_seed(0)
    with peak_memory(device) as memory:
        model = build(name, size, device)
        flops = count_flops(model, (1, 3, size, size), backward=True)  # on the meta device: costs nothing
        step = training_step(torch.compile(model) if compiled else model, batch, size, device)
        begin = time.perf_counter()
        step()  # compiles
        synchronize(device)
        first_step_s = time.perf_counter() - begin
        seconds = median_seconds(step, plan.warmup - 1, plan.timed, device)["wall"]
    return dict(images_per_s=batch / seconds, peak_gib=memory["mib"] / 1024, flops=flops, first_step_s=first_step_s)


def check_throughput(section: Section, plan: Plan, device: torch.device) -> None:
    begin = time.perf_counter()
    n, dtype = plan.matmul_size, "bf16" if device.type == "cuda" else "fp32"
    rate = matmul_flop_rate(n, device)
    section.add(
        f"{dtype} {n}^3 matmul (MFU reference)", "ok", f"{rate / 1e12:.3g} TFLOP/s", time.perf_counter() - begin
    )
    speeds: dict[tuple[int, str], dict[str, float]] = {}
    benchmark_before, torch.backends.cudnn.benchmark = torch.backends.cudnn.benchmark, True  # as train.py does
    try:
        for mode in ("eager", "compiled") if plan.compile else ("eager",):  # every eager number before compiling
            longest = 0.0  # seconds of this mode's longest entry so far: what the next one may need
            for name, size, batch in plan.throughput:
                if name.endswith("+flex") and mode == "eager":
                    continue  # FlexAttention unfused materialises every score: compiled only
                item = f"{name} {size}px batch {batch} {mode}"
                if section.left() <= longest:
                    section.skip(item)
                    continue
                begin = time.perf_counter()
                result, failure = attempt(time_training, name, size, batch, mode == "compiled", plan, device)
                seconds = time.perf_counter() - begin
                longest = max(longest, seconds)
                if failure:
                    why = f"out of memory at batch {batch}" if failure.out_of_memory else failure.message
                    section.add(item, "fail", why, seconds)
                    continue
                mfu = result["flops"] * result["images_per_s"] / rate
                figures = (
                    f"{result['images_per_s']:.3g} img/s, peak {result['peak_gib']:.1f} GiB, MFU {mfu:.1%} "
                    f"({result['flops'] / 1e12:.3g} TFLOP/img), first step {result['first_step_s']:.1f} s"
                )
                section.add(item, "ok", figures, seconds, mfu=mfu, batch=batch, **result)
                speeds.setdefault((size, mode), {})[name] = result["images_per_s"]
    finally:
        torch.backends.cudnn.benchmark = benchmark_before
    for (size, mode), by_model in speeds.items():
        for name in (m for m in by_model if m.startswith("atlas")):
            for other in (m for m in by_model if m.startswith("vit")):
                ratio = by_model[name] / by_model[other]
                section.add(f"{name} / {other} {size}px {mode}", "ok", f"{ratio:.2f}x images/s", speedup=ratio)


def train_at_batch_1(name: str, size: int, device: torch.device) -> dict:
    """Two training steps at batch 1 with gradient checkpointing: peak memory, and the second step's time."""
    torch.manual_seed(0)
    with peak_memory(device) as memory:
        model = build(name, size, device)  # built for the size: img_size decides the number of scales
        model.set_grad_checkpointing(True)
        step = training_step(model, 1, size, device)
        step()  # allocates the optimizer state
        seconds = median_seconds(step, 0, 1, device)["wall"]
    return dict(peak_gib=memory["mib"] / 1024, step_s=seconds)


def check_largest_image(section: Section, plan: Plan, device: torch.device) -> None:
    """Each model at each size in turn, until the first out-of-memory (or other failure, or the time guard)."""
    for name in plan.largest_models:
        largest, stop = None, "every size tried fitted"
        for size in plan.largest_sizes:
            item = f"{name} {size}px batch 1"
            if section.left() <= 0:
                section.skip(item)
                stop = "time guard"
                break
            begin = time.perf_counter()
            result, failure = attempt(train_at_batch_1, name, size, device)
            seconds = time.perf_counter() - begin
            if failure:
                outcome = "oom" if failure.out_of_memory else "fail"
                section.add(item, outcome, "out of memory" if failure.out_of_memory else failure.message, seconds)
                stop = f"{size}px: {outcome}"
                break
            largest = (size, result)
            figures = f"peak {result['peak_gib']:.1f} GiB, step {result['step_s']:.2f} s"
            section.add(item, "ok", figures, seconds, **result)
        if largest is None:
            section.add(f"{name} largest", "skip" if stop == "time guard" else "fail", f"none trained ({stop})")
        else:
            size, result = largest
            figures = f"{size}px, peak {result['peak_gib']:.1f} GiB ({stop})"
            section.add(f"{name} largest", "ok", figures, size=size, peak_gib=result["peak_gib"])


# -- main ------------------------------------------------------------------------------------------------
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name() or platform.processor() or "unknown CPU"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda if a GPU is visible, else cpu")
    parser.add_argument("--smoke", action="store_true", help="tiny models and sizes, no compile (CI on a CPU)")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "results" / "gpu_check", help="results and logs (%(default)s)"
    )
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    if args.device == "cuda" and not cuda:
        parser.error("--device cuda: no CUDA GPU is visible; on a CPU run --device cpu --smoke")
    args.device = args.device or ("cuda" if cuda else "cpu")
    if args.device == "cpu" and not args.smoke:
        why = "" if cuda else "no CUDA GPU is visible and "
        parser.error(f"{why}the full check is sized for an 80 GB GPU; on a CPU run --device cpu --smoke")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device, plan = torch.device(args.device), SMOKE_PLAN if args.smoke else GPU_PLAN
    args.out.mkdir(parents=True, exist_ok=True)
    if device.type == "cpu":  # a CPU run checks that everything runs, not speed; 2 threads on a busy 2-core
        torch.set_num_threads(1)  # machine wait for each other and crawl, one does not
    clock = time.perf_counter()
    cuda = f" (CUDA {torch.version.cuda})" if device.type == "cuda" else f", torch threads: {torch.get_num_threads()}"
    header = f"device: {device_name(device)}{cuda}; torch {torch.__version__}, timm {timm.__version__}"
    plan_name = "smoke" if args.smoke else "full"
    print(f"{header}\nplan: {plan_name}, section budgets (s): {plan.budgets_s}", flush=True)
    checks = {
        "a": lambda s: check_cuda_tests(s, device, args.out),
        "b": lambda s: check_train_resume(s, plan, device, args.out),
        "c": lambda s: check_throughput(s, plan, device),
        "d": lambda s: check_largest_image(s, plan, device),
    }
    sections, spent, deadline = [], {}, clock
    for key, check in checks.items():
        deadline += plan.budgets_s[key]
        section = Section(key, deadline)
        print(f"({key}) {SECTIONS[key][2:]}: {section.left():.0f} s left", flush=True)
        try:
            check(section)
        except Exception as error:  # a bug or an unexpected state: this section fails, the next one runs
            traceback.print_exc()
            section.add("section", "fail", summarise(error))
        free_memory()
        spent[key] = round(time.perf_counter() - section.start, 1)
        sections.append(section)

    rows = [row for section in sections for row in section.rows]
    failed = sum(row["result"] == "fail" for row in rows)
    total = time.perf_counter() - clock
    with (args.out / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    summary = dict(header=header, plan=plan_name, section_seconds=spent, total_seconds=round(total, 1), rows=rows)
    (args.out / "results.json").write_text(json.dumps(summary, indent=1))
    print(f"\nresults and logs in {args.out}\n")
    print(header)
    print(format_table(rows))
    sections_line = ", ".join(f"{SECTIONS[k]} {s:.0f} s" for k, s in spent.items())
    print(f"sections: {sections_line}; total {total:.0f} s; {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
