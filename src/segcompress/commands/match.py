"""``segcompress match``: solve a method's knob for a FLOPs target.

    segcompress match --method tome --target-fraction 0.5 --model models/ade20k/vit-s/dense.safetensors
    segcompress match --method cts --target-gflops 25 --backbone vit_small_patch16_384 --num-classes 150 --crop 512
    segcompress match --method algm --target-fraction 0.7 --model M --calib-root data/ade20k --calib-images 100 \
        --settings '{"window": 2}'

``--settings`` is the method's settings (the config's ``methods.<name>`` entry, checked by its
settings dataclass; keys left out take their defaults); they go into the knob as they are, beside
what is solved. Each method solves its own knob (``segcompress.methods.<name>.solve``): ToMe and
CTS exactly in closed form, ALGM by bisection of τ on calibration images (each image counted as
batch 1).

Prints one JSON object on stdout (and with ``--out`` writes it): at least ``knob``,
``achieved_gflops``, ``target_gflops``, ``within_tolerance``; also ``dense_gflops``,
``target_fraction``, ``gflops_std`` (ALGM: over the calibration images), ``reach_gflops`` (the
method's achievable range) and ``message`` (why a target is out of reach). ``--target-fraction`` is relative to ``--reference-model`` when given (prune-then-merge
solves ToMe on a pruned model for a fraction of the dense model), else to the model itself.
``--arch``/``--backbone`` models have random weights drawn from ``--seed`` (default 0), so ALGM's
threshold and GFLOPs are the same on every call. The model runs on ``--device`` (default: a GPU
where there is one, as evaluation runs), the calibration images moved there one batch at a time.
Exit status 0 even when the target is out of reach (the nearest knob is written), unless
``--strict``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Iterator, Sequence

import torch

from segcompress.commands._conventions import add_device_argument, resolve_device
from segcompress.commands._model_options import add_model_arguments, calibration_images, parse_json_arg, spec_and_model

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
    parser.add_argument("--settings", metavar="JSON", default=None,
                        help="the method's settings (config methods.<name>), inline JSON or a .json file")
    parser.add_argument("--policy", metavar="SAFETENSORS", help="CTS: the trained policy net (recorded in the knob)")
    parser.add_argument("--calib-batch", type=int, default=8, help="ALGM: calibration images per forward pass")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    add_device_argument(parser)
    parser.add_argument("--strict", action="store_true", help="exit with status 3 when the target is not met")
    parser.add_argument("--out", metavar="JSON", help="also write the result to this file (atomically)")


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


class OnDevice(Sequence[torch.Tensor]):
    """Batches kept where they are and moved to ``device`` one at a time as they are read (the
    calibration set need not fit on the GPU: ALGM's bisection reads it some 30 times)."""

    def __init__(self, batches: list[torch.Tensor], device: torch.device | str) -> None:
        self.batches, self.device = batches, torch.device(device)

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> torch.Tensor:  # type: ignore[override]
        return self.batches[i].to(self.device)


def main(args: argparse.Namespace) -> int:
    from segcompress import methods
    from segcompress.flops import analytic_gmacs
    from segcompress.io import write_json
    from segcompress.models.checkpoint import spec_path
    from segcompress.models.spec import SegmenterSpec

    if args.threads:
        torch.set_num_threads(args.threads)
    method = methods.get(args.method)
    if not hasattr(method.code(), "solve"):
        solvable = [m for m in methods.names() if hasattr(methods.get(m).code(), "solve")]
        raise ValueError(f"--method {args.method}: its knob is not solved for a target (choose one of {', '.join(solvable)})")
    if args.flops_per != "crop":
        raise ValueError("--flops-per image is not matched: knobs are solved per crop (the anchors' convention)")
    if args.target_fraction is not None and not 0 < args.target_fraction:
        raise ValueError(f"--target-fraction must be > 0, got {args.target_fraction}")
    if args.knob:
        raise ValueError("--knob is what match solves; give the method's settings with --settings")
    device = resolve_device(args.device)
    settings = method.parse_settings(parse_json_arg(args.settings, "--settings")).to_dict()
    if method.needs_policy:
        settings["policy_file"] = args.policy
    spec, model, source = spec_and_model(args)
    model.to(device)
    reference = SegmenterSpec.load(spec_path(args.reference_model)) if args.reference_model else spec
    dense_ref = analytic_gmacs(reference)
    target = args.target_gflops if args.target_gflops is not None else args.target_fraction * dense_ref

    def images() -> Sequence[torch.Tensor]:
        if args.calib_root is None:
            raise ValueError(f"{args.method}'s FLOPs depend on the images: give --calib-root (and --calib-layout)")
        batches = batched(calibration_images(args, spec), args.calib_batch)
        if not batches:
            raise ValueError(f"{args.calib_root}: no calibration images found")
        return OnDevice(batches, device)

    result = methods.solve(args.method, spec, target, settings, model=model, images=images, tolerance=args.tolerance)
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
