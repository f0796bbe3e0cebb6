"""Build HR-IN100 from an ImageNet-1k folder: the 100 classes of ImageNet-100 (CMC subset), as symlinks.

    python scripts/prepare_hr_in100.py --imagenet /data/imagenet --out data/hr-in100

Input: IMAGENET/train/<wnid>/*.JPEG, and IMAGENET/val/ either per class (val/<wnid>/*.JPEG) or flat
(val/*.JPEG) with a labels file: Kaggle's LOC_val_solution.csv (ImageId,PredictionString) or a text file of
'filename wnid' lines (--val-labels; LOC_val_solution.csv next to train/ is found without it).
Output: OUT/train/<wnid>/<file> and OUT/val/<wnid>/<file> symlinks to the originals, plus OUT/report.json.
Images stay at their size: the training transforms upsample them to the training resolution.

Every image is checked with PIL (--no-verify skips it); unreadable ones are reported and left out. Missing
classes, or counts far from the expected 126,689 train / 5,000 val images, make the exit status 1.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from PIL import Image

CLASSES = Path(__file__).resolve().parent / "data" / "in100_classes.txt"
EXPECTED = (126_689, 5_000)  # ImageNet-100 train / val images
TOLERANCE = 0.01  # a relative difference above this fails the count check
EXTENSIONS = {".jpeg", ".jpg", ".png"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--imagenet", type=Path, required=True, help="ImageNet-1k folder with train/ and val/")
    parser.add_argument("--out", type=Path, required=True, help="output folder for HR-IN100")
    parser.add_argument("--classes", type=Path, default=CLASSES, help="class list, one wnid per line")
    parser.add_argument("--val-labels", type=Path, help="labels of a flat val/ folder (csv or 'file wnid' txt)")
    parser.add_argument("--expect-counts", type=int, nargs=2, default=EXPECTED, metavar=("TRAIN", "VAL"))
    parser.add_argument("--no-check-counts", dest="check_counts", action="store_false", help="skip the count check")
    parser.add_argument("--no-verify", dest="verify", action="store_false", help="do not open every image")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="processes verifying images")
    return parser.parse_args(argv)


def read_classes(path: Path) -> list[str]:
    wnids = [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    if len(set(wnids)) != len(wnids):
        raise SystemExit(f"error: {path} lists a class twice")
    return wnids


def images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in EXTENSIONS and p.is_file())


def read_val_labels(path: Path) -> dict[str, str]:
    """Image file stem -> wnid, from LOC_val_solution.csv or 'filename wnid' lines."""
    if path.suffix.lower() == ".csv":
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        if not rows or not {"ImageId", "PredictionString"} <= rows[0].keys():
            raise SystemExit(f"error: {path}: expected the columns ImageId,PredictionString (LOC_val_solution.csv)")
        return {row["ImageId"]: row["PredictionString"].split()[0] for row in rows}
    labels = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or not parts[1].startswith("n"):
            raise SystemExit(
                f"error: {path}:{n}: expected 'filename wnid' (e.g. 'ILSVRC2012_val_00000001.JPEG n01751748'), "
                f"got {line!r}; integer class indices are not supported"
            )
        labels[Path(parts[0]).stem] = parts[1]
    return labels


def val_images(imagenet: Path, wnids: list[str], labels_path: Path | None) -> dict[str, list[Path]]:
    """Per class, the validation images of a per-class or flat val/ folder."""
    val = imagenet / "val"
    if not val.is_dir():
        raise SystemExit(f"error: {val} does not exist; expected IMAGENET/val/<wnid>/* or a flat IMAGENET/val/*")
    if any((val / wnid).is_dir() for wnid in wnids):
        return {wnid: images_in(val / wnid) if (val / wnid).is_dir() else [] for wnid in wnids}
    if labels_path is None:
        labels_path = imagenet / "LOC_val_solution.csv"
        if not labels_path.is_file():
            raise SystemExit(
                f"error: {val} is flat (no class folders) and no labels file was given: pass --val-labels with "
                "LOC_val_solution.csv or a 'filename wnid' text file"
            )
    labels = read_val_labels(labels_path)
    per_class = {wnid: [] for wnid in wnids}
    for path in images_in(val):
        wnid = labels.get(path.stem)
        if wnid in per_class:
            per_class[wnid].append(path)
    return per_class


def is_readable(path: Path) -> str | None:
    """None if PIL can parse the image, else the error."""
    try:
        with Image.open(path) as img:
            img.verify()
    except Exception as e:  # PIL raises many kinds of errors on broken files
        return f"{type(e).__name__}: {e}"
    return None


def link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.is_symlink() or dst.exists():
        if dst.is_symlink() and os.readlink(dst) == str(src):
            return
        dst.unlink()
    dst.symlink_to(src)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    imagenet = args.imagenet.resolve()
    wnids = read_classes(args.classes)
    if not (imagenet / "train").is_dir():
        raise SystemExit(f"error: {imagenet / 'train'} does not exist; expected IMAGENET/train/<wnid>/*.JPEG")

    splits = {
        "train": {wnid: images_in(imagenet / "train" / wnid) for wnid in wnids if (imagenet / "train" / wnid).is_dir()},
        "val": val_images(imagenet, wnids, args.val_labels),
    }
    report = {"classes": len(wnids), "missing_classes": {}, "unreadable": [], "counts": {}}
    for split, per_class in splits.items():
        missing = [wnid for wnid in wnids if not per_class.get(wnid)]
        if missing:
            report["missing_classes"][split] = missing
        files = [path for wnid in wnids for path in per_class.get(wnid, [])]
        errors = {}
        if args.verify and files:
            with ProcessPoolExecutor(max(1, args.workers)) as pool:
                errors = {p: e for p, e in zip(files, pool.map(is_readable, files, chunksize=256), strict=True) if e}
        report["unreadable"] += [{"file": str(p), "error": e} for p, e in errors.items()]
        count = 0
        for wnid in wnids:
            for path in per_class.get(wnid, []):
                if path not in errors:
                    link(path, args.out / split / wnid / path.name)
                    count += 1
        report["counts"][split] = count
        print(f"{split}: {count} images in {len(wnids) - len(missing)} classes -> {args.out / split}")

    status = 0
    for split, missing in report["missing_classes"].items():
        print(f"error: {len(missing)} classes have no {split} images: {', '.join(missing)}", file=sys.stderr)
        status = 1
    for item in report["unreadable"]:
        print(f"warning: unreadable image left out: {item['file']} ({item['error']})", file=sys.stderr)
    if args.check_counts:
        for split, expected in zip(("train", "val"), args.expect_counts, strict=True):
            count = report["counts"][split]
            if abs(count - expected) > TOLERANCE * expected:
                print(
                    f"error: {count} {split} images, expected about {expected}; pass --no-check-counts for a "
                    "partial tree, or --expect-counts TRAIN VAL",
                    file=sys.stderr,
                )
                status = 1
    report["ok"] = status == 0
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.json").write_text(json.dumps(report, indent=2))
    print(f"report: {args.out / 'report.json'}")
    return status


if __name__ == "__main__":
    sys.exit(main())
