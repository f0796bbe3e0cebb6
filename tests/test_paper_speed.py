"""scripts/paper_speed.py in its CPU smoke mode: one Markdown table per paper table, each with a timed row and the
paper's relative runtime from scripts/data/paper_results.yaml, a CSV of every row, and exit status 0."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
ATLAS = {1: "Atlas-B", 2: "Atlas-S/16", 3: "Multi-scale attention (Atlas)", 6: "Atlas-B/16"}  # + " @<size>": 2, 6


def test_cpu_smoke_run_fills_a_table_per_paper_table(tmp_path):
    script = ROOT / "scripts" / "paper_speed.py"
    cmd = [sys.executable, str(script), "--device", "cpu", "--smoke", "--out", str(tmp_path)]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # the CPU plan, also on a machine with a GPU
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]

    markdown = (tmp_path / "results.md").read_text()
    assert markdown in result.stdout  # printed
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert {row["result"] for row in rows} <= {"ok", "skip"}
    paper = yaml.safe_load((ROOT / "scripts" / "data" / "paper_results.yaml").read_text())
    assert markdown.count("\n## Table ") == len(ATLAS)
    for table, atlas in ATLAS.items():
        section = markdown.split(f"\n## Table {table}: ")[1].split("\n## ")[0]
        assert "| time vs Atlas | paper: time vs Atlas |" in section
        in_table = [row for row in rows if row["table"] == str(table)]
        assert any(row["result"] == "ok" and float(row["images_per_s"]) > 0 for row in in_table), table
        runtimes = {row["row"]: row["runtime"] for row in paper[table]["rows"]}
        for row in in_table:
            size = row["row"].partition(" @")[2]
            expected = runtimes[row["row"]] / runtimes[f"{atlas} @{size}" if size else atlas]
            assert float(row["paper_time_vs_atlas"]) == pytest.approx(expected), row
            line = next(line for line in section.splitlines() if line.startswith(f"| {row['row']} |"))
            assert f"| {expected:.2f}x |" in line, line
            if row["result"] == "ok":
                assert float(row["time_vs_atlas"]) > 0 and float(row["tflop_per_image"]) > 0, row
            else:
                assert "not installed" in row["why"] or "time guard" in row["why"], row
