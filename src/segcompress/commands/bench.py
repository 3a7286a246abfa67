"""``segcompress bench``: throughput (images/s) of a model variant at a fixed batch.

Selects the model as ``segcompress flops`` does; prints (and with ``--out`` writes) a JSON object
with the images per second of the fastest batch (``--statistic median``: of the median one), the
median, slowest and fastest batch's beside it, the settings, the device and software versions and,
as evaluation rows, the code's provenance (``segcompress_version``, ``source_revision``,
``source_dirty``) and a ``settings_hash`` of what the timing depends on besides the machine. With
``--calib-root`` the first calibration image, repeated ``--batch`` times, is the input (as ALGM
times input-dependent methods); otherwise a seeded random batch. ``--match FILE`` takes the knob
from a ``segcompress match`` result (its ``knob`` entry), as ``segcompress evaluate`` does;
``--tag KEY=VALUE`` adds identity columns (dataset, variant, seed, ...) to the written row, which
the report joins onto the results rows of the same variant.

``--variant OUT MODEL METHOD MATCH TAGS`` (repeatable, instead of ``--model``/``--out``) times
several saved variants in one process, with the same input and in interleaved rounds (each round
times one batch of every variant in turn, so a slow spell of the machine falls on all alike), so
their speed-ups are measured under the same conditions and the process starts once (the workflow
times every variant of a dataset, backbone and seed in one job; they are all loaded at once).
Each variant's row is written to its OUT with the common ``--tag`` columns plus its own TAGS
(``KEY=VALUE,KEY=VALUE``, or ``-`` for none).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from segcompress.bench import STATISTICS, add_allocator_argument, measure_throughput, measure_throughputs, use_allocator
from segcompress.commands._evaluation import knob_of, model_sha256, parse_tags, read_match
from segcompress.commands._model_options import add_model_arguments, calibration_images, variant_from_args
from segcompress.io import write_json

# Columns bench measures itself: a tag may not set them.
MEASURED = frozenset({"images_per_s", "images_per_s_median", "images_per_s_min", "images_per_s_max", "batch_time_s",
                      "batch_time_s_median", "batch_time_s_min", "batch_time_s_max", "batch_times_s", "batch", "crop",
                      "warmup", "repeats", "statistic", "timed_at", "dtype", "device", "device_type",
                      "threads", "torch", "timm", "cuda", "images", "allocator", "python", "segcompress_version",
                      "source_revision", "source_dirty", "settings_hash"})
# What a timing depends on besides the machine (with the checkpoint's content and the input's seed).
HASHED = ("method", "knob", "backbone", "num_classes", "crop", "batch", "warmup", "repeats", "statistic", "dtype",
          "images", "allocator", "threads")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, required=False)
    parser.add_argument("--variant", nargs=5, action="append", default=[],
                        metavar=("OUT", "MODEL", "METHOD", "MATCH", "TAGS"),
                        help="time a saved variant (repeatable; instead of --model and --out): its row's file, "
                             "checkpoint, token method, match result (- for none) and own tags "
                             "(KEY=VALUE,KEY=VALUE or -)")
    parser.add_argument("--batch", type=int, default=8, help="images per forward pass (default: 8)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed batches first (default: 3)")
    parser.add_argument("--repeats", type=int, default=10, help="timed batches (default: 10)")
    parser.add_argument("--statistic", choices=STATISTICS, default="best",
                        help="which batch's time gives images/s: best (default; the fastest, which other work on "
                             "the machine can only slow down) or median; the row records both")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu or cuda[:i]")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    add_allocator_argument(parser)
    parser.add_argument("--match", type=Path, metavar="JSON", help="a match result whose knob to use (unless --knob is given)")
    parser.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE",
                        help="identity column of the written row (repeatable), e.g. method=nvit")
    parser.add_argument("--out", metavar="JSON", help="also write the result to this file (atomically)")



def main(args: argparse.Namespace) -> int:
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    tags = parse_tags(args.tag, MEASURED)
    args.allocator = use_allocator(args.allocator)
    if not args.variant:
        if args.model is None and args.arch is None and args.backbone is None:
            raise ValueError("name the model: --model, --arch or --backbone (or saved variants with --variant)")
        result = {**_time_variant(args), **tags}
        if args.out:
            write_json(args.out, result)
        print(json.dumps(result, indent=2))
        return 0
    if args.model is not None or args.arch is not None or args.backbone is not None or args.out:
        raise ValueError("--variant replaces --model/--arch/--backbone and --out; use one form")
    own_tags = [parse_tags([] if t == "-" else t.split(","), MEASURED) for *_, t in args.variant]  # all checked first
    each = [argparse.Namespace(**{**vars(args), "model": Path(model), "method": method, "knob": None,
                                  "match": None if match == "-" else Path(match)})
            for _, model, method, match, _ in args.variant]
    # every variant loaded first, then timed in interleaved rounds (bench.measure_throughputs)
    prepared = [_prepare(one) for one in each]
    crops = {tuple(variant.spec.crop) for variant, _ in prepared}
    if len(crops) > 1:
        raise ValueError(f"--variant models have different crops {sorted(crops)}; time them in separate calls")
    results = measure_throughputs([(variant.model, inputs) for variant, inputs in prepared], args.batch,
                                  prepared[0][0].spec.crop, args.warmup, args.repeats, args.device, args.seed,
                                  args.statistic)
    for one, (variant, inputs), result, own, (out, model, method, *_) in zip(
            each, prepared, results, own_tags, args.variant):
        row = {**_row(one, variant, inputs, result), **tags, **own}
        write_json(out, row)
        print(f"{out}: {row['images_per_s']:.2f} images/s ({method}, {model})", flush=True)
    return 0


def _prepare(args: argparse.Namespace) -> tuple[Any, torch.Tensor | None]:
    """The variant the options select and its input batch (None: a seeded random batch)."""
    if args.match is not None and args.knob is None:
        args.knob = json.dumps(knob_of(None, args.match, read_match(args.match)))
    variant = variant_from_args(args)
    inputs = None
    if args.calib_root is not None:
        first = next(iter(calibration_images(args, variant.spec)), None)
        if first is None:
            raise ValueError(f"{args.calib_root}: no calibration images found")
        inputs = first.expand(args.batch, -1, -1, -1).contiguous()
    return variant, inputs


def _row(args: argparse.Namespace, variant: Any, inputs: torch.Tensor | None, result: dict) -> dict:
    """A timed variant's row without tags."""
    row = {**result, **variant.describe(), "images": "calibration" if inputs is not None else "random",
           "allocator": args.allocator}
    return {**row, "settings_hash": _settings_hash(args, row)}


def _time_variant(args: argparse.Namespace) -> dict:
    """Load the variant the options select and time it: the row without tags."""
    variant, inputs = _prepare(args)
    result = measure_throughput(variant.model, args.batch, variant.spec.crop, args.warmup, args.repeats,
                                args.device, inputs=inputs, seed=args.seed, statistic=args.statistic)
    return _row(args, variant, inputs, result)


def _settings_hash(args: argparse.Namespace, row: dict) -> str:
    """:func:`segcompress.provenance.settings_hash` of the row's :data:`HASHED` settings, the
    checkpoint's content (sha256 of weights and spec; None for a randomly initialised
    architecture) and the seed of the input batch."""
    from segcompress.provenance import settings_hash

    return settings_hash({**{k: row[k] for k in HASHED}, "seed": args.seed,
                          "model_sha256": None if args.model is None else model_sha256(args.model)})
