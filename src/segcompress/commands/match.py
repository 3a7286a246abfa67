"""``segcompress match``: solve a token method's knob for a FLOPs target.

    segcompress match --method tome --target-fraction 0.5 --model models/ade20k/vit-s/dense.safetensors
    segcompress match --method cts --target-gflops 25 --backbone vit_small_patch16_384 --num-classes 150 --crop 512
    segcompress match --method algm --target-fraction 0.7 --model M --calib-root data/ade20k --calib-images 100

Prints one JSON object on stdout (and with ``--out`` writes it): at least ``knob``,
``achieved_gflops``, ``target_gflops``, ``within_tolerance``; also ``dense_gflops``,
``target_fraction``, ``gflops_std`` (ALGM: over the calibration images), ``reach_gflops`` (the
method's achievable range) and ``message`` (why a target is out of reach). ToMe and CTS are
solved exactly in closed form; ALGM by bisection of τ on calibration images (each image counted
as batch 1). ``--target-fraction`` is relative to ``--reference-model`` when given (prune-then-merge
solves ToMe on a pruned model for a fraction of the dense model), else to the model itself.
``--arch``/``--backbone`` models have random weights drawn from ``--seed`` (default 0), so ALGM's
threshold and GFLOPs are the same on every call.
Exit status 0 even when the target is out of reach (the nearest knob is written), unless
``--strict``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any, Iterator

import torch

from segcompress.commands._model_options import add_model_arguments, calibration_images, parse_json_arg, spec_and_model
from segcompress.methods import TOKEN_METHODS

log = logging.getLogger("segcompress.match")



def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    target = parser.add_argument_group("target (one of)")
    which = target.add_mutually_exclusive_group(required=True)
    which.add_argument("--target-gflops", type=float, metavar="G", help="GFLOPs target (one crop)")
    which.add_argument("--target-fraction", type=float, metavar="F", help="target as a fraction of the dense GFLOPs")
    parser.add_argument("--reference-model", metavar="CKPT", help="dense model whose GFLOPs --target-fraction refers to")
    parser.add_argument("--tolerance", type=float, default=0.01, help="relative tolerance (default: 0.01)")
    parser.add_argument("--flops-per", choices=["crop", "image"], default="crop",
                        help="FLOPs convention; only 'crop' (one crop at the training size) is matched")
    parser.add_argument("--policy", metavar="SAFETENSORS", help="CTS policy net (recorded in the knob)")
    parser.add_argument("--exclude-policy-net", action="store_true", help="CTS: leave the policy net out of the FLOPs")
    parser.add_argument("--prop-attn", action=argparse.BooleanOptionalAction, default=None,
                        help="proportional attention (default: the method's: ToMe on, ALGM/CTS off)")
    parser.add_argument("--unmerge-before-decoder", action=argparse.BooleanOptionalAction, default=None,
                        help="restore tokens onto the grid before the decoder (default: ToMe yes, ALGM/CTS no)")
    parser.add_argument("--window-size", type=int, default=None, help="ALGM local window (default 2)")
    parser.add_argument("--calib-batch", type=int, default=8, help="ALGM: calibration images per forward pass")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    parser.add_argument("--strict", action="store_true", help="exit with status 3 when the target is not met")
    parser.add_argument("--out", metavar="JSON", help="also write the result to this file (atomically)")


def base_knob(args: argparse.Namespace) -> dict[str, Any]:
    """The method settings that are not solved (from ``--knob`` and the flags)."""
    knob = parse_json_arg(args.knob, "--knob")
    if args.prop_attn is not None:
        knob["prop_attn"] = args.prop_attn
    if args.unmerge_before_decoder is not None:
        knob["decoder_on_merged"] = not args.unmerge_before_decoder
    if args.method == "algm" and args.window_size is not None:
        knob["window"] = args.window_size
    if args.method == "cts" and args.policy is not None:
        knob["policy"] = args.policy
    return knob


def batched(images: Iterator[torch.Tensor], size: int) -> list[torch.Tensor]:
    """Group (1, 3, H, W) images into batches (ALGM's per-image merging does not couple them)."""
    out, cur = [], []
    for img in images:
        cur.append(img)
        if len(cur) == size:
            out.append(torch.cat(cur))
            cur = []
    if cur:
        out.append(torch.cat(cur))
    return out


def main(args: argparse.Namespace) -> int:
    from segcompress.flops import analytic_gmacs
    from segcompress.io import write_json
    from segcompress.models.spec import SegmenterSpec
    from segcompress.models.checkpoint import spec_path
    from segcompress.tokens import match

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.method not in TOKEN_METHODS:
        raise ValueError(f"--method must be one of {', '.join(TOKEN_METHODS)} (got {args.method!r})")
    if args.flops_per != "crop":
        raise ValueError("--flops-per image is not matched: knobs are solved per crop (the anchors' convention)")
    if args.target_fraction is not None and not 0 < args.target_fraction:
        raise ValueError(f"--target-fraction must be > 0, got {args.target_fraction}")
    knob = base_knob(args)
    spec, model, source = spec_and_model(args)
    reference = SegmenterSpec.load(spec_path(args.reference_model)) if args.reference_model else spec
    dense_ref = analytic_gmacs(reference)
    target = args.target_gflops if args.target_gflops is not None else args.target_fraction * dense_ref
    if args.method == "tome":
        result = match.match_tome(spec, target, knob, args.tolerance)
    elif args.method == "cts":
        result = match.match_cts(spec, target, knob, args.tolerance, include_policy=not args.exclude_policy_net)
    else:
        if args.calib_root is None:
            raise ValueError("ALGM's FLOPs depend on the images: give --calib-root (and --calib-layout)")
        images = batched(calibration_images(args, spec), args.calib_batch)
        if not images:
            raise ValueError(f"{args.calib_root}: no calibration images found")
        result = match.match_algm(model, images, target, knob, args.tolerance)
    out = {
        **result.to_dict(),
        "reference_gflops": dense_ref,
        "reference_fraction": result.achieved_gflops / dense_ref,
        "target_fraction": target / dense_ref,
        "weights": source,
        "reference_model": args.reference_model,
        "tolerance": args.tolerance,
        "flops_per": args.flops_per,
    }
    if not result.within_tolerance:
        log.warning(result.message)
    if args.out:
        write_json(args.out, out)
    print(json.dumps(out, indent=2))
    sys.stdout.flush()
    return 3 if args.strict and not result.within_tolerance else 0
