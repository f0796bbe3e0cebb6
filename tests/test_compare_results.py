"""scripts/compare_results.py: runs' metrics next to the paper's tables."""

import json
import sys
from pathlib import Path

import pytest
import yaml

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))

import compare_results  # noqa: E402


def write_run(folder: Path, paper_table, paper_row, epochs: list[tuple[int, float | None, float]]) -> Path:
    """A metrics.jsonl as scripts/train.py writes it: a run record, then (epoch, val top-1, elapsed h) records."""
    folder.mkdir(parents=True)
    lines = [
        {
            "kind": "run",
            "paper_table": paper_table,
            "paper_row": paper_row,
            "epochs": 320,
            "world_size": 8,
            "device": "cuda:0",
            "step": 0,
        },
    ]
    for epoch, top1, hours in epochs:
        record = {"kind": "epoch", "epoch": epoch, "step": 10 * epoch, "elapsed_h": hours}
        if top1 is not None:
            record.update(val_top1=top1, val_top5=min(100.0, top1 + 5))
        lines.append(record)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return folder


def test_runs_are_printed_next_to_their_paper_rows(tmp_path, capsys):
    epochs = [(1, 40.0, 0.1), (2, None, 0.2), (3, 91.5, 0.3), (4, 90.0, 0.4)]  # epoch 2 not evaluated
    atlas = write_run(tmp_path / "atlas", 1, "Atlas-B", epochs)
    # a resumed run repeats epoch 2; the later record wins
    swin = write_run(tmp_path / "swin", 1, "Swin-B", [(1, 10.0, 1.0), (2, 20.0, 2.0), (2, 30.0, 2.5)])
    other = write_run(tmp_path / "other", None, None, [(1, 55.0, 0.01)])
    assert compare_results.main([str(atlas), str(swin / "metrics.jsonl"), str(other)]) == 0
    out = capsys.readouterr().out

    assert "## Table 1: 1024px, Base models, 320 epochs" in out and "Table 2" not in out
    assert f"| Atlas-B | 91.04 | 91.50 | 90.00 | +0.46 | 23.12 | 0.40 | 4/320 | 8x cuda | {atlas} |" in out
    assert f"| Swin-B | 90.89 | 30.00 | 30.00 | -60.89 | 37.25 | 2.50 | 2/320 | 8x cuda | {swin} |" in out
    assert "| ConvNext-B | 91.92 | | | | 100.11 | | | | |" in out  # paper rows without a run stay listed
    assert f"| {other} | 55.00 | 55.00 | 0.01 | 1/320 | 8x cuda |" in out


def test_minute_tables_and_unknown_rows(tmp_path, capsys):
    run = write_run(tmp_path / "t4", 4, "multi-scale + top-down", [(100, 70.0, 1.5)])
    typo = write_run(tmp_path / "typo", 4, "multiscale + top-down", [(1, 1.0, 0.1)])
    compare_results.main([str(run), str(typo), "--all"])
    captured = capsys.readouterr()
    assert "| multi-scale + top-down | 69.04 | 70.00 | 70.00 | +0.96 | - | 90.00 | 100/320 |" in captured.out
    assert "## Table 6" in captured.out  # --all prints every table
    assert "'multiscale + top-down' is not a row of Table 4" in captured.err
    assert f"| {typo} |" in captured.out.split("## Runs without a paper row")[1]


def test_paper_numbers_are_those_of_the_paper():
    paper = yaml.safe_load((SCRIPTS / "data" / "paper_results.yaml").read_text())
    top1 = {(n, row["row"]): row["top1"] for n, table in paper.items() for row in table["rows"]}
    assert top1[(1, "Atlas-B")] == 91.04 and top1[(1, "ConvNext-B")] == 91.92
    assert top1[(2, "Atlas-S/16 @4096")] == 55.84 and top1[(3, "Multi-scale attention (Atlas)")] == 70.81
    assert top1[(4, "multi-scale + bottom-up + top-down (MSA)")] == 72.02 and top1[(5, "Atlas (2, 10)")] == 70.09
    assert top1[(6, "Atlas-B/16 @2048")] == 74.74 and top1[(6, "ViT-B/16 @2048")] is None
    assert [len(paper[n]["rows"]) for n in range(1, 7)] == [7, 6, 7, 5, 3, 28]


def test_the_evaluation_protocol_of_each_run_is_named(tmp_path, capsys):
    released = write_run(tmp_path / "released", 1, "Atlas-B", [(1, 50.0, 0.1)])
    lines = released.joinpath("metrics.jsonl").read_text().splitlines()
    run, epoch = json.loads(lines[0]), json.loads(lines[1])
    run.update(eval_every=1, eval_drop_last=True)
    epoch.update(val_images=4864)
    released.joinpath("metrics.jsonl").write_text(json.dumps(run) + "\n" + json.dumps(epoch) + "\n")
    old = write_run(tmp_path / "old", 1, "ViT-B", [(1, 50.0, 0.1)])
    compare_results.main([str(released), str(old)])
    out = capsys.readouterr().out
    assert f"* {released}: evaluated every 1 epoch(s) on 4864 validation images, per-rank drop_last" in out
    assert f"* {old}: evaluated protocol not recorded" in out


def test_params_lists_every_table_1_to_3_config_next_to_the_authors_count(capsys):
    assert compare_results.main(["--params"]) == 0
    out = capsys.readouterr().out
    configs = sorted(p.name for p in (SCRIPTS / "configs").glob("table[123]_*.yaml"))
    assert [line.split(" | ")[0].lstrip("| ") for line in out.splitlines() if ".yaml" in line] == configs
    mamba = "mambavision_base | own implementation (scripts/baselines/mamba.py)"
    assert f"| table1_mambavision_b_1024.yaml | 1, MambaVision-B | {mamba} | 96.76 | 97.69 | 97.7 |" in out
    assert "| table1_vit_b16_1024.yaml | 1, ViT-B | vit_base_patch16_224 | timm | 88.87 | 86.57 | 86.0 |" in out
    assert "| table3_longvit_dilated.yaml | 3, Dilated attention (LongViT) | longvit_base_patch16 |" in out


def test_runs_or_params_are_needed(capsys):
    with pytest.raises(SystemExit):
        compare_results.main([])
    assert "give run folders" in capsys.readouterr().err
