"""scripts/gpu_check.py in its CPU smoke mode: every section runs and reports, and the exit status is 0."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("a cuda-tests", "b train-resume", "c throughput", "d largest-image")


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
    assert by_item["second run, --resume auto to the end"]["result"] == "ok"
    assert (tmp_path / "results.csv").read_text().startswith("section,item,result,seconds,figures")
