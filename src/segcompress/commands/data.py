"""``segcompress data``: generate a synthetic dataset or verify a real one, then write its manifest.

The manifest (``ROOT/manifest.json``: layout, image counts per split, every file with its size
and sha256, and one content digest) is the stage's output; evaluation checks each image and
label against its sha256 as it reads it. It is removed first and written last, atomically, so a
crash never leaves a manifest beside a half-written or unverified dataset.
"""

from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path

from segcompress import __version__
from segcompress.progress import add_progress_argument, shows_bar

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SYNTHETIC_MARKER = ".segcompress-synthetic"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layout", required=True, choices=["ade20k", "cityscapes"], help="on-disk dataset layout")
    parser.add_argument("--root", required=True, type=Path,
                        help="dataset root (the ADEChallengeData2016 folder, or the Cityscapes root)")
    syn = parser.add_argument_group("synthetic scenes")
    syn.add_argument("--synthetic", action="store_true", help="generate seeded synthetic scenes into ROOT")
    syn.add_argument("--num-train", type=int, default=64, help="training images (default: 64)")
    syn.add_argument("--num-val", type=int, default=16, help="validation images (default: 16)")
    syn.add_argument("--seed", type=int, default=0, help="scene seed (default: 0)")
    parser.add_argument("--prepare", action="store_true",
                        help="Cityscapes: write missing *_gtFine_labelTrainIds.png from *_gtFine_labelIds.png")
    parser.add_argument("--overwrite", action="store_true", help="with --prepare: rewrite existing trainIds files")
    parser.add_argument("--no-decode", action="store_true",
                        help="only hash the files; skip decoding images and checking label ranges (faster)")
    add_progress_argument(parser)


def _clear_synthetic(root: Path, layout: str) -> None:
    """Remove a previous synthetic dataset's folders; refuse to touch data segcompress did not write."""
    from segcompress.data.synthetic import LAYOUT_FOLDERS

    folders = [root / f for f in LAYOUT_FOLDERS[layout]]
    if any(f.exists() for f in folders) and not (root / SYNTHETIC_MARKER).is_file():
        raise ValueError(
            f"{root}: already holds a dataset that segcompress did not generate; refusing to overwrite it "
            "with synthetic scenes (choose an empty --root)"
        )
    for f in folders:
        if f.exists():
            shutil.rmtree(f)


def build_manifest(layout: str, root: Path, decode: bool = True, progress: str | bool = "auto",
                   synthetic: dict | None = None) -> dict:
    """Check the dataset (layout, and with ``decode`` every file's content) and describe it."""
    from segcompress.progress import track

    from segcompress.data.datasets import check_layout, check_sample, dataset_digest, split_folder
    from segcompress.data.layouts import get_layout

    samples = check_layout(layout, root)
    todo = [s for split in samples.values() for s in split]
    records = []
    for sample in track(todo, len(todo), f"check {layout}", "img", progress):
        records.extend(check_sample(layout, root, sample, decode=decode))
    return {
        "layout": layout,
        "num_classes": get_layout(layout).num_classes,
        "counts": {split: len(s) for split, s in samples.items()},
        "split_folders": {split: split_folder(layout, split) for split in samples},
        "synthetic": synthetic,
        "checked": "decoded" if decode else "hashed",
        "segcompress": __version__,
        "digest": dataset_digest(records),
        "files": [{"path": r.path, "bytes": r.bytes, "sha256": r.sha256}
                  for r in sorted(records, key=lambda r: r.path)],
    }


def main(args: argparse.Namespace) -> int:
    from segcompress.io import write_json

    root: Path = args.root
    progress = args.progress
    manifest_path = root / MANIFEST
    manifest_path.unlink(missing_ok=True)  # never trust an old manifest while the data may change
    synthetic = None
    if args.synthetic:
        from segcompress.data.synthetic import generate

        if args.seed < 0:
            raise ValueError(f"--seed must be >= 0, got {args.seed}")
        if args.num_train < 1 or args.num_val < 1:
            raise ValueError(f"--num-train and --num-val must be >= 1, got {args.num_train} and {args.num_val}")
        root.mkdir(parents=True, exist_ok=True)
        _clear_synthetic(root, args.layout)
        (root / SYNTHETIC_MARKER).write_text("written by segcompress data --synthetic; safe to regenerate\n")
        synthetic = {"seed": args.seed, "num_train": args.num_train, "num_val": args.num_val}
        generate(args.layout, root, args.num_train, args.num_val, args.seed, progress=shows_bar(progress))
        log.info("generated %d train + %d val synthetic %s images in %s",
                 args.num_train, args.num_val, args.layout, root)
    if args.prepare:
        if args.layout == "cityscapes":
            from segcompress.data.cityscapes import prepare_cityscapes

            n = prepare_cityscapes(root, overwrite=args.overwrite, progress=progress)
            log.info("wrote %d *_gtFine_labelTrainIds.png file(s)", n)
        else:
            log.info("--prepare: nothing to do for %s", args.layout)
    manifest = build_manifest(args.layout, root, decode=not args.no_decode, progress=progress, synthetic=synthetic)
    write_json(manifest_path, manifest)
    log.info("%s: %s, %s", manifest_path, manifest["counts"], manifest["digest"])
    return 0
