"""``segcompress flops``: GFLOPs of a model variant, in the project's one convention.

Prints (and with ``--out`` writes) a JSON object: ``gflops`` (fvcore, 1 multiply-add = 1 FLOP, so
``gmacs`` is the same number), ``gflops_std`` (population standard deviation over the images
counted), the closed-form ``analytic_gflops`` where one is known, ``params_m`` and the variant's
description.

Without ``--calib-root`` one seeded random crop is counted (enough for input-independent methods);
with it, every calibration image (resized to the crop) is counted and the mean and standard
deviation are reported, as input-dependent methods (ALGM) need. ``--arch``/``--backbone`` models
have random weights drawn from ``--seed`` (default 0), so an input-dependent method's count is the
same on every call.
"""

from __future__ import annotations

import argparse
import json
import statistics
from typing import Any

from segcompress.commands._model_options import (
    Variant, add_model_arguments, calibration_images, random_image, variant_from_args,
)
from segcompress.flops import CONVENTION, count_gmacs, count_params
from segcompress.io import write_json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--out", metavar="JSON", help="also write the result to this file (atomically)")


def analytic_for(variant: Variant, images: list[Any] | None = None) -> float | None:
    """Closed-form GMACs of ``variant`` where one is known, else ``None``.

    Dense and pruned models from their spec; token methods (tome, cts; algm on the counted
    ``images``, whose token counts it needs) from their per-block token counts
    (:func:`segcompress.methods.method_cost`).
    """
    from segcompress.methods import get, method_cost

    method = get(variant.method)
    if (method.input_dependent and not images) or not hasattr(method.code(), "cost"):
        return None
    return method_cost(variant.method, variant.knob, variant.spec, variant.model, images).mean


def measure_flops(variant: Variant, args: argparse.Namespace) -> dict[str, Any]:
    """Count ``variant`` on a random crop, or on each calibration image when ``--calib-root`` is given."""
    if args.calib_root is not None:
        inputs = list(calibration_images(args, variant.spec))
        if not inputs:
            raise ValueError(f"{args.calib_root}: no calibration images found")
        images = "calibration"
    else:
        inputs = [random_image(variant.spec, seed=args.seed)]
        images = "random"
    counts = [count_gmacs(variant.model, img) for img in inputs]
    mean = statistics.fmean(counts)
    std = statistics.pstdev(counts) if len(counts) > 1 else 0.0
    analytic = analytic_for(variant, inputs)
    return {
        "gflops": mean,
        "achieved_gflops": mean,  # the name match files and results rows use
        "gflops_std": std,
        "gmacs": mean,
        "analytic_gflops": analytic,
        "convention": CONVENTION,
        "params_m": round(count_params(variant.model) / 1e6, 6),
        **variant.describe(),
        "images": images,
        "num_images": len(counts),
    }


def main(args: argparse.Namespace) -> int:
    variant = variant_from_args(args)
    result = measure_flops(variant, args)
    if args.out:
        write_json(args.out, result)
    print(json.dumps(result, indent=2))
    return 0
