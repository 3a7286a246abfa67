"""``segcompress corrupt``: one seeded corrupted copy of a dataset's val images (ADE20K-C / Cityscapes-C).

    segcompress corrupt --layout ade20k --root data/ade20k --out data/ade20k-c --dataset-name ade20k \\
        --corruption fog --severity 3 [--seed 0] [--processes N] [--max-images N] [--compress-level L]

writes one folder, ``data/ade20k-c/fog/3/``, and its ``manifest.json`` last (the workflow's
output: one job per dataset, corruption and severity). Outputs that already exist, are complete
and carry the same provenance are skipped, so an interrupted run is finished by running the same
command again.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from segcompress.progress import add_progress_argument

log = logging.getLogger("segcompress.corrupt")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layout", required=True, help="dataset layout: ade20k or cityscapes")
    parser.add_argument("--root", required=True, type=Path, help="clean dataset root, e.g. data/ade20k")
    parser.add_argument("--out", required=True, type=Path,
                        help="corrupted set root, e.g. data/ade20k-c (the folder is <out>/<corruption>/<severity>)")
    parser.add_argument("--dataset-name", required=True, help="dataset name; part of every image's seed")
    parser.add_argument("--corruption", required=True,
                        help="an imagecorruptions name, e.g. fog: Kamann & Rother's 16, or zoom_blur, "
                        "elastic_transform, pixelate")
    parser.add_argument("--severity", required=True, type=int, help="severity 1..5")
    parser.add_argument("--seed", type=int, default=0, help="global seed (default: 0)")
    parser.add_argument("--processes", type=int, default=None,
                        help="worker processes over the images (default: every usable CPU; 1: in-process)")
    parser.add_argument("--max-images", type=int, default=None, help="fixed seeded subset of N val images")
    parser.add_argument("--compress-level", type=int, default=None,
                        help="PNG zlib level 0..9, lossless at every level "
                        "(default 1: fast, files ~10-20%% larger than at 6)")
    add_progress_argument(parser)


def main(args: argparse.Namespace) -> int:
    from segcompress.corrupt import DEFAULT_COMPRESS_LEVEL, generate

    if args.processes is not None and args.processes < 1:
        raise ValueError(f"--processes: {args.processes} must be >= 1")
    report = generate(
        args.layout, args.root, args.out, args.dataset_name, args.corruption, args.severity,
        seed=args.seed,
        processes=args.processes,
        max_images=args.max_images,
        compress_level=DEFAULT_COMPRESS_LEVEL if args.compress_level is None else args.compress_level,
        progress=args.progress,
    )
    log.info("%s complete: %d images generated, %d already there (%.1f s)",
             report.manifest.parent, report.generated, report.skipped, report.seconds)
    return 0
