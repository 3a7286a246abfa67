"""``segcompress rank``: normalised effective rank of a variant's restored encoder features.

Selects the variant, the images (clean, or corrupted with ``--img-root``) and the sliding windows
exactly as ``segcompress evaluate`` does, and writes one JSON row (atomically): the identity
columns of an evaluate row (tags, the match file's GFLOPs columns, ``params_m``), then
``erank_mean``, ``erank_std`` (population standard deviation over images), ``num_images``, the
settings (``feature``, ``centre``, ``normalise``, ``windows``), the per-image values and the
hardware and software versions. How the rank is taken: :mod:`segcompress.analysis`.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from segcompress.analysis import FEATURES, NORMALISE, WINDOWS, RankSettings, rank_dataset
from segcompress.commands._evaluation import RESERVED, add_variant_arguments, conditions_of, load_variant_run

log = logging.getLogger(__name__)

RANK_RESERVED = RESERVED | {"erank_mean", "erank_std", "erank_per_image", "names", "rows", "width", "feature",
                            "centre", "normalise", "windows"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_variant_arguments(parser, out_help="rank row (JSON)")
    rank = parser.add_argument_group("effective rank (config: analysis.effective_rank)")
    rank.add_argument("--feature", choices=FEATURES, default="final_norm",
                      help="final_norm: after the encoder's last LayerNorm (default); last_block: before it")
    rank.add_argument("--centre", action=argparse.BooleanOptionalAction, default=False,
                      help="subtract the mean row before the SVD (default: no)")
    rank.add_argument("--normalise", choices=list(NORMALISE), default="min_tokens_width",
                      help="min_tokens_width: erank / min(rows, E') (default); width: erank / E'; none: raw")
    rank.add_argument("--windows", choices=WINDOWS, default="stack",
                      help="stack: one matrix of every window's patches per image (default); "
                           "mean: mean over windows of each window's rank")


def main(args: argparse.Namespace) -> int:
    from segcompress.evaluate import environment
    from segcompress.io import write_json

    settings = RankSettings(feature=args.feature, centre=args.centre, normalise=args.normalise, windows=args.windows)
    conditions = conditions_of(args)
    run = load_variant_run(args, RANK_RESERVED)
    for condition in conditions:
        dataset = run.dataset_for(condition.img_root)
        log.info("effective rank of %s (%s %s) on %d %s images, crop %s stride %d, %s", args.model, args.method,
                 run.knob, len(dataset), args.split, run.crop, run.stride, settings)
        result = rank_dataset(run.model, dataset, run.crop, run.stride, settings, batch_size=args.batch_size,
                              device=run.device, progress=not args.no_progress)
        row: dict[str, Any] = run.identity(args, condition)
        row.update(
            erank_mean=result["erank_mean"], erank_std=result["erank_std"], num_images=result["num_images"],
            **settings.as_dict(), rows=result["rows"], width=result["width"], **environment(run.device),
            seconds=result["seconds"], **run.settings(args, condition),
            names=result["names"], erank_per_image=result["erank_per_image"],
        )
        write_json(condition.out, row)
        log.info("%s: normalised effective rank %.4f ± %.4f over %d images (%.1f s)", condition.out,
                 row["erank_mean"], row["erank_std"], row["num_images"], row["seconds"])
    return 0
