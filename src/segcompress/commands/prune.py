"""``segcompress prune``: structural pruning of a dense Segmenter to a FLOPs target.

    segcompress prune --model models/ade20k/vit-s/dense.safetensors --target-fraction 0.5 \\
        --layout ade20k --root data/ade20k --crop 512 --img-scale 2048 512 \\
        --config-json '{"steps": 10, "interval": 100}' --seed 0 \\
        --out models/ade20k/vit-s/nvit-50.safetensors
    segcompress prune --method depgraph ... --out models/ade20k/vit-s/depgraph-50.safetensors

``--method`` is a structural method of the registry (``nvit``, NViT-style global pruning while
training, the default; ``depgraph``, one-shot DepGraph pruning); ``--config-json`` is its
settings (``methods.<name>`` in the config). Writes the physically smaller model (``.safetensors``
+ ``.json`` spec, loadable without the pruning code) and a report ``<out stem>.report.json``:
dense/target/achieved GFLOPs (closed form and fvcore), parameters, per-block widths, how the
method got there, and its settings.

Prune-then-merge (NViT): ``--prune-share 0.5`` (or ``"prune_share"`` in the config) prunes to
``dense · F**0.5`` for an overall target ``F``; solve ToMe's r afterwards with
``segcompress match --method tome --model <out> --target-gflops <overall target>``. The report
records the split.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from segcompress.commands._conventions import (
    add_crop_argument, add_device_argument, add_photometric_argument, crop_hw, resolve_device
)

log = logging.getLogger("segcompress.prune")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, type=Path, help="dense checkpoint (.safetensors with its .json spec)")
    parser.add_argument("--method", default="nvit", help="structural method of the registry: nvit (default), depgraph")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--target-gflops", type=float, metavar="G", help="overall FLOPs target in GFLOPs (GMACs)")
    target.add_argument("--target-fraction", type=float, metavar="F", help="overall FLOPs target as a fraction of dense")
    parser.add_argument("--prune-share", type=float, default=None, metavar="S",
                        help="nvit: share of the log-FLOPs reduction done by pruning (prune-then-merge: 0.5; "
                             "default: the config's prune_share, 1.0)")
    add_data_arguments(parser)
    parser.add_argument("--config-json", default="{}", metavar="JSON",
                        help="the method's settings (nvit: PruneConfig keys), inline JSON or a .json file (default: {})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data order and augmentation")
    parser.add_argument("--out", required=True, type=Path, help="pruned checkpoint, e.g. models/<ds>/<arch>/nvit-50.safetensors")
    parser.add_argument("--report", type=Path, default=None, help="JSON report (default: <out stem>.report.json)")
    add_device_argument(parser)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """The training-data options shared by ``prune`` and ``finetune``."""
    parser.add_argument("--layout", required=True, help="dataset layout: ade20k or cityscapes")
    parser.add_argument("--root", required=True, type=Path, help="dataset root folder")
    parser.add_argument("--split", default="train", help="split to train on (default: train)")
    add_crop_argument(parser, help="training crop (default and required: the model's)")
    parser.add_argument("--img-scale", required=True, type=int, nargs=2, metavar=("LONG", "SHORT"),
                        help="resize scale before the 0.5-2.0 random ratio (ADE20K: 2048 512)")
    parser.add_argument("--max-images", type=int, default=None, help="use the first N images only (smoke tests)")
    add_photometric_argument(parser)


def training_dataset(args: argparse.Namespace, spec: Any) -> Any:
    """The augmented training set for ``spec``'s crop (``--crop`` must match it when given)."""
    from segcompress.data.datasets import build_dataset

    crop = spec.crop
    if args.crop is not None and crop_hw(args.crop) != tuple(crop):
        raise ValueError(f"--crop {args.crop} but {args.model} was built for crop "
                         f"{crop[0]},{crop[1]} (its position embedding fixes the crop)")
    return build_dataset(args.layout, args.root, args.split, mode="train", crop=list(crop),
                         img_scale=tuple(args.img_scale), max_images=args.max_images, photometric=args.photometric)


def report_path(out: Path) -> Path:
    """``models/x/nvit-50.safetensors`` -> ``models/x/nvit-50.report.json`` (``.json`` is the spec)."""
    return out.with_name(out.name.removesuffix(".safetensors") + ".report.json")


def main(args: argparse.Namespace) -> int:
    import json

    import torch

    from segcompress import methods
    from segcompress.commands._model_options import parse_json_arg, require_safetensors_out
    from segcompress.data.datasets import collate_train
    from segcompress.flops import CONVENTION, analytic_gmacs, count_gmacs
    from segcompress.io import write_json
    from segcompress.models.checkpoint import load_model, save_model
    from segcompress.prune.config import prune_target_gmacs

    if args.threads:
        torch.set_num_threads(args.threads)
    method = methods.get(args.method)
    if method.family != "structural":
        raise ValueError(f"--method {args.method}: not a structural method "
                         f"(choose one of {', '.join(methods.names(family='structural'))})")
    require_safetensors_out(args.out)
    config_data = parse_json_arg(args.config_json, "--config-json", f"a JSON object of {args.method}'s settings")
    if args.prune_share is not None:
        if "prune_share" not in method.settings.keys():
            raise ValueError(f"--prune-share: {args.method} does not split a budget with token merging")
        config_data["prune_share"] = args.prune_share
    config = method.settings.from_dict(config_data, source="--config-json")
    share = float(getattr(config, "prune_share", 1.0))

    model = load_model(args.model)
    spec = model.spec
    dense = analytic_gmacs(spec)
    if args.target_fraction is not None:
        if not 0 < args.target_fraction <= 1:
            raise ValueError(f"--target-fraction {args.target_fraction}: must be in (0, 1]")
        overall = dense * args.target_fraction
    else:
        if args.target_gflops <= 0:
            raise ValueError(f"--target-gflops {args.target_gflops}: must be > 0")
        overall = args.target_gflops
    target = prune_target_gmacs(dense, overall, share)
    dataset = training_dataset(args, spec)
    log.info("%s: %s, dense %.3f GFLOPs; overall target %.3f, pruning to %.3f (prune_share %.2f); %d training images",
             args.model, args.method, dense, overall, target, share, len(dataset))

    device = resolve_device(args.device)
    result = method.code().prune(model, dataset, target, config, seed=args.seed, collate_fn=collate_train,
                                 device=device)
    pruned = result.model.cpu().eval()
    img = torch.zeros(1, 3, *pruned.spec.crop)
    report = {
        "source": str(args.model),
        "out": str(args.out),
        "method": args.method,
        "seed": args.seed,
        "flops_convention": CONVENTION,
        "overall_target_gflops": overall,
        "overall_target_fraction": overall / dense,
        "prune_share": share,
        "prune_target_gflops": target,
        **result.report(),
        "fvcore_gflops": count_gmacs(pruned, img),
        "config": config.to_dict(),
    }
    if share < 1.0:
        report["prune_then_merge"] = {
            "overall_target_gflops": overall, "prune_target_gflops": target, "prune_share": share,
            "next": f"segcompress match --method tome --model {args.out} --target-gflops {overall:.6g}",
        }
    meta = {"pruned_from": str(args.model), "pruned_by": args.method, "seed": str(args.seed),
            "achieved_gflops": f"{result.achieved_gmacs:.6f}", "prune_config": json.dumps(config.to_dict(), sort_keys=True)}
    save_model(pruned, args.out, metadata=meta)
    write_json(args.report or report_path(args.out), report)
    log.info("wrote %s: %.3f GFLOPs (%.1f%% of dense), %.2fM parameters (dense %.2fM)", args.out,
             result.achieved_gmacs, 100 * result.achieved_gmacs / dense, report["params"] / 1e6,
             result.dense_params / 1e6)
    return 0
