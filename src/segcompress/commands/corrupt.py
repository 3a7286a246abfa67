"""``segcompress corrupt``: seeded corrupted validation sets (ADE20K-C / Cityscapes-C).

    segcompress corrupt --layout ade20k --root data/ade20k --out data/ade20k-c --dataset-name ade20k \\
        [--corruptions kamann|all|fog,snow,...] [--severities 1 2 3 4 5] [--noise-severities 1 2 3] \\
        [--seed 0] [--workers N] [--max-images N] [--max-corruptions N]

One folder only (how the workflow calls it, one job per folder; ``manifest.json`` is the output):

    segcompress corrupt ... --corruption fog --severity 3

Outputs that already exist, are complete and carry the same provenance are skipped, so an
interrupted run is finished by running the same command again.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from segcompress.progress import add_progress_argument

log = logging.getLogger("segcompress.corrupt")


def _category_severities(value: str) -> tuple[str, tuple[int, ...]]:
    """``noise=1,2,3`` -> ("noise", (1, 2, 3))."""
    cat, sep, levels = value.partition("=")
    try:
        if not sep:
            raise ValueError
        return cat.strip(), tuple(int(s) for s in levels.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: expected CATEGORY=S,S,... e.g. noise=1,2,3") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layout", required=True, help="dataset layout: ade20k or cityscapes")
    parser.add_argument("--root", required=True, type=Path, help="clean dataset root, e.g. data/ade20k")
    parser.add_argument("--out", required=True, type=Path, help="corrupted set root, e.g. data/ade20k-c")
    parser.add_argument("--dataset-name", required=True, help="dataset name; part of every image's seed")
    parser.add_argument("--corruptions", default="kamann",
                        help="'kamann' (16, default), 'all' (19) or a comma list of names")
    parser.add_argument("--severities", type=int, nargs="+", default=[1, 2, 3, 4, 5], metavar="S",
                        help="severities 1..5 (default: all five)")
    parser.add_argument("--noise-severities", type=int, nargs="+", default=None, metavar="S",
                        help="severities for the noise category (SegFormer's protocol: 1 2 3)")
    parser.add_argument("--category-severities", type=_category_severities, action="append", default=[],
                        metavar="CAT=S,S", help="severities for one category, e.g. weather=1,3,5 (repeatable)")
    parser.add_argument("--corruption", default=None, help="do exactly one folder: this corruption ...")
    parser.add_argument("--severity", type=int, default=None, help="... at this severity")
    parser.add_argument("--seed", type=int, default=0, help="global seed (default: 0)")
    parser.add_argument("--processes", type=int, default=None, help="worker processes (default: every usable CPU)")
    parser.add_argument("--max-images", type=int, default=None, help="fixed seeded subset of N val images")
    parser.add_argument("--max-corruptions", type=int, default=None,
                        help="fixed seeded subset of N corruptions, spread over the categories")
    parser.add_argument("--compress-level", type=int, default=None,
                        help="PNG zlib level 0..9, lossless at every level "
                        "(default 1: fast, files ~10-20%% larger than at 6)")
    add_progress_argument(parser)


def main(args: argparse.Namespace) -> int:
    from segcompress.corrupt import DEFAULT_COMPRESS_LEVEL, CorruptConfig, generate

    category_severities = dict(args.category_severities)
    if args.noise_severities is not None:
        category_severities["noise"] = tuple(args.noise_severities)
    corruptions: str | list[str] = args.corruptions
    severities = args.severities
    if (args.corruption is None) != (args.severity is None):
        raise ValueError("--corruption and --severity go together (one folder); pass both or neither")
    if args.corruption is not None:
        corruptions, severities, category_severities = [args.corruption], [args.severity], {}
    if args.processes is not None and args.processes < 1:
        raise ValueError(f"--processes: {args.processes} must be >= 1")

    config = CorruptConfig(
        layout=args.layout,
        root=args.root,
        out=args.out,
        dataset=args.dataset_name,
        corruptions=corruptions,
        severities=severities,
        category_severities=category_severities,
        seed=args.seed,
        workers=args.processes,
        max_images=args.max_images,
        max_corruptions=args.max_corruptions,
        compress_level=DEFAULT_COMPRESS_LEVEL if args.compress_level is None else args.compress_level,
        progress=args.progress,
    )
    report = generate(config)
    log.info(
        "%d folders complete in %s: %d images generated, %d already there (%.1f s)",
        len(report.manifests), args.out, report.generated, report.skipped, report.seconds,
    )
    return 0
