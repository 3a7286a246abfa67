"""``segcompress rank``: effective rank of a variant's restored encoder features.

Selects the variant, the images (clean, or corrupted with ``--img-root``) and the sliding windows
exactly as ``segcompress evaluate`` does, and writes one JSON row (atomically): the identity
columns of an evaluate row (tags, the match file's GFLOPs columns, ``params_m``), then
``erank_mean``, ``erank_std`` (normalised as ``--normalise`` says; population standard deviation
over images), ``erank_raw_mean``, ``erank_raw_std`` (the raw effective rank), ``num_images``, the
settings (``feature``, ``centre``, ``normalise``, ``windows``, ``reference_width``), the per-image
values and the hardware and software versions. How the rank is taken: :mod:`segcompress.analysis`.

The default normalisation, ``reference``, divides every variant by the same min(rows, E_ref),
E_ref the embedding width of ``--reference-model`` (the study's dense checkpoint; only its spec
``.json`` is read), so it cannot reverse the raw order.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from segcompress.analysis import FEATURES, NORMALISE, WINDOWS, RankSettings, rank_dataset
from segcompress.commands._evaluation import RESERVED, add_variant_arguments, conditions_of, load_variant_run

log = logging.getLogger(__name__)

RANK_RESERVED = RESERVED | {"erank_mean", "erank_std", "erank_raw_mean", "erank_raw_std", "erank_per_image",
                            "erank_raw_per_image", "names", "rows", "width", "feature", "centre", "normalise",
                            "windows", "reference_width"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_variant_arguments(parser, out_help="rank row (JSON)")
    rank = parser.add_argument_group("effective rank (config: analysis.effective_rank)")
    rank.add_argument("--feature", choices=FEATURES, default="final_norm",
                      help="final_norm: after the encoder's last LayerNorm (default); last_block: before it")
    rank.add_argument("--centre", action=argparse.BooleanOptionalAction, default=False,
                      help="subtract the mean row before the SVD (default: no)")
    rank.add_argument("--normalise", choices=list(NORMALISE), default="reference",
                      help="reference: erank / min(rows, E_ref), E_ref the width of --reference-model (default; "
                           "one divisor for every variant); min_tokens_width: erank / min(rows, E'), E' the "
                           "model's own width; width: erank / E'; none: raw")
    rank.add_argument("--reference-model", type=Path,
                      help="the dense checkpoint (.safetensors; its spec .json beside it is read) whose "
                           "embedding width E_ref normalises every variant; needed by --normalise reference")
    rank.add_argument("--windows", choices=WINDOWS, default="stack",
                      help="stack: one matrix of every window's patches per image (default); "
                           "mean: mean over windows of each window's rank")


def reference_width(reference_model: Path | None, normalise: str) -> int | None:
    """E_ref: the embedding width in ``reference_model``'s spec (None when not given and not needed)."""
    if reference_model is None:
        if normalise == "reference":
            raise ValueError("--normalise reference (the default) needs --reference-model DENSE.safetensors, the "
                             "dense checkpoint whose width normalises every variant; or choose --normalise "
                             "min_tokens_width, width or none")
        return None
    from segcompress.models.checkpoint import spec_path
    from segcompress.models.spec import SegmenterSpec

    return SegmenterSpec.load(spec_path(reference_model)).embed_dim


def main(args: argparse.Namespace) -> int:
    from segcompress.evaluate import environment
    from segcompress.io import write_json

    settings = RankSettings(feature=args.feature, centre=args.centre, normalise=args.normalise, windows=args.windows,
                            reference_width=reference_width(args.reference_model, args.normalise))
    conditions = conditions_of(args)
    run = load_variant_run(args, RANK_RESERVED)
    for condition in conditions:
        dataset = run.dataset_for(condition.img_root)
        log.info("effective rank of %s (%s %s) on %d %s images, crop %s stride %d, %s", args.model, args.method,
                 run.knob, len(dataset), args.split, run.crop, run.stride, settings)
        result = rank_dataset(run.model, dataset, run.crop, run.stride, settings, batch_size=args.batch_size,
                              device=run.device, progress=args.progress)
        row: dict[str, Any] = run.identity(args, condition)
        row.update(
            erank_mean=result["erank_mean"], erank_std=result["erank_std"], erank_raw_mean=result["erank_raw_mean"],
            erank_raw_std=result["erank_raw_std"], num_images=result["num_images"],
            **settings.as_dict(), rows=result["rows"], width=result["width"], **environment(run.device),
            seconds=result["seconds"], **run.settings(args, condition),
            names=result["names"], erank_per_image=result["erank_per_image"],
            erank_raw_per_image=result["erank_raw_per_image"],
        )
        write_json(condition.out, row)
        log.info("%s: effective rank %.4f ± %.4f (%s), raw %.3f ± %.3f, over %d images (%.1f s)", condition.out,
                 row["erank_mean"], row["erank_std"], settings.normalise, row["erank_raw_mean"], row["erank_raw_std"],
                 row["num_images"], row["seconds"])
    return 0
