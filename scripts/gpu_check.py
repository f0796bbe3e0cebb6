"""The prepared GPU check: six timed sections, one table, sized to finish within 8.5 minutes on one H100/H200.

    python scripts/gpu_check.py                          # one CUDA GPU (80 GB or more), about 8 minutes
    python scripts/gpu_check.py --device cpu --smoke     # the same checks, tiny, on a CPU (CI), about two minutes

(a) the CUDA tests: ``pytest -m cuda tests/test_cuda.py`` in a subprocess (all skipped without a GPU), run while
    (b) runs, since neither is timed for speed;
(b) scripts/train.py under ``torchrun --nproc_per_node=1`` (NCCL, DDP and SyncBatchNorm on a GPU), killed with
    SIGKILL once it has written its first last.pt, then run again with ``--resume auto`` to the end: the metrics
    must end at the configured number of epochs, and the EMA's score must be that of weights that learned;
(c) the largest images: Atlas-S/16 and Atlas-B/16 at batch 1 with gradient checkpointing up to 16,384px, the
    step time per pixel of each size, and (last, as time allows) 16,384px once more without the stem's strips;
(d) training throughput, one model after the other in this process: Atlas against ViT, AdamW step included,
    with each block compiled on its own (``regional``) and with the whole model compiled (``full``) (the eager
    steps: `make paper-speed`'s Table 6, and (e)):
    images/s, peak memory and MFU (the training FLOPs per image that ``atlas.profiling.count_flops`` counts,
    times images/s, over the rate of a large matrix product timed here);
(e) where a training step's time goes: the stem, the MSA blocks, the head and the optimizer, each part's time
    and MFU, eager;
(f) the input pipeline: scripts/train.py on generated JPEGs with each pipeline (``exact``, ``fast``), against the
    same model's images/s on random batches in this process.

On a GPU everything runs in bf16 autocast; the smoke plan (``--smoke``) runs tiny models at tiny sizes, in fp32 on a
CPU, without compiling. An error fails its row (or its section) and the rest still runs; the exit status is 1 if
any row failed. Each section has a time budget, and what one leaves unused goes to the next: an entry that would
not finish in its section's time is a ``skip`` row that says so. Rows are ordered by what they decide, and every
row is written to ``--out`` (results.csv, results.json) as soon as it is measured, next to the subprocesses' logs;
the whole table is printed last. Runs from a checkout with only torch, timm, einops, pyyaml and pillow installed
(and pytest for (a)).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `import atlas` from a checkout, installed or not

import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import yaml  # noqa: E402
from PIL import Image  # noqa: E402
from trainlib.compiling import COMPILE_MODES, compile_model  # noqa: E402
from trainlib.jpegs import write_image_folder  # noqa: E402
from trainlib.pipeline import DeviceStage, SourceCrop  # noqa: E402
from trainlib.timing import (  # noqa: E402
    device_name,
    free_memory,
    matmul_flop_rate,
    median_seconds,
    peak_memory,
    profile_table,
)

import atlas  # noqa: E402, F401  (registers the Atlas models with timm)
from atlas.profiling import atlas_flops_breakdown, count_flops  # noqa: E402
from atlas.stem import StripConv2d  # noqa: E402

TINY_CONFIG = ROOT / "scripts" / "configs" / "tiny_cpu_synthetic.yaml"
PIPELINE_CONFIG = ROOT / "scripts" / "configs" / "tiny_cpu_imagefolder.yaml"
NUM_CLASSES = 100
SECTIONS = {
    "a": "a cuda-tests",
    "b": "b train-resume",
    "c": "c largest-image",
    "d": "d throughput",
    "e": "e breakdown",
    "f": "f input-pipeline",
}
RESULTS = ("ok", "fail", "skip", "oom")  # oom: the expected end of (c)'s search, not a failure
COLUMNS = ("section", "item", "result", "seconds", "figures")


@dataclass(frozen=True)
class PipelineRun:
    """(f): scripts/train.py on an image folder of generated JPEGs, and the same model on random batches."""

    model: str
    size: int
    batch: int
    overrides: tuple[str, ...]  # `--set` overrides of PIPELINE_CONFIG
    classes: int
    train_per_class: int
    val_per_class: int
    source: tuple[int, int]  # JPEG size (W, H)


@dataclass(frozen=True)
class Plan:
    """What every section runs, and the seconds each may take."""

    budgets_s: dict[str, float]
    train_overrides: tuple[str, ...]  # `--set` overrides of TINY_CONFIG for (b)
    largest_models: tuple[str, ...]  # (c)
    largest_sizes: tuple[int, ...]
    unstripped: tuple[str, int] | None  # (c): (model, size) trained once more without the stem's strips
    throughput: tuple[tuple[str, int, int, str], ...]  # (d): (model, side, batch, mode); "model+flex": flex attention
    warmup: int  # (d): untimed steps, the first one included (it compiles)
    timed: int
    matmul_size: int
    breakdown: tuple[tuple[str, int, int], ...]  # (e): (Atlas model, side, batch)
    pipeline: PipelineRun


GPU_PLAN = Plan(
    budgets_s={"a": 150, "b": 110, "c": 70, "d": 190, "e": 15, "f": 75},
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
    largest_models=("atlas_small_patch16", "atlas_base_patch16"),
    largest_sizes=(4096, 8192, 16384),
    unstripped=("atlas_small_patch16", 16384),
    # Batches for an 80 GB card. ViT-B at 2048px attends over 16384 tokens: batch 2 keeps its steps short and far
    # from the memory limit without gradient checkpointing. Checkpointing stays off here: it recomputes the forward
    # pass, work that the counted training FLOPs (and so MFU) would not include. Compiled rows only (the eager
    # steps are in `make paper-speed`'s Table 6 and in (e)): first the five that decide the targets, 30 to 70 s
    # each with their compilation on an H200, then the comparisons, as the time guard allows.
    throughput=(
        ("atlas_base_patch16", 1024, 16, "regional"),
        ("vit_base_patch16_224", 1024, 16, "regional"),
        ("atlas_base_patch16", 2048, 4, "regional"),
        ("vit_base_patch16_224", 2048, 2, "regional"),
        ("atlas_small_patch16", 4096, 2, "regional"),
        ("atlas_base_patch16+flex", 2048, 4, "regional"),  # top-down with FlexAttention (compiled: eager is unfused)
        ("atlas_base_patch16", 1024, 16, "full"),
        ("atlas_base_patch16+flex", 1024, 16, "regional"),
    ),
    warmup=2,
    timed=5,
    matmul_size=8192,
    breakdown=(("atlas_base_patch16", 1024, 16), ("atlas_base_patch16", 2048, 4), ("atlas_small_patch16", 4096, 2)),
    pipeline=PipelineRun(
        # The paper's Table 2 model as its config trains it (2048px, gradient checkpointing, batch 16 per GPU).
        model="atlas_small_patch16",
        size=2048,
        batch=16,
        overrides=(
            "model.name=atlas_small_patch16",
            "model.img_size=2048",
            "model.kwargs={}",
            "model.drop_path_rate=0.3",
            "train.batch_size=16",
            "train.grad_accum=1",
            "train.grad_checkpointing=true",
            "train.amp=bf16",
            "train.channels_last=true",
            "train.deterministic=false",
            "train.compile=none",  # as the random batches it is compared with
            "train.log_every=1",
            "data.workers=14",
            "schedule.epochs=2",
            "schedule.warmup_epochs=0",
            "eval.every=2",
            "eval.batch_size=16",
        ),
        classes=4,
        train_per_class=48,  # 192 images: 12 steps per epoch
        val_per_class=4,
        source=(500, 375),  # ImageNet's typical JPEG
    ),
)

SMOKE_PLAN = Plan(
    budgets_s={"a": 50, "b": 70, "c": 25, "d": 25, "e": 15, "f": 40},
    train_overrides=("checkpoint.every_steps=2",),  # the tiny config as it is, last.pt after 2 of its 12 steps
    largest_models=("atlas_tiny_patch16",),
    largest_sizes=(256, 512),
    unstripped=None,
    throughput=(("atlas_tiny_patch16", 256, 2, "none"), ("vit_tiny_patch16_224", 256, 2, "none")),
    warmup=1,
    timed=2,
    matmul_size=1024,
    breakdown=(("atlas_tiny_patch16", 256, 2),),
    pipeline=PipelineRun(
        model="atlas_tiny_patch16",
        size=64,
        batch=8,
        overrides=("train.batch_size=8", "train.grad_accum=1", "schedule.epochs=2", "data.workers=0"),
        classes=2,
        train_per_class=8,
        val_per_class=2,
        source=(80, 60),
    ),
)


# -- the table -------------------------------------------------------------------------------------------
@dataclass
class Report:
    """Every row so far, written to ``out`` (results.csv, results.json) each time a row is added."""

    out: Path
    header: str
    plan: str
    rows: list[dict] = field(default_factory=list)
    section_seconds: dict[str, float] = field(default_factory=dict)

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self.save()

    def save(self, total_seconds: float | None = None) -> None:
        with (self.out / "results.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(self.rows)
        summary = dict(header=self.header, plan=self.plan, section_seconds=self.section_seconds, rows=self.rows)
        if total_seconds is not None:
            summary["total_seconds"] = round(total_seconds, 1)
        (self.out / "results.json").write_text(json.dumps(summary, indent=1))


@dataclass
class Section:
    """One section's rows and its time guard: the ``time.perf_counter()`` by which it must be done."""

    key: str
    deadline: float
    report: Report
    start: float = field(default_factory=time.perf_counter)

    def left(self) -> float:
        """Seconds left until the deadline."""
        return self.deadline - time.perf_counter()

    def add(self, item: str, result: str, figures: str = "", seconds: float | None = None, **values) -> None:
        """A row of the table; ``values`` go to results.json only."""
        assert result in RESULTS, result
        seconds = "" if seconds is None else round(seconds, 1)
        row = dict(section=SECTIONS[self.key], item=item, result=result, seconds=seconds, figures=figures)
        self.report.add({**row, "values": values})
        print(f"  {item}: {result} {figures}", flush=True)

    def skip(self, item: str, needs: float | None = None) -> None:
        """A row not run: the time left (and what a row of its kind took so far) says why."""
        why = f"time guard: {max(self.left(), 0):.0f} s left of the section's time"
        self.add(item, "skip", why + (f", a row of its kind took {needs:.0f} s" if needs else ""))


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


def process_tree(pid: int) -> list[int]:
    """``pid`` and every process descended from it (Linux ``/proc``; just ``pid`` elsewhere)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])  # the field after the command's name
        except (OSError, IndexError, ValueError):
            continue  # a process that ended meanwhile
        children.setdefault(parent, []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo.extend(children.get(tree[-1], []))
    return tree


def kill(proc: subprocess.Popen) -> int:
    """SIGKILL ``proc``, its process group and every process descended from it (torchrun starts its workers in
    sessions of their own, which a signal to the group does not reach); its return code."""
    if proc.poll() is None:
        tree = process_tree(proc.pid)  # before any dies: an orphan's parent becomes init
        os.killpg(proc.pid, signal.SIGKILL)
        for pid in tree:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return proc.wait()


def wait(proc: subprocess.Popen, timeout: float) -> int | None:
    """The return code of ``proc``; None if it was still running at ``timeout`` seconds (then it is killed)."""
    try:
        return proc.wait(timeout=max(timeout, 1))
    except subprocess.TimeoutExpired:
        kill(proc)
        return None


def run(cmd: list[str], log: Path, env: dict[str, str], timeout: float) -> int | None:
    """Run ``cmd`` (see :func:`start`) to its end; None if it was killed at ``timeout`` seconds."""
    return wait(start(cmd, log, env), timeout)


def last_line(log: Path) -> str:
    """The last non-empty line of a log (a progress bar's last state included), shortened."""
    lines = [line.strip() for line in log.read_text(errors="replace").replace("\r", "\n").splitlines()]
    lines = [line for line in lines if line]
    text = lines[-1] if lines else "(no output)"
    return text if len(text) <= 200 else text[:197] + "..."


def train_command(config: Path, out_dir: Path, overrides: tuple[str, ...], torchrun: bool = False) -> list[str]:
    """scripts/train.py on ``config`` with ``overrides``; under ``torchrun`` one process on this machine."""
    launcher = [sys.executable]
    if torchrun:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    script = [str(ROOT / "scripts" / "train.py"), "--config", str(config)]
    return [*launcher, *script, "--set", f"output_dir={out_dir}", *overrides]


def metrics(run_dir: Path) -> dict[str, list[dict]]:
    """The records of a run's metrics.jsonl, by kind (run, step, epoch, final)."""
    records: dict[str, list[dict]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        records.setdefault(record["kind"], []).append(record)
    return records


# -- (a) the CUDA tests ----------------------------------------------------------------------------------
def junit_counts(path: Path) -> dict[str, int]:
    """passed, skipped and failed (errors included) tests of a pytest --junitxml report."""
    suite = ElementTree.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    tests, skipped = int(suite.get("tests")), int(suite.get("skipped"))
    failed = int(suite.get("failures")) + int(suite.get("errors"))
    return {"passed": tests - skipped - failed, "skipped": skipped, "failed": failed}


CUDA_TESTS = "pytest -m cuda tests/test_cuda.py"


def start_cuda_tests(device: torch.device, out: Path) -> subprocess.Popen:
    (out / "pytest_cuda.xml").unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "tests/test_cuda.py", "-q", "-p", "no:cacheprovider"]
    return start([*cmd, f"--junitxml={out / 'pytest_cuda.xml'}"], out / "pytest_cuda.log", subprocess_env(device))


def finish_cuda_tests(section: Section, proc: subprocess.Popen, device: torch.device, out: Path) -> None:
    report, log = out / "pytest_cuda.xml", out / "pytest_cuda.log"
    print(f"(a) {SECTIONS['a'][2:]}: waiting for them, {section.left():.0f} s left", flush=True)
    rc = wait(proc, section.left())
    section.report.section_seconds["a"] = round(time.perf_counter() - section.start, 1)
    seconds = time.perf_counter() - section.start
    if rc is None:
        section.add(CUDA_TESTS, "fail", f"timed out after {seconds:.0f} s (see {log.name})", seconds)
        return
    if not report.exists():
        section.add(CUDA_TESTS, "fail", f"pytest exited with {rc} and no report: {last_line(log)}", seconds)
        return
    counts = junit_counts(report)
    figures = f"{counts['passed']} passed, {counts['skipped']} skipped, {counts['failed']} failed"
    if rc != 0:
        section.add(CUDA_TESTS, "fail", f"{figures} (exit status {rc}, see {log.name})", seconds, **counts)
    elif device.type == "cuda" and counts["skipped"]:
        section.add(CUDA_TESTS, "fail", f"{figures}: tests were skipped on a CUDA device", seconds, **counts)
    else:
        section.add(CUDA_TESTS, "ok", figures, seconds, **counts)


# -- (b) kill and resume a training run under torchrun --------------------------------------------------
def check_train_resume(section: Section, plan: Plan, device: torch.device, out: Path) -> None:
    run_dir = out / "train_run"
    shutil.rmtree(run_dir, ignore_errors=True)  # train.py refuses to start over a previous run
    env, last = subprocess_env(device), run_dir / "last.pt"
    cmd = train_command(TINY_CONFIG, run_dir, (f"train.device={device.type}", *plan.train_overrides), torchrun=True)

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
    backend = "nccl" if device.type == "cuda" else "gloo"
    if run_record.get("process_group") != backend or not run_record.get("ddp"):
        problems.append(
            f"expected DDP over {backend}, got {run_record.get('process_group')}, ddp={run_record.get('ddp')}"
        )
    if device.type == "cuda" and not run_record.get("sync_bn"):
        problems.append("the stem's BatchNorms were not converted to SyncBatchNorm")
    if problems:
        section.add(item, "fail", "; ".join(problems), seconds)
        return
    ema = f", EMA top-1 {last_epoch['ema_top1']:.1f}%" if "ema_top1" in last_epoch else ""
    figures = (
        f"{run_record['process_group']} + DDP{' + SyncBatchNorm' if run_record.get('sync_bn') else ''}; ended at "
        f"epoch {epochs} of {epochs}, step {final['step']}; last epoch {last_epoch['images_per_s']:.1f} img/s, val "
        f"top-1 {final['final_top1']:.1f}%{ema}"
    )
    section.add(item, "ok", figures, seconds, epochs=epochs, steps=final["step"], ema_top1=last_epoch.get("ema_top1"))


# -- training steps in this process -----------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


# -- (c) the largest images -------------------------------------------------------------------------------
@contextmanager
def cudnn_benchmark():
    """cuDNN's autotuner on, as train.py runs it (each new shape tries the convolution algorithms once)."""
    saved, torch.backends.cudnn.benchmark = torch.backends.cudnn.benchmark, True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = saved


@contextmanager
def stem_strips(enabled: bool):
    """The stem's convolutions in strips past 2^31 - 1 elements per image (the default), or never (``False``)."""
    saved = StripConv2d.max_elements
    StripConv2d.max_elements = saved if enabled else 2**62
    try:
        yield
    finally:
        StripConv2d.max_elements = saved


def train_at_batch_1(name: str, size: int, device: torch.device, strips: bool = True) -> dict:
    """Two training steps at batch 1 with gradient checkpointing: peak memory, the second step's time, and how
    many of the stem's convolutions ran in strips."""
    torch.manual_seed(0)
    with stem_strips(strips), peak_memory(device) as memory:
        model = build(name, size, device)  # built for the size: img_size decides the number of scales
        model.set_grad_checkpointing(True)
        striped = set()
        for conv in (m for m in model.modules() if isinstance(m, StripConv2d)):
            conv.register_forward_pre_hook(
                lambda m, args: striped.add(m) if m.strip_rows(args[0].shape) is not None else None
            )
        step = training_step(model, 1, size, device)
        step()  # allocates the optimizer state
        seconds = median_seconds(step, 0, 1, device)["wall"]
    return dict(peak_gib=memory["mib"] / 1024, step_s=seconds, strip_convs=len(striped))


def check_largest_image(section: Section, plan: Plan, device: torch.device) -> None:
    """Each model at each size in turn, until the first out-of-memory (or other failure, or the time guard);
    then the step time per pixel of the largest size against the size before it."""
    for name in plan.largest_models:
        trained: dict[int, dict] = {}
        stop = "every size tried fitted"
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
            trained[size] = result
            per_mpix = result["step_s"] / (size * size / 1e6)
            strips = f", {result['strip_convs']} stem convolutions in strips" if result["strip_convs"] else ""
            figures = (
                f"peak {result['peak_gib']:.1f} GiB, step {result['step_s']:.2f} s ({per_mpix * 1e3:.3g} ms/MP){strips}"
            )
            section.add(item, "ok", figures, seconds, ms_per_mpix=per_mpix * 1e3, **result)
        if not trained:
            section.add(f"{name} largest", "skip" if stop == "time guard" else "fail", f"none trained ({stop})")
            continue
        largest = max(trained)
        figures = f"{largest}px, peak {trained[largest]['peak_gib']:.1f} GiB ({stop})"
        if len(trained) > 1:
            before = max(s for s in trained if s < largest)
            ratio = (trained[largest]["step_s"] / largest**2) / (trained[before]["step_s"] / before**2)
            figures += f"; step time per pixel {ratio:.2f}x that of {before}px"
        section.add(f"{name} largest", "ok", figures, size=largest, peak_gib=trained[largest]["peak_gib"])
    if plan.unstripped is None:
        return
    name, size = plan.unstripped
    item = f"{name} {size}px batch 1, no strips (the stem as before)"
    if section.left() <= 0:
        section.skip(item)
        return
    begin = time.perf_counter()
    result, failure = attempt(train_at_batch_1, name, size, device, False)
    seconds = time.perf_counter() - begin
    if failure:
        section.add(item, "oom" if failure.out_of_memory else "fail", failure.message, seconds)
    else:
        figures = f"peak {result['peak_gib']:.1f} GiB, step {result['step_s']:.2f} s"
        section.add(item, "ok", figures, seconds, **result)


# -- (d) throughput ----------------------------------------------------------------------------------------
def time_training(name: str, size: int, batch: int, mode: str, plan: Plan, device: torch.device) -> dict:
    """Images/s (median step after warm-up), peak memory, training FLOPs per image and the first step's time."""
    torch.manual_seed(0)
    with peak_memory(device) as memory:
        model = build(name, size, device)
        counted = build(name.partition("+")[0], size, torch.device("meta"))  # FlexAttention cannot run on meta
        flops = count_flops(counted, (1, 3, size, size), backward=True)  # on the meta device: costs nothing
        step = training_step(compile_model(model, mode), batch, size, device)
        begin = time.perf_counter()
        step()  # compiles
        synchronize(device)
        first_step_s = time.perf_counter() - begin
        seconds = median_seconds(step, plan.warmup - 1, plan.timed, device)["wall"]
    return dict(images_per_s=batch / seconds, peak_gib=memory["mib"] / 1024, flops=flops, first_step_s=first_step_s)


def check_throughput(section: Section, plan: Plan, device: torch.device, only: re.Pattern | None = None) -> None:
    begin = time.perf_counter()
    n, dtype = plan.matmul_size, "bf16" if device.type == "cuda" else "fp32"
    rate = matmul_flop_rate(n, device)
    section.add(
        f"{dtype} {n}^3 matmul (MFU reference)", "ok", f"{rate / 1e12:.3g} TFLOP/s", time.perf_counter() - begin
    )
    speeds: dict[tuple[int, str], dict[str, float]] = {}
    longest = dict.fromkeys(COMPILE_MODES, 0.0)  # seconds of each mode's longest entry so far
    with cudnn_benchmark():
        for name, size, batch, mode in plan.throughput:
            item = f"{name} {size}px batch {batch} {'eager' if mode == 'none' else mode}"
            if only is not None and not only.search(item):
                continue
            if section.left() <= longest[mode]:
                section.skip(item, longest[mode])
                continue
            begin = time.perf_counter()
            result, failure = attempt(time_training, name, size, batch, mode, plan, device)
            seconds = time.perf_counter() - begin
            longest[mode] = max(longest[mode], seconds)
            if failure:
                why = f"out of memory at batch {batch}" if failure.out_of_memory else failure.message
                section.add(item, "fail", why, seconds)
                continue
            mfu = result["flops"] * result["images_per_s"] / rate
            figures = (
                f"{result['images_per_s']:.3g} img/s, peak {result['peak_gib']:.1f} GiB, MFU {mfu:.1%} "
                f"({result['flops'] / 1e12:.3g} TFLOP/img), first step {result['first_step_s']:.1f} s"
            )
            section.add(item, "ok", figures, seconds, mfu=mfu, batch=batch, mode=mode, **result)
            speeds.setdefault((size, mode), {})[name] = result["images_per_s"]
    for (size, mode), by_model in speeds.items():
        for name in (m for m in by_model if m.startswith("atlas")):
            for other in (m for m in by_model if m.startswith("vit")):
                ratio = by_model[name] / by_model[other]
                section.add(
                    f"{name} / {other} {size}px {'eager' if mode == 'none' else mode}",
                    "ok",
                    f"{ratio:.2f}x images/s",
                    speedup=ratio,
                )


# -- (e) where the time of a training step goes ----------------------------------------------------------
def time_parts(name: str, size: int, batch: int, device: torch.device, profile_rows: int = 0) -> dict:
    """Eager step time of the stem, the MSA blocks, the head (with the loss) and the optimizer, in seconds.

    Timed as nested passes, each forward and backward: the stem alone, the features (stem + blocks), the whole
    model with its loss, and the whole step with AdamW; each part is the difference of two of them. With
    ``profile_rows``, also the table of the ops that took the most device time in one step (``"profile"``).
    """
    torch.manual_seed(0)
    model = build(name, size, device)
    images = torch.randn(batch, 3, size, size, device=device)
    labels = torch.randint(0, NUM_CLASSES, (batch,), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def backward(loss: torch.Tensor) -> None:
        loss.backward()
        model.zero_grad(set_to_none=True)

    def stem() -> None:
        with autocast:
            out = model.stem(images)
        backward(out.float().mean())

    def features() -> None:
        with autocast:
            out = model.forward_features(images)
        backward(out.float().mean())

    def whole() -> None:
        with autocast:
            loss = F.cross_entropy(model(images), labels)
        backward(loss)

    step = training_step(model, batch, size, device)  # its own batch, and an optimizer with state to update
    t = {
        k: median_seconds(fn, 1, 3, device)["wall"]
        for k, fn in dict(stem=stem, features=features, whole=whole, step=step).items()
    }
    return dict(
        profile=profile_table(step, device, profile_rows) if profile_rows else "",
        stem=t["stem"],
        blocks=t["features"] - t["stem"],
        head=t["whole"] - t["features"],
        optimizer=t["step"] - t["whole"],
        step=t["step"],
        forward_flops=atlas_flops_breakdown(model, (1, 3, size, size)),
        train_flops=count_flops(model, (1, 3, size, size), backward=True),
    )


def check_breakdown(section: Section, plan: Plan, device: torch.device, out: Path, profile_rows: int) -> None:
    rate = matmul_flop_rate(plan.matmul_size, device)
    longest = 0.0
    for name, size, batch in plan.breakdown:
        item = f"{name} {size}px batch {batch} eager"
        if section.left() <= longest:
            section.skip(item, longest)
            continue
        begin = time.perf_counter()
        with cudnn_benchmark():
            parts, failure = attempt(time_parts, name, size, batch, device, profile_rows)
        seconds = time.perf_counter() - begin
        longest = max(longest, seconds)
        if failure:
            section.add(item, "fail", failure.message, seconds)
            continue
        # Each part's training FLOPs: its share of the forward FLOPs, times the counted training FLOPs.
        fwd, train_flops = parts["forward_flops"], parts["train_flops"]
        shares = {k: fwd[k] / fwd["total"] for k in ("stem", "blocks", "head")}
        texts, values = [], {}
        for part in ("stem", "blocks", "head", "optimizer"):
            ms = parts[part] * 1e3
            values[f"{part}_ms"] = ms
            text = f"{part} {ms:.0f} ms ({parts[part] / parts['step']:.0%})"
            if part in ("stem", "blocks") and parts[part] > 0:
                mfu = shares[part] * train_flops * batch / parts[part] / rate
                values[f"{part}_mfu"] = mfu
                text += f" MFU {mfu:.0%}"
            texts.append(text)
        figures = f"step {parts['step'] * 1e3:.0f} ms: " + ", ".join(texts) + f"; stem {shares['stem']:.0%} of FLOPs"
        section.add(item, "ok", figures, seconds, **values, stem_flop_share=shares["stem"])
        if parts["profile"]:
            (out / f"profile_{name}_{size}.txt").write_text(parts["profile"])
            print(parts["profile"], flush=True)


# -- (f) the input pipeline ----------------------------------------------------------------------------------
def random_batch_rate(run_plan: PipelineRun, device: torch.device) -> float:
    """Images/s of the pipeline run's model, checkpointed as it trains, on one fixed random batch (eager)."""
    torch.manual_seed(0)
    model = build(run_plan.model, run_plan.size, device)
    model.set_grad_checkpointing(True)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    step = training_step(model, run_plan.batch, run_plan.size, device)
    return run_plan.batch / median_seconds(step, 2, 5, device)["wall"]


def resize_seconds(run_plan: PipelineRun, device: torch.device) -> float:
    """Median seconds of the fast pipeline's trainer half (`DeviceStage`) on one batch of source-sized crops."""
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    crop = SourceCrop((0.08, 1.0), (3 / 4, 4 / 3), 0.0, None, "bicubic", mean)  # the worker half's boxes
    generator = torch.Generator().manual_seed(0)
    crops = []
    for _ in range(run_plan.batch):
        pixels = torch.randint(0, 256, (*run_plan.source[::-1], 3), dtype=torch.uint8, generator=generator)
        uint8_chw = crop(Image.fromarray(pixels.numpy()))
        crops.append(uint8_chw.pin_memory() if device.type == "cuda" else uint8_chw)  # as the loader hands them over
    stage = DeviceStage(run_plan.size, mean, std, device, re_prob=0.25)
    return median_seconds(lambda: stage(crops, seed=0), 2, 5, device)["wall"]


def check_input_pipeline(section: Section, plan: Plan, device: torch.device, out: Path) -> None:
    run_plan = plan.pipeline
    begin = time.perf_counter()
    data_root = out / "pipeline_images"
    shutil.rmtree(data_root, ignore_errors=True)
    per_class = {"train": run_plan.train_per_class, "val": run_plan.val_per_class}
    write_image_folder(data_root, run_plan.classes, per_class, run_plan.source)
    with cudnn_benchmark():
        random_rate, failure = attempt(random_batch_rate, run_plan, device)
    item = f"{run_plan.model} {run_plan.size}px batch {run_plan.batch}, random batches in this process"
    if failure:
        section.add(item, "fail", failure.message, time.perf_counter() - begin)
        return
    section.add(item, "ok", f"{random_rate:.3g} img/s", time.perf_counter() - begin, images_per_s=random_rate)
    begin = time.perf_counter()
    seconds, failure = attempt(resize_seconds, run_plan, device)
    item = f"fast pipeline's resize, normalise and erase of {run_plan.batch} crops to {run_plan.size}px"
    if failure:
        section.add(item, "fail", failure.message, time.perf_counter() - begin)
    else:
        share = seconds * random_rate / run_plan.batch  # of a random-batch training step's time
        figures = f"{seconds * 1e3:.3g} ms a batch, {share:.1%} of a training step"
        section.add(item, "ok", figures, time.perf_counter() - begin, resize_s=seconds, of_step=share)
    longest = 0.0
    for pipeline in ("fast", "exact"):
        item = f"scripts/train.py, {pipeline} pipeline, generated {run_plan.source[0]}x{run_plan.source[1]} JPEGs"
        if section.left() <= longest:
            section.skip(item, longest)
            continue
        run_dir = out / f"pipeline_{pipeline}"
        shutil.rmtree(run_dir, ignore_errors=True)
        overrides = (
            f"data.root={data_root}",
            f"data.num_classes={run_plan.classes}",
            f"data.pipeline={pipeline}",
            f"train.device={device.type}",
            *run_plan.overrides,
        )
        log = out / f"pipeline_{pipeline}.log"
        begin = time.perf_counter()
        rc = run(train_command(PIPELINE_CONFIG, run_dir, overrides), log, subprocess_env(device), section.left())
        seconds = time.perf_counter() - begin
        longest = max(longest, seconds)
        if rc != 0:
            why = f"timed out after {seconds:.0f} s" if rc is None else f"exit status {rc}: {last_line(log)}"
            section.add(item, "fail", why, seconds)
            continue
        epochs = metrics(run_dir)["epoch"]
        rate = epochs[-1]["images_per_s"]  # the last epoch: workers and cuDNN's choices warm
        figures = f"last epoch {rate:.3g} img/s, {rate / random_rate:.0%} of random batches"
        section.add(item, "ok", figures, seconds, images_per_s=rate, of_random=rate / random_rate)


# -- main ------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda if a GPU is visible, else cpu")
    parser.add_argument("--smoke", action="store_true", help="tiny models and sizes, no compile (CI on a CPU)")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "results" / "gpu_check", help="results and logs (%(default)s)"
    )
    parser.add_argument(
        "--sections", default="".join(SECTIONS), help="the sections to run, e.g. 'cd' (default: all, %(default)s)"
    )
    parser.add_argument(
        "--profile", type=int, default=0, metavar="N", help="(e): print the N ops that took the most time in a step"
    )
    parser.add_argument(
        "--only", type=re.compile, metavar="REGEX", help="(d): only the rows whose item matches, e.g. 'flex|full'"
    )
    args = parser.parse_args(argv)
    if not args.sections or set(args.sections) - set(SECTIONS):
        parser.error(f"--sections takes letters of {''.join(SECTIONS)}, got {args.sections!r}")
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
    budgets = {k: v for k, v in plan.budgets_s.items() if k in args.sections}
    print(f"{header}\nplan: {plan_name}, section budgets (s): {budgets}", flush=True)
    report = Report(args.out, header, plan_name)

    cuda_tests = start_cuda_tests(device, args.out) if "a" in args.sections else None  # alongside (b)
    tests_section = Section("a", clock + plan.budgets_s["a"], report)
    checks = {
        "b": lambda s: check_train_resume(s, plan, device, args.out),
        "c": lambda s: check_largest_image(s, plan, device),
        "d": lambda s: check_throughput(s, plan, device, args.only),
        "e": lambda s: check_breakdown(s, plan, device, args.out, args.profile),
        "f": lambda s: check_input_pipeline(s, plan, device, args.out),
    }
    deadline = clock
    for key, check in checks.items():
        if key not in args.sections:
            continue
        deadline += plan.budgets_s[key]
        section = Section(key, deadline, report)
        print(f"({key}) {SECTIONS[key][2:]}: {section.left():.0f} s left", flush=True)
        try:
            check(section)
        except Exception as error:  # a bug or an unexpected state: this section fails, the next one runs
            traceback.print_exc()
            section.add("section", "fail", summarise(error))
        free_memory()
        report.section_seconds[key] = round(time.perf_counter() - section.start, 1)
        if cuda_tests is not None:  # the tests ran alongside the first section; the timed ones run alone
            finish_cuda_tests(tests_section, cuda_tests, device, args.out)
            cuda_tests = None
            deadline = max(deadline, time.perf_counter())
    if cuda_tests is not None:
        finish_cuda_tests(tests_section, cuda_tests, device, args.out)

    order = list(SECTIONS.values())
    report.rows.sort(key=lambda row: order.index(row["section"]))  # a stable sort: each section's rows in order
    failed = sum(row["result"] == "fail" for row in report.rows)
    total = time.perf_counter() - clock
    report.save(total)
    print(f"\nresults and logs in {args.out}\n")
    print(header)
    print(format_table(report.rows))
    sections_line = ", ".join(f"{SECTIONS[k]} {s:.0f} s" for k, s in report.section_seconds.items())
    print(f"sections: {sections_line}; total {total:.0f} s; {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
