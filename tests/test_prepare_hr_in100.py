"""scripts/prepare_hr_in100.py on small fake ImageNet trees."""

import json
import os
import sys
from pathlib import Path

import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import prepare_hr_in100  # noqa: E402

WNIDS = ["n01000001", "n01000002", "n01000003", "n01000004"]


def jpeg(path: Path, shade: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 12), (shade, 100, 200)).save(path, "JPEG")


@pytest.fixture
def classes(tmp_path) -> Path:
    path = tmp_path / "classes.txt"
    path.write_text("\n".join(WNIDS[:3]) + "\n")  # the subset: 3 of the 4 fake ImageNet classes
    return path


def fake_imagenet(root: Path, flat_val: bool, missing: str | None = None) -> None:
    """3 train images per class (a class left out if `missing`), 2 val images per class."""
    n = 0
    for wnid in WNIDS:
        if wnid == missing:
            continue
        for i in range(3):
            jpeg(root / "train" / wnid / f"{wnid}_{i}.JPEG", i)
        for _ in range(2):
            n += 1
            name = f"ILSVRC2012_val_{n:08d}.JPEG"
            jpeg(root / "val" / name if flat_val else root / "val" / wnid / name)
            if flat_val:
                with open(root / "LOC_val_solution.csv", "a") as f:
                    f.write("ImageId,PredictionString\n" if n == 1 else "")
                    f.write(f"{Path(name).stem},{wnid} 1 2 3 4\n")


def run(tmp_path, classes, *extra) -> tuple[int, dict]:
    out = tmp_path / "out"
    args = ["--imagenet", str(tmp_path / "in1k"), "--out", str(out), "--classes", str(classes), "--workers", "1"]
    status = prepare_hr_in100.main([*args, *extra])
    return status, json.loads((out / "report.json").read_text())


def test_flat_val_with_corrupt_file_and_missing_class(tmp_path, classes, capsys):
    root = tmp_path / "in1k"
    fake_imagenet(root, flat_val=True, missing=WNIDS[1])
    (root / "train" / WNIDS[0] / "broken.JPEG").write_bytes(b"\xff\xd8\xff\xe0 garbage")
    status, report = run(tmp_path, classes, "--no-check-counts")
    err = capsys.readouterr().err

    assert status == 1
    assert report["missing_classes"] == {"train": [WNIDS[1]], "val": [WNIDS[1]]}
    assert f"1 classes have no train images: {WNIDS[1]}" in err
    assert [Path(u["file"]).name for u in report["unreadable"]] == ["broken.JPEG"]
    assert "unreadable image left out" in err and "broken.JPEG" in err
    assert report["counts"] == {"train": 6, "val": 4}

    out = tmp_path / "out"
    links = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.JPEG"))
    assert len(links) == 10 and "val/n01000003/ILSVRC2012_val_00000004.JPEG" in links
    assert not (out / "train" / WNIDS[0] / "broken.JPEG").exists()
    link = out / "train" / WNIDS[0] / f"{WNIDS[0]}_0.JPEG"
    assert link.is_symlink() and Path(os.readlink(link)) == (root / "train" / WNIDS[0] / link.name).resolve()
    assert not (out / "train" / WNIDS[3]).exists()  # not in the class list


def test_per_class_val_and_count_check(tmp_path, classes, capsys):
    fake_imagenet(tmp_path / "in1k", flat_val=False)
    status, report = run(tmp_path, classes, "--no-check-counts")
    assert status == 0 and report["ok"] and report["counts"] == {"train": 9, "val": 6}

    status, _ = run(tmp_path, classes)  # again, over the existing links, with the real counts expected
    assert status == 1
    assert "9 train images, expected about 126689" in capsys.readouterr().err
    status, _ = run(tmp_path, classes, "--expect-counts", "9", "6")
    assert status == 0


def test_text_labels_and_clear_input_errors(tmp_path, classes):
    root = tmp_path / "in1k"
    fake_imagenet(root, flat_val=True)
    labels = tmp_path / "val.txt"
    rows = [line.split(",") for line in (root / "LOC_val_solution.csv").read_text().splitlines()[1:]]
    labels.write_text("".join(f"{stem}.JPEG {pred.split()[0]}\n" for stem, pred in rows))
    (root / "LOC_val_solution.csv").unlink()
    with pytest.raises(SystemExit, match="flat .* pass --val-labels"):
        run(tmp_path, classes, "--no-check-counts")
    status, report = run(tmp_path, classes, "--no-check-counts", "--val-labels", str(labels))
    assert status == 0 and report["counts"]["val"] == 6

    with pytest.raises(SystemExit, match="train does not exist"):
        prepare_hr_in100.main(["--imagenet", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")])


def test_shipped_class_list_has_100_classes():
    wnids = prepare_hr_in100.read_classes(prepare_hr_in100.CLASSES)
    assert len(wnids) == 100 and all(w.startswith("n") and len(w) == 9 for w in wnids)


def originals(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.JPEG"))}


@pytest.mark.parametrize(
    "out", [".", "train", "elsewhere/../val/n01000001"], ids=["same", "inside", "inside, unresolved"]
)
def test_an_output_inside_the_source_is_refused_and_nothing_is_deleted(tmp_path, classes, out):
    root = tmp_path / "in1k"
    fake_imagenet(root, flat_val=False)
    before = originals(root)
    args = ["--imagenet", str(root), "--out", str(root / out), "--classes", str(classes), "--no-check-counts"]
    with pytest.raises(SystemExit, match="error: --out .* is inside --imagenet"):
        prepare_hr_in100.main(args)
    assert originals(root) == before and not any(p.is_symlink() for p in root.rglob("*"))


def test_regular_files_at_the_destination_are_kept_and_reported(tmp_path, classes, capsys):
    fake_imagenet(tmp_path / "in1k", flat_val=False)
    mine = tmp_path / "out" / "train" / WNIDS[0] / f"{WNIDS[0]}_1.JPEG"
    mine.parent.mkdir(parents=True)
    mine.write_bytes(b"my own file")
    status, report = run(tmp_path, classes, "--no-check-counts")
    assert status == 1 and not report["ok"]
    assert not mine.is_symlink() and mine.read_bytes() == b"my own file"
    assert report["not_replaced"] == [str(mine)] and report["counts"]["train"] == 8
    err = capsys.readouterr().err
    assert f"error: {mine} is not a link; left as it is" in err


def test_a_rerun_with_fewer_classes_removes_the_stale_links_and_keeps_other_files(tmp_path, classes, capsys):
    fake_imagenet(tmp_path / "in1k", flat_val=False)
    assert run(tmp_path, classes, "--no-check-counts")[0] == 0
    out = tmp_path / "out"
    notes = out / "val" / WNIDS[2] / "notes.txt"
    notes.write_text("kept")
    fewer = tmp_path / "fewer.txt"
    fewer.write_text("\n".join(WNIDS[:2]) + "\n")
    capsys.readouterr()
    status, report = run(tmp_path, fewer, "--no-check-counts")
    captured = capsys.readouterr()
    assert report["counts"] == {"train": 6, "val": 4} and report["stale_links_removed"] == 5
    assert "removed 5 stale links" in captured.out
    assert not (out / "train" / WNIDS[2]).exists()  # its links removed, then the empty folder
    assert notes.read_text() == "kept" and status == 1
    assert f"{out / 'val' / WNIDS[2]} is not a class of {fewer}" in captured.err
    assert all(p.resolve().is_file() for p in (tmp_path / "in1k").rglob("*.JPEG"))


def test_input_and_output_mistakes_are_one_line_errors(tmp_path, classes):
    root = tmp_path / "in1k"
    fake_imagenet(root, flat_val=True)
    base = ["--imagenet", str(root), "--no-check-counts", "--workers", "1"]
    out = ["--out", str(tmp_path / "out")]
    (tmp_path / "file").write_text("not a folder")
    unknown = tmp_path / "unknown.txt"
    unknown.write_text("n09999998\nn09999999\n")
    cases = {
        "class list": ([*base, *out, "--classes", str(tmp_path / "none.txt")], "class list .*none.txt not found"),
        "labels": (
            [*base, *out, "--classes", str(classes), "--val-labels", str(tmp_path / "no.csv")],
            "labels file .*no.csv not found",
        ),
        "out is a file": (
            [*base, "--out", str(tmp_path / "file"), "--classes", str(classes)],
            "--out .*file: .*file is a file",
        ),
        "out under a file": (
            [*base, "--out", str(tmp_path / "file" / "o"), "--classes", str(classes)],
            "--out .*o: .*file is a file",
        ),
        "unknown ids": (
            [*base, *out, "--classes", str(unknown)],
            r"none of the 2 classes of .*unknown.txt is a folder of .*train \(e.g. n09999998\)",
        ),
    }
    for name, (args, message) in cases.items():
        with pytest.raises(SystemExit, match="error: " + message) as e:
            prepare_hr_in100.main(args)
        assert "\n" not in str(e.value), name
