"""scripts/train.py end to end on CPU: two processes under torchrun (gloo), exact resume, and clear failures."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from timm.data import auto_augment

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
CONFIGS = SCRIPTS / "configs"
sys.path.insert(0, str(SCRIPTS))

import train as train_script  # noqa: E402
from trainlib.building import build_model, compile_mode  # noqa: E402
from trainlib.config import ConfigError, load_config  # noqa: E402
from trainlib.data import ResumableSampler  # noqa: E402


def train(*args: str, nproc: int = 1, config: Path = CONFIGS / "tiny_cpu_synthetic.yaml"):
    """Run scripts/train.py (under torchrun when nproc > 1); returns the finished process."""
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1")  # 2 threads on a busy 2-core machine crawl
    cmd = [sys.executable, *launcher, str(SCRIPTS / "train.py"), "--config", str(config), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def records(out_dir: Path, kind: str) -> list[dict]:
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> Path:
    """An uninterrupted run of the tiny config: 2 processes, 3 epochs of 2 steps, EMA on."""
    out = tmp_path_factory.mktemp("ddp") / "run"
    result = train("--set", f"output_dir={out}", "train.ema=true", nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_the_local_launcher_trains_exactly_as_torchrun(ddp_run, tmp_path):
    """--nproc-per-node 2 starts the same two processes torchrun does: the same weights, bit for bit."""
    out = tmp_path / "run"
    result = train("--set", f"output_dir={out}", "train.ema=true", "--nproc-per-node", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert records(out, "run")[0]["world_size"] == 2
    assert_same_tensors(load(out / "last.pt")["model"], load(ddp_run / "last.pt")["model"])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--resume", "missing.pt"], "error: --resume missing.pt: no such checkpoint"),
        (["--set", "train.batchsize=4"], "error: unknown config key 'train.batchsize'"),
    ],
    ids=["missing checkpoint", "unknown key"],
)
def test_an_error_under_the_local_launcher_is_one_line_from_rank_0(tmp_path, args, message):
    result = train("--set", f"output_dir={tmp_path / 'run'}", *args, "--nproc-per-node", "2")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and result.stderr.startswith(message)


def test_ddp_trains_evaluates_and_checkpoints(ddp_run):
    (run,) = records(ddp_run, "run")
    assert run["world_size"] == 2 and run["global_batch"] == 32 and run["steps_per_epoch"] == 2
    model = build_model(load_config(CONFIGS / "tiny_cpu_synthetic.yaml", []))
    assert run["params"] == sum(p.numel() for p in model.parameters())
    epochs = records(ddp_run, "epoch")
    assert [e["epoch"] for e in epochs] == [1, 2, 3]
    for e in epochs:
        assert 0 <= e["val_top1"] <= e["val_top5"] <= 100 and 0 <= e["ema_top1"] <= 100
        assert e["images_per_s"] > 0 and e["epoch_time_s"] > 0 and e["peak_mem_gb"] > 0
        assert e["skipped_images"] == 0 and e["val_images"] == 32  # 2 ranks x 16, no drop_last
    assert (run["eval_every"], run["eval_drop_last"]) == (1, False)
    (final,) = records(ddp_run, "final")
    assert final["final_top1"] == epochs[-1]["val_top1"]
    assert len((ddp_run / "metrics.csv").read_text().splitlines()) == 1 + 3
    last, best = load(ddp_run / "last.pt"), load(ddp_run / "best.pt")
    assert (last["epoch"], last["step_in_epoch"], last["global_step"]) == (3, 0, 6)
    assert len(last["rng"]) == 2 and best["model"].keys() == last["model"].keys()
    assert yaml.safe_load((ddp_run / "config.yaml").read_text())["train"]["ema"] is True


def test_interrupted_run_resumes_to_identical_weights(ddp_run, tmp_path):
    """Stop after epoch 1, resume and stop again in the middle of epoch 2, resume to the end: the weights, EMA
    and optimizer state equal those of the uninterrupted run."""
    common = ["--set", f"output_dir={tmp_path}", "train.ema=true"]
    for stop_at, resume in ((2, []), (3, ["--resume", "auto"])):
        result = train(*common, f"debug.max_steps={stop_at}", *resume, nproc=2)
        assert result.returncode == 0, result.stderr[-3000:]
        stopped = load(tmp_path / "last.pt")
        assert stopped["global_step"] == stop_at  # 2 steps per epoch: after epoch 1, then in the middle of epoch 2
        assert (stopped["epoch"], stopped["step_in_epoch"]) == divmod(stop_at, 2)

    result = train(*common, "--resume", "auto", nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout
    resumed, uninterrupted = load(tmp_path / "last.pt"), load(ddp_run / "last.pt")
    assert_same_tensors(resumed["model"], uninterrupted["model"])
    assert_same_tensors(resumed["ema"], uninterrupted["ema"])
    for a, b in zip(resumed["optimizer"]["state"].values(), uninterrupted["optimizer"]["state"].values(), strict=True):
        assert_same_tensors(a, b)
    assert records(tmp_path, "epoch")[-1]["val_top1"] == records(ddp_run, "epoch")[-1]["val_top1"]


def write_image_folder(root: Path, per_class: dict[str, int]) -> None:
    for split, count in per_class.items():
        for c in range(3):
            (root / split / f"class{c}").mkdir(parents=True)
            for i in range(count):
                color = (80 * c, 255 - 40 * i, 128)
                Image.new("RGB", (24, 24), color).save(root / split / f"class{c}" / f"{i}.png")


def test_unreadable_image_is_skipped_and_counted(tmp_path):
    data = tmp_path / "data"
    write_image_folder(data, {"train": 5, "val": 2})  # 15 + 1 corrupt = one step of 8 x 2 micro-batches
    (data / "train" / "class1" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    (data / "val" / "class2" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    out = tmp_path / "run"
    result = train(
        "--set",
        f"output_dir={out}",
        f"data.root={data}",
        "data.workers=1",
        "schedule.epochs=1",
        "schedule.warmup_epochs=0",
        config=CONFIGS / "tiny_cpu_imagefolder.yaml",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "skipping unreadable image" in result.stderr and "broken.jpg" in result.stderr
    (epoch,) = records(out, "epoch")
    assert epoch["skipped_images"] == 1 and epoch["val_skipped_images"] == 1
    assert "skipped 1 unreadable training images" in result.stdout


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    result = train("--set", f"output_dir={tmp_path}", "data.kwargs.train_size=32", "debug.nan_at_step=3")
    assert result.returncode != 0  # 2 steps per epoch: step 3 is the first of epoch 2
    assert "non-finite loss (nan) at optimizer step 3 (epoch 2)" in result.stderr
    last = load(tmp_path / "last.pt")
    assert (last["epoch"], last["global_step"]) == (1, 2)  # written after epoch 1, not overwritten
    assert [e["epoch"] for e in records(tmp_path, "epoch")] == [1]


def test_unknown_config_key_is_an_error_naming_it(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'optimizer.lrr' \(did you mean 'optimizer.lr'\?\)"):
        load_config(CONFIGS / "tiny_cpu_synthetic.yaml", ["optimizer.lrr=1e-3"])
    with pytest.raises(ConfigError, match=r"'lr' \(did you mean 'optimizer.lr'\?\)"):
        load_config(CONFIGS / "tiny_cpu_synthetic.yaml", ["lr=1e-3"])
    with pytest.raises(ConfigError, match="'train.batch_size' expects an integer, got 'many'"):
        load_config(CONFIGS / "tiny_cpu_synthetic.yaml", ["train.batch_size=many"])
    child = tmp_path / "child.yaml"
    child.write_text(f"base: {os.path.relpath(CONFIGS / 'tiny_cpu_synthetic.yaml', tmp_path)}\nschedul: {{}}\n")
    with pytest.raises(ConfigError, match=r"'schedul' \(did you mean 'schedule'\?\)"):
        load_config(child)

    result = train("--set", "model.drop_pth_rate=0.1")
    assert result.returncode == 1
    assert "unknown config key 'model.drop_pth_rate' (did you mean 'model.drop_path_rate'?)" in result.stderr
    assert "Traceback" not in result.stderr


def test_config_inheritance_and_overrides(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text(
        f"base: {CONFIGS / 'tiny_cpu_synthetic.yaml'}\noptimizer: {{lr: 5e-4}}\nmodel: {{kwargs: {{depths: [2, 1]}}}}\n"
    )
    cfg = load_config(child, ["train.batch_size=4", "aug.auto_augment=null", "data.kwargs={}"])
    assert cfg.optimizer.lr == 5e-4 and cfg.optimizer.weight_decay == 0.05  # parsed; the rest inherited
    assert cfg.model.kwargs == {"window_size": 2, "pool_stride": 2, "depths": [2, 1]}
    assert cfg.train.batch_size == 4 and cfg.aug.auto_augment is None and cfg.data.kwargs == {}


def test_missing_data_path_fails_before_any_work(tmp_path):
    missing = tmp_path / "no-such-folder"
    result = train(
        "--set", f"output_dir={tmp_path / 'run'}", f"data.root={missing}", config=CONFIGS / "tiny_cpu_imagefolder.yaml"
    )
    assert result.returncode == 1
    assert str(missing) in result.stderr and "ROOT/train/<class>/<image>" in result.stderr
    assert not (tmp_path / "run").exists()


def test_resumable_sampler_shards_and_skips():
    a, b = ResumableSampler(10, 0, 2, seed=1), ResumableSampler(10, 1, 2, seed=1)
    a.set_epoch(3)
    b.set_epoch(3)
    first, second = list(a), list(b)
    assert len(first) == len(second) == 5
    assert not {i for i, _ in first} & {i for i, _ in second}
    a.set_epoch(3, skip=2)
    assert list(a) == first[2:] and len(a) == 3
    a.set_epoch(4)
    assert list(a) != first


def test_released_evaluation_protocol_config():
    cfg = load_config(CONFIGS / "table1_atlas_b16_1024_released_eval.yaml")
    assert (cfg.eval.every, cfg.eval.drop_last, cfg.paper_row) == (1, True, "Atlas-B")
    shard = 5000 // 8  # images per rank, then whole batches of 32 only
    assert 8 * (shard // cfg.train.batch_size) * cfg.train.batch_size == 4864


def test_paper_configs_build_and_match_the_paper():
    paper = yaml.safe_load((SCRIPTS / "data" / "paper_results.yaml").read_text())
    configs = sorted(p for p in CONFIGS.glob("table*.yaml"))
    assert {p.name.split("_")[0] for p in configs} == {"table1", "table2", "table3", "table4", "table5"}
    for path in configs:
        cfg = load_config(path)
        rows = {row["row"]: row for row in paper[cfg.paper_table]["rows"]}
        assert cfg.description and cfg.paper_row in rows, path.name
        assert cfg.paper_top1 == rows[cfg.paper_row]["top1"], path.name
        if cfg.model.name.startswith("fastervit/"):
            continue  # an optional package
        with torch.device("cpu" if "atlas" in cfg.model.name else "meta"):  # meta: no memory, no init work
            build_model(cfg)


def test_recipe_transforms_survive_posterize_to_zero_bits():
    """RandAugment 'inc1' at magnitude 10 posterizes to 0 bits, which recent Pillow rejects: a black image."""
    cfg = load_config(CONFIGS / "table1_atlas_b16_1024.yaml", ["model.img_size=32"])
    train_tf, val_tf = train_script.build_transforms(cfg)
    img = Image.new("RGB", (40, 24), (200, 100, 50))
    op = auto_augment.AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=10)
    assert op(img).getextrema() == ((0, 0), (0, 0), (0, 0))
    assert train_tf(img).shape == val_tf(img).shape == (3, 32, 32)


@pytest.mark.parametrize("top_down", ["true", "false"])
def test_ddp_trains_the_table4_variants_without_bottom_up(tmp_path, top_down):
    """Without bottom-up the last block of stage 1 used to hold weights no output reads: DDP then waited for their
    gradients and failed on the second iteration ("Expected to have finished reduction")."""
    out = tmp_path / "run"
    result = train(
        "--set",
        f"output_dir={out}",
        "model.kwargs.bottom_up=false",
        f"model.kwargs.top_down={top_down}",
        "schedule.epochs=1",
        "schedule.warmup_epochs=0",
        nproc=2,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (epoch,) = records(out, "epoch")
    assert epoch["step"] == 2


def test_non_finite_gradient_with_finite_loss_stops_before_the_update(tmp_path):
    """A NaN gradient at step 3 (loss finite): no update, and last.pt stays the finite step-2 state."""
    out = tmp_path / "run"
    result = train("--set", f"output_dir={out}", "checkpoint.every_steps=1", "debug.nan_grad_at_step=3")
    assert result.returncode != 0
    assert "non-finite gradient norm" in result.stderr and "optimizer step 3" in result.stderr
    last = load(out / "last.pt")
    assert last["global_step"] == 2
    assert all(t.isfinite().all() for t in last["model"].values() if t.is_floating_point())


def test_a_killed_save_leaves_no_temporary_file_behind(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".last.pt.tmp-4242").write_bytes(b"half of a checkpoint")
    result = train("--set", f"output_dir={out}", "schedule.epochs=1", "schedule.warmup_epochs=0")
    assert result.returncode == 0, result.stderr[-3000:]
    assert not list(out.glob(".*.tmp-*")) and "removed .last.pt.tmp-4242" in result.stdout


def test_metrics_csv_keeps_its_header_and_whole_epoch_loss_across_a_mid_epoch_resume(tmp_path):
    """Killed before the first epoch ended (an empty metrics.csv), resumed in the middle of epoch 1: the csv has
    its header, and epoch 1's train_loss averages all its steps, as in an uninterrupted run."""
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    common = ["schedule.epochs=1", "schedule.warmup_epochs=0"]
    assert train("--set", f"output_dir={whole}", *common).returncode == 0
    stopped = train("--set", f"output_dir={parts}", *common, "debug.max_steps=2")
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    (parts / "metrics.csv").write_text("")  # as a kill before the first epoch's end left it
    resumed = train("--set", f"output_dir={parts}", *common, "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    header = (parts / "metrics.csv").read_text().splitlines()[0]
    assert header.startswith("epoch,step,train_loss")
    assert records(parts, "epoch")[-1]["train_loss"] == pytest.approx(records(whole, "epoch")[-1]["train_loss"])


def test_sigterm_mid_epoch_saves_requeues_and_resumes_exactly(tmp_path):
    """A real SIGTERM during training: the step finishes, last.pt is written, the SLURM job is requeued (a fake
    scontrol records the call), the exit status is 75, and --resume auto ends with the uninterrupted weights."""
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert train("--set", f"output_dir={whole}").returncode == 0
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.log"}\n')
    (bin_dir / "scontrol").chmod(0o755)
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        OMP_NUM_THREADS="1",
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        SLURM_JOB_ID="4242",
    )
    cmd = [sys.executable, str(SCRIPTS / "train.py"), "--config", str(CONFIGS / "tiny_cpu_synthetic.yaml")]
    proc = subprocess.Popen([*cmd, "--set", f"output_dir={parts}"], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    jsonl = parts / "metrics.jsonl"
    deadline = time.time() + 120
    while not (jsonl.exists() and '"kind": "step"' in jsonl.read_text()) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-3000:]
    assert "SIGTERM: saved" in out and (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    stopped = load(parts / "last.pt")
    assert 0 < stopped["global_step"] < 12
    resumed = train("--set", f"output_dir={parts}", "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_tensors(load(parts / "last.pt")["model"], load(whole / "last.pt")["model"])
    assert records(parts, "epoch")[-1]["train_loss"] == pytest.approx(records(whole, "epoch")[-1]["train_loss"])


def test_bad_resume_inputs_are_one_line_errors(ddp_run, tmp_path):
    """Truncated and text files, a best.pt, and a checkpoint of another model: one 'error:' line each."""
    last = (ddp_run / "last.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(last[: len(last) // 2])
    (tmp_path / "text.pt").write_text("epoch 3\n")
    cases = {
        "truncated.pt": "not a checkpoint this code can read safely",
        "text.pt": "not a checkpoint this code can read safely",
        str(ddp_run / "best.pt"): "is a best.pt",
        str(ddp_run / "last.pt"): "does not fit this model",
    }
    for name, message in cases.items():
        path = tmp_path / name
        extra = ["data.num_classes=7"] if name.endswith("last.pt") else []
        result = train("--set", f"output_dir={tmp_path / 'run'}", *extra, "--resume", str(path))
        assert result.returncode == 1, name
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (name, lines)


def one_error_line(result) -> str:
    """The last stderr line, checked to be the only 'error:' line and free of a traceback."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr and lines and lines[-1].startswith("error: "), result.stderr[-3000:]
    assert sum(line.startswith("error: ") for line in lines) == 1, lines
    return lines[-1]


def test_a_folder_with_any_of_a_runs_files_is_never_started_over_silently(tmp_path):
    """best.pt, metrics.jsonl and config.yaml without last.pt: a plain run and --resume auto are refused, naming
    what was found, and leave the files as they are; --overwrite starts over."""
    out = tmp_path / "run"
    out.mkdir()
    old = {"best.pt": b"the best weights", "metrics.jsonl": b'{"kind": "epoch"}\n', "config.yaml": b"seed: 0\n"}
    for name, content in old.items():
        (out / name).write_bytes(content)
    found = r"already holds a run \(best.pt, metrics.jsonl, config.yaml\): --overwrite starts over"
    with pytest.raises(train_script.TrainingError, match=found):
        train_script.find_resume(None, out)
    with pytest.raises(train_script.TrainingError, match="--overwrite starts over, --resume continues"):
        train_script.find_resume("auto", out, overwrite=True)
    elsewhere = tmp_path / "other.pt"
    elsewhere.write_bytes(b"")
    with pytest.raises(train_script.TrainingError, match="already holds another run"):
        train_script.find_resume(str(elsewhere), out)
    assert train_script.find_resume(None, out, overwrite=True) is None

    result = train("--set", f"output_dir={out}", "--resume", "auto")
    assert result.returncode == 1
    line = one_error_line(result)
    assert "holds a run without last.pt (best.pt, metrics.jsonl, config.yaml)" in line and "--overwrite" in line
    assert {name: (out / name).read_bytes() for name in old} == old

    result = train("--set", f"output_dir={out}", "schedule.epochs=1", "schedule.warmup_epochs=0", "--overwrite")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--overwrite: deleted the earlier run's best.pt, metrics.jsonl, config.yaml" in result.stdout
    assert [r["epoch"] for r in records(out, "epoch")] == [1] and load(out / "best.pt")["epoch"] == 1


def test_resume_auto_restarts_a_run_stopped_before_its_first_checkpoint(tmp_path):
    """A requeued job killed in its first epoch left config.yaml and metrics.jsonl but no checkpoint: --resume auto
    starts it again and keeps the old records (a plain run there is still refused)."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("seed: 0\n")
    (out / "metrics.jsonl").write_text('{"kind": "run", "step": 0}\n')
    with pytest.raises(train_script.TrainingError, match="already holds a run"):
        train_script.find_resume(None, out)
    assert train_script.find_resume("auto", out) is None
    result = train("--set", f"output_dir={out}", "schedule.epochs=1", "schedule.warmup_epochs=0", "--resume", "auto")
    assert result.returncode == 0, result.stderr[-3000:]
    kinds = [json.loads(line)["kind"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert kinds[0] == "run" and kinds.count("run") == 2 and "final" in kinds  # the old record, then the new run


@pytest.mark.parametrize("where", ["file", "under a file", "read-only"])
def test_an_output_dir_that_cannot_be_a_folder_is_a_one_line_error(tmp_path, where):
    (tmp_path / "file").write_text("not a folder")
    out = {"file": tmp_path / "file", "under a file": tmp_path / "file" / "run", "read-only": Path("/proc/atlas-run")}
    message = {"file": "is a file", "under a file": f"is under {tmp_path / 'file'}, which is a file"}
    with pytest.raises(train_script.TrainingError, match=message.get(where, "cannot write to /proc")):
        train_script.check_output_dir(out[where])
    if where == "file":  # end to end: one line, before any work
        result = train("--set", f"output_dir={out[where]}")
        assert result.returncode == 1 and "is a file; set output_dir to a folder" in one_error_line(result)


def test_ctrl_c_saves_after_the_step_and_resumes(tmp_path):
    """SIGINT to the whole process group, as a terminal's Ctrl-C (DataLoader workers included): the step finishes,
    last.pt is written, the exit status is 130 without a traceback, and --resume auto continues."""
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(SCRIPTS / "train.py"), "--config", str(CONFIGS / "tiny_cpu_synthetic.yaml")]
    out = tmp_path / "run"
    proc = subprocess.Popen([*cmd, "--set", f"output_dir={out}", "data.workers=1"], cwd=ROOT, env=env, text=True,
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    jsonl, deadline = out / "metrics.jsonl", time.time() + 120
    while not (jsonl.exists() and '"kind": "step"' in jsonl.read_text()) and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr[-3000:]
    assert "Ctrl-C: saving after this step" in stderr and "SIGINT: saved" in stdout and "exit status 130" in stdout
    assert 0 < load(out / "last.pt")["global_step"] < 12
    resumed = train("--set", f"output_dir={out}", "--resume", "auto")
    assert resumed.returncode == 0 and load(out / "last.pt")["global_step"] == 12, resumed.stderr[-3000:]


def test_a_second_ctrl_c_stops_at_once():
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    try:
        preemption = train_script.Preemption()
        assert signal.getsignal(signal.SIGINT) == preemption._received
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # the handler runs in this thread, between two bytecodes
        assert preemption.signal == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@pytest.mark.parametrize("case", ["exact", "fast", "exact, 2 processes"])
def test_a_batch_of_unreadable_images_is_skipped_and_counted(tmp_path, case):
    """Batches of one image: the unreadable one is a whole batch, skipped and counted, in training and validation;
    `fast` also takes a 1x1 image. With two processes the rank without images stays in step."""
    data = tmp_path / "data"
    write_image_folder(data, {"train": 5, "val": 2})
    (data / "train" / "class1" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    (data / "val" / "class2" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    if case == "fast":
        Image.new("RGB", (1, 1), (9, 9, 9)).save(data / "train" / "class0" / "tiny.png")
        Image.new("RGB", (1, 1), (9, 9, 9)).save(data / "val" / "class0" / "tiny.png")
    out = tmp_path / "run"
    result = train(
        "--set",
        f"output_dir={out}",
        f"data.root={data}",
        f"data.pipeline={case.split(',')[0]}",
        "train.batch_size=1",
        "eval.batch_size=1",
        "aug.mixup=0",
        "aug.cutmix=0",
        "schedule.epochs=1",
        "schedule.warmup_epochs=0",
        nproc=2 if "2 processes" in case else 1,
        config=CONFIGS / "tiny_cpu_imagefolder.yaml",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (epoch,) = records(out, "epoch")
    assert epoch["skipped_images"] == 1 and epoch["val_skipped_images"] == 1
    assert epoch["val_images"] == 6 + (case == "fast") and math.isfinite(epoch["train_loss"])


def test_an_epoch_of_unreadable_images_is_a_one_line_error(tmp_path):
    data = tmp_path / "data"
    write_image_folder(data, {"val": 1})
    for c in range(3):
        (data / "train" / f"class{c}").mkdir(parents=True)
        for i in range(6):
            (data / "train" / f"class{c}" / f"{i}.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    result = train(
        "--set", f"output_dir={tmp_path / 'run'}", f"data.root={data}", "schedule.epochs=1",
        "schedule.warmup_epochs=0", config=CONFIGS / "tiny_cpu_imagefolder.yaml",
    )  # fmt: skip
    assert result.returncode == 1
    assert "every training image of epoch 1 was unreadable (16 skipped)" in one_error_line(result)  # 1 step of 16


def test_a_changed_optimizer_setting_on_resume_is_refused(tmp_path):
    """The optimizer and scheduler state carry lr (and betas, weight decay, ...): a new value would be logged and
    written to config.yaml but not used. It is refused, naming the key and both values."""
    out = tmp_path / "run"
    assert train("--set", f"output_dir={out}", "debug.max_steps=1").returncode == 0
    config = (out / "config.yaml").read_text()
    result = train("--set", f"output_dir={out}", "optimizer.lr=0.1", "--resume", "auto")
    assert result.returncode == 1
    assert "was trained with optimizer.lr=0.001, this run sets 0.1" in one_error_line(result)
    assert (out / "config.yaml").read_text() == config


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.ema_decay=2", r"'train.ema_decay' must be in \[0, 1\); got 2"),
        ("aug.label_smoothing=1.5", r"'aug.label_smoothing' must be in \[0, 1\)"),
        ("aug.hflip=2", r"'aug.hflip' must be in \[0, 1\]"),
        ("aug.scale=[1.0, 0.08]", r"'aug.scale' must be \[min, max\] with 0 < min <= max <= 1"),
        ("aug.auto_augment=rand-m9-mstd0.5-incl", "invalid part 'incl'; rand takes m<int>, .*inc<0|1>"),
        ("aug.auto_augment=randaugment-m9", "starts with 'randaugment'"),
        ("optimizer.lr=-1", r"'optimizer.lr' must be in \(0, inf\); got -1"),
        ("optimizer.name=adamww", r"'optimizer.name' is 'adamww', not a timm optimizer \(did you mean 'adamw'\?\)"),
        ("optimizer.betas=[0.9]", "'optimizer.betas' expects two numbers"),
        ("data.workers=-1", r"'data.workers' must be in \[0, inf\)"),
        ("aug.interpolation=bicubc", r"'aug.interpolation' must be one of .*got 'bicubc' \(did you mean 'bicubic'\?\)"),
    ],
)
def test_nonsense_settings_are_config_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIGS / "tiny_cpu_synthetic.yaml", [override])


def test_invalid_yaml_is_a_one_line_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  name: atlas_tiny_patch16\n   img_size: 64\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:3:\d+: not valid YAML \(.*\)"):
        load_config(bad)
    result = train(config=bad)
    assert result.returncode == 1 and "not valid YAML" in one_error_line(result)


def test_evaluate_counts_non_finite_logits_as_misses():
    class Broken(torch.nn.Module):
        def forward(self, x):
            logits = torch.nn.functional.one_hot(torch.zeros(len(x), dtype=torch.long), 4).float()
            logits[1:] = float("nan")  # image 0 predicted right, the others not finite
            return logits

    batches = [(torch.zeros(3, 1), torch.zeros(3, dtype=torch.long), 0)]
    metrics = train_script.evaluate(Broken(), batches, torch.device("cpu"), nullcontext, False)
    assert metrics["nonfinite"] == 2 and metrics["top1"] == pytest.approx(100 / 3)


def test_ema_selects_the_model_only_once_warmed_up_and_best_pt_says_which_weights(tmp_path):
    """12 updates at decay 0.9998 leave the EMA mostly the first step's weights: model selection and the done line
    use the live weights. At decay 0.5 (horizon 2) the EMA selects, and best.pt holds the EMA's weights."""
    slow, fast = tmp_path / "slow", tmp_path / "fast"
    result = train("--set", f"output_dir={slow}", "train.ema=true")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "warming up: 4 of 5000 updates; best.pt takes the live weights" in result.stdout
    assert "(live weights, in best.pt)" in result.stdout.splitlines()[-1]
    best = load(slow / "best.pt")
    assert best["weights"] == "live" and best["top1"] == max(e["val_top1"] for e in records(slow, "epoch"))
    assert records(slow, "final")[0]["best_weights"] == "live"

    result = train("--set", f"output_dir={fast}", "train.ema=true", "train.ema_decay=0.5", "schedule.epochs=1")
    assert result.returncode == 0, result.stderr[-3000:]
    best = load(fast / "best.pt")
    (epoch,) = records(fast, "epoch")
    assert best["weights"] == "ema" and best["top1"] == epoch["ema_top1"] and epoch["selected_weights"] == "ema"
    assert_same_tensors(best["model"], {k.removeprefix("module."): v for k, v in best["ema"].items()})
    assert "(EMA weights, in best.pt)" in result.stdout.splitlines()[-1]


def test_compile_auto_compiles_atlas_block_by_block_on_gpus_only():
    atlas_model = build_model(load_config(CONFIGS / "tiny_cpu_synthetic.yaml"))
    other = torch.nn.Linear(2, 2)
    assert compile_mode("auto", atlas_model, torch.device("cuda")) == "regional"
    assert compile_mode("auto", atlas_model, torch.device("cpu")) == "none"
    assert compile_mode("auto", other, torch.device("cuda")) == "none"
    assert compile_mode("full", other, torch.device("cpu")) == "full"
    for old, new in ((True, "full"), (False, "none")):  # the older boolean spelling
        assert (
            load_config(CONFIGS / "tiny_cpu_synthetic.yaml", [f"train.compile={str(old).lower()}"]).train.compile == new
        )
    with pytest.raises(ConfigError, match="train.compile' must be one of auto, none, regional, full"):
        load_config(CONFIGS / "tiny_cpu_synthetic.yaml", ["train.compile=regionl"])
