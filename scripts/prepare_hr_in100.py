"""Build HR-IN100 from an ImageNet-1k folder: the 100 classes of ImageNet-100 (CMC subset), as symlinks.

    python scripts/prepare_hr_in100.py --imagenet /data/imagenet --out data/hr-in100

Input: IMAGENET/train/<wnid>/*.JPEG, and IMAGENET/val/ either per class (val/<wnid>/*.JPEG) or flat
(val/*.JPEG) with a labels file: Kaggle's LOC_val_solution.csv (ImageId,PredictionString) or a text file of
'filename wnid' lines (--val-labels; LOC_val_solution.csv next to train/ is found without it).
Output: OUT/train/<wnid>/<file> and OUT/val/<wnid>/<file> symlinks to the originals, plus OUT/report.json.
Images stay at their size: the training transforms upsample them to the training resolution.

Nothing but links is ever removed: OUT may not lie inside IMAGENET, a file at a link's place is left as it is
(and reported), and a rerun removes the links of an earlier run that this one no longer writes (fewer classes,
images now unreadable); other files left in OUT's class folders are reported.

Every image is checked with PIL (--no-verify skips it); unreadable ones are reported and left out. Missing
classes, or counts far from the expected 126,689 train / 5,000 val images, make the exit status 1.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
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
    if not path.is_file():
        raise SystemExit(f"error: class list {path} not found; expected one wnid per line (--classes)")
    wnids = [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    if len(set(wnids)) != len(wnids):
        raise SystemExit(f"error: {path} lists a class twice")
    return wnids


def images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in EXTENSIONS and p.is_file())


def read_val_labels(path: Path) -> dict[str, str]:
    """Image file stem -> wnid, from LOC_val_solution.csv or 'filename wnid' lines."""
    if not path.is_file():
        raise SystemExit(f"error: labels file {path} not found (--val-labels)")
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
    # Per class if any folder is named like a wnid (a listed class without its folder is then missing), else flat.
    if any(p.is_dir() and re.fullmatch(r"n\d{8}", p.name) for p in val.iterdir()):
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


def link(src: Path, dst: Path) -> bool:
    """Make ``dst`` a symlink to ``src``, replacing only a symlink; False (nothing done) if something else is there."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.is_symlink():
        if os.readlink(dst) == str(src):
            return True
        dst.unlink()
    elif dst.exists():
        return False
    dst.symlink_to(src)
    return True


def check_output(out: Path, imagenet: Path) -> Path:
    """The resolved output folder, created; SystemExit if it is a file or lies inside the source tree."""
    resolved = out.resolve()
    sources = {imagenet, *((imagenet / split).resolve() for split in ("train", "val"))}
    for source in sources:
        if resolved == source or source in resolved.parents:
            raise SystemExit(
                f"error: --out {out} is inside --imagenet {source}: linking there would replace the originals; "
                "choose a folder outside it"
            )
    blocker = next((p for p in (resolved, *resolved.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise SystemExit(f"error: --out {out}: {blocker} is a file, not a folder")
    try:
        resolved.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"error: cannot create --out {out}: {e.strerror}") from None
    if not os.access(resolved, os.W_OK | os.X_OK):
        raise SystemExit(f"error: --out {out} is not writable")
    return resolved


def remove_stale_links(split_dir: Path, written: set[Path], wnids: list[str], classes: Path) -> tuple[int, list[str]]:
    """Remove the symlinks under ``split_dir`` that this run did not write, then the class folders left empty.

    Returns (links removed, problems): class folders outside the class list that still hold other files.
    """
    removed, problems = 0, []
    if not split_dir.is_dir():
        return removed, problems
    for folder, dirs, files in os.walk(split_dir):  # does not enter linked folders
        for name in files + dirs:
            path = Path(folder) / name
            if path.is_symlink() and path not in written:
                path.unlink()
                removed += 1
    for folder in sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.is_symlink()):
        if folder.name in wnids:
            continue
        if any(folder.iterdir()):
            problems.append(f"{folder} is not a class of {classes} but holds files that are not links; left as it is")
        else:
            folder.rmdir()
    return removed, problems


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    imagenet = args.imagenet.resolve()
    wnids = read_classes(args.classes)
    if not (imagenet / "train").is_dir():
        raise SystemExit(f"error: {imagenet / 'train'} does not exist; expected IMAGENET/train/<wnid>/*.JPEG")
    if not any((imagenet / "train" / wnid).is_dir() for wnid in wnids):
        raise SystemExit(
            f"error: none of the {len(wnids)} classes of {args.classes} is a folder of {imagenet / 'train'} "
            f"(e.g. {wnids[0] if wnids else 'none listed'}); pass a list of ImageNet wnids such as n01558993"
        )
    out = check_output(args.out, imagenet)

    splits = {
        "train": {wnid: images_in(imagenet / "train" / wnid) for wnid in wnids if (imagenet / "train" / wnid).is_dir()},
        "val": val_images(imagenet, wnids, args.val_labels),
    }
    report = {"classes": len(wnids), "missing_classes": {}, "unreadable": [], "counts": {}, "not_replaced": []}
    report["stale_links_removed"], stale_problems = 0, []
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
        count, written = 0, set()
        for wnid in wnids:
            for path in per_class.get(wnid, []):
                if path not in errors:
                    dst = out / split / wnid / path.name
                    if link(path, dst):
                        written.add(dst)
                        count += 1
                    else:
                        report["not_replaced"].append(str(args.out / split / wnid / path.name))
        removed, problems = remove_stale_links(out / split, written, wnids, args.classes)
        report["stale_links_removed"] += removed
        stale_problems += problems
        report["counts"][split] = count
        print(f"{split}: {count} images in {len(wnids) - len(missing)} classes -> {args.out / split}")

    status = 0
    if report["stale_links_removed"]:
        print(f"removed {report['stale_links_removed']} stale links (an earlier run's classes or images)")
    for path in report["not_replaced"]:
        print(f"error: {path} is not a link; left as it is (move it away to link the original there)", file=sys.stderr)
        status = 1
    for problem in stale_problems:
        print(f"error: {problem}", file=sys.stderr)
        status = 1
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
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print(f"report: {args.out / 'report.json'}")
    return status


if __name__ == "__main__":
    sys.exit(main())
