"""scripts/gpu_check.py in its CPU smoke mode: every section runs and reports, and the exit status is 0."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("a cuda-tests", "b train-resume", "c largest-image", "d throughput", "e breakdown", "f input-pipeline")


def test_cpu_smoke_run_reports_every_section(tmp_path):
    cmd = [sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--device", "cpu", "--smoke", "--out", str(tmp_path)]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # the CPU plan, also on a machine with a GPU
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]

    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert {row["section"] for row in rows} == set(SECTIONS)
    assert {row["result"] for row in rows} <= {"ok", "skip", "oom"}
    table = result.stdout[result.stdout.rindex("\nsection ") :].splitlines()  # printed last
    for row in rows:
        printed = [line for line in table if line.startswith(row["section"]) and row["item"] in line]
        assert printed and f"  {row['result']}  " in printed[0], (row, table)
    by_item = {row["item"]: row for row in rows}
    assert by_item["pytest -m cuda tests/test_cuda.py"]["values"]["passed"] == 0  # no GPU: every test skipped
    resumed = by_item["second run, --resume auto to the end"]
    assert resumed["result"] == "ok" and resumed["figures"].startswith("gloo + DDP")  # torchrun, one process
    assert (tmp_path / "results.csv").read_text().startswith("section,item,result,seconds,figures")


def test_a_kill_reaches_workers_in_sessions_of_their_own(tmp_path):
    """As torchrun starts its workers: the SIGKILL that simulates a lost node must end them too."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import gpu_check

    pid_file = tmp_path / "worker.pid"
    worker = (
        "import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], "
    )
    worker += f"start_new_session=True); open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(60)"
    proc = gpu_check.start([sys.executable, "-c", worker], tmp_path / "log", dict(os.environ))
    deadline = time.monotonic() + 30
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    grandchild = int(pid_file.read_text())
    assert gpu_check.kill(proc) == -9
    deadline = time.monotonic() + 10
    while Path(f"/proc/{grandchild}").exists() and "Z" not in Path(f"/proc/{grandchild}/stat").read_text().split()[2]:
        assert time.monotonic() < deadline, "the worker outlived the kill"
        time.sleep(0.05)
