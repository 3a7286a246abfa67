"""``segcompress evaluate``: sliding-window mIoU of one model variant on one dataset split.

One image condition (``--img-root``, ``--out``) or several (``--condition`` per condition: the
model is loaded once, and each condition gets its own row).

Writes one results row (JSON, atomically): the row's tags (``--tag key=value``; values are parsed
as JSON when they can be, so ``severity=3`` is a number), the measured metrics, the per-class IoU,
``num_images``, ``seconds``, the hardware and software versions, the code's provenance
(``segcompress_version``, ``source_revision``, ``source_dirty``), ``settings_hash`` and
``per_image``: each image's per-class areas (docs/contracts.md, "Results rows"). Metrics are
fractions in [0, 1]. ``--match FILE`` (a ``segcompress match`` result) supplies the knob and the
target / achieved GFLOPs columns; an input-dependent method (ALGM) gets its achieved GFLOPs
measured on each condition's own images instead (``gflops_source``).

Every image and label is checked against the sha256 its folder's manifest records as it is read
(a file changed since ``segcompress data`` or ``segcompress corrupt`` stops the run with one line
naming it), and each condition's corruption and severity against its image folder, before the
model loads (``segcompress.commands._evaluation.check_condition``).
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from segcompress.commands._evaluation import (
    MATCH_COLUMNS, RESERVED, ROW_COLUMNS, add_variant_arguments, conditions_of, load_variant_run, parse_knob,
    parse_tags, row_json,
)

log = logging.getLogger(__name__)

# Re-exported: the shared definitions live in segcompress.commands._evaluation.
__all__ = ["ROW_COLUMNS", "RESERVED", "MATCH_COLUMNS", "add_arguments", "parse_tags", "parse_knob", "main"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from segcompress.bench import add_allocator_argument

    add_variant_arguments(parser, out_help="results row (JSON)")
    add_allocator_argument(parser)


def main(args: argparse.Namespace) -> int:
    from segcompress.bench import use_allocator
    from segcompress.evaluate import environment, evaluate
    from segcompress.io import atomic_write_text

    use_allocator(args.allocator)  # each image's class maps are large and freed again: reuse, not page-fault, them
    conditions = conditions_of(args)
    run = load_variant_run(args, RESERVED)
    settings_hash = run.settings_hash(args)
    for condition in conditions:
        dataset = run.dataset_for(condition.img_root)
        log.info("evaluating %s (%s %s) on %d %s images%s, crop %s stride %d", args.model, args.method, run.knob,
                 len(dataset), args.split, f" from {condition.img_root}" if condition.img_root else "", run.crop,
                 run.stride)
        result = evaluate(run.model, dataset, run.crop, run.stride, run.num_classes, batch_size=args.batch_size,
                          device=run.device, num_workers=args.workers, progress=args.progress)
        row: dict[str, Any] = dict.fromkeys(ROW_COLUMNS)
        row.update(run.identity(args, condition))
        row.update(run.gflops(condition, args.batch_size))
        row.update(
            miou=result["miou"], aacc=result["aacc"], macc=result["macc"],
            num_images=result["num_images"], **environment(run.device),
            seconds=result["seconds"], **run.settings(args, condition), settings_hash=settings_hash,
            per_class_iou=result["iou"], per_class_acc=result["acc"], per_image=result["per_image"],
        )
        atomic_write_text(condition.out, row_json(row))
        log.info("%s: mIoU %.2f%% aAcc %.2f%% mAcc %.2f%% (%d images, %.1f s)", condition.out, *(
            100 * (row[k] if row[k] is not None else float("nan")) for k in ("miou", "aacc", "macc")),
            row["num_images"], row["seconds"])
    return 0
