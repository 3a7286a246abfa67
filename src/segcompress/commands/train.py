"""``segcompress train``: train a dense Segmenter with Segmenter's recipe.

    segcompress train --layout ade20k --root data/ade20k --crop 512 --img-scale 2048 512 \\
        --arch '{"timm_name": "vit_small_patch16_384", "pretrained": "timm"}' \\
        --recipe '{"iters": 160000, "lr": 0.001}' --seed 0 --out models/ade20k/vit-s/dense.safetensors

Several GPUs: ``torchrun --nproc_per_node 4 -m segcompress train ...`` (``batch_size`` in the
recipe is the world batch). A killed run continues from its last resume point
(``<out>.resume/``) when the same command is run again.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("segcompress.train")

EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped at --stop-at, rerun to continue


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layout", required=True, help="dataset layout: ade20k or cityscapes")
    parser.add_argument("--root", required=True, type=Path, help="dataset root folder")
    parser.add_argument("--split", default="train", help="split to train on (default: train)")
    parser.add_argument("--crop", required=True, type=int, nargs="+", metavar="S", help="training crop: S or H W")
    parser.add_argument("--img-scale", required=True, type=int, nargs=2, metavar=("LONG", "SHORT"),
                        help="resize scale before the 0.5-2.0 random ratio (ADE20K: 2048 512)")
    parser.add_argument("--arch", required=True, help="backbone entry as JSON, inline or a .json file")
    parser.add_argument("--recipe", default="{}", help="recipe overrides as JSON, inline or a .json file (default: {})")
    parser.add_argument("--seed", type=int, default=0, help="seed of init, data order, augmentation, drop-path")
    parser.add_argument("--out", required=True, type=Path,
                        help="final checkpoint, e.g. models/<ds>/<arch>/dense.safetensors")
    parser.add_argument("--max-images", type=int, default=None, help="train on the first N images only (smoke tests)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="auto: a GPU per process when CUDA is available, else the CPU")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads per process (default: torch's)")
    parser.add_argument("--stop-at", type=int, default=None,
                        help=f"stop after this many iterations, keeping the resume point (exit status {EXIT_STOPPED})")


def main(args: argparse.Namespace) -> int:
    import torch

    from segcompress import distributed
    from segcompress.commands._model_options import parse_json_arg, require_safetensors_out
    from segcompress.data.layouts import get_layout
    from segcompress.models.segmenter import build_segmenter
    from segcompress.models.spec import spec_from_arch
    from segcompress.seeding import seed_everything
    from segcompress.train import Recipe, fit

    if args.threads:
        torch.set_num_threads(args.threads)
    if len(args.crop) not in (1, 2):
        raise ValueError("--crop takes S or H W")
    crop: int | list[int] = args.crop[0] if len(args.crop) == 1 else list(args.crop)
    require_safetensors_out(args.out)
    layout = get_layout(args.layout)
    recipe = Recipe.from_dict(parse_json_arg(args.recipe, "--recipe"), source="--recipe")
    arch = parse_json_arg(args.arch, "--arch", "a JSON object (a config backbones entry)")
    try:
        spec, pretrained = spec_from_arch(arch, layout.num_classes, crop)
    except (TypeError, ValueError) as e:
        raise ValueError(f"--arch: {e}") from None

    from segcompress.data.datasets import build_dataset, collate_train

    info = distributed.init_distributed(device=None if args.device == "auto" else args.device)
    try:
        dataset = build_dataset(
            args.layout, args.root, args.split, mode="train", crop=crop, img_scale=tuple(args.img_scale),
            max_images=args.max_images,
        )
        seed_everything(args.seed)  # model init: the same on every rank
        model = build_segmenter(spec, pretrained=pretrained)
        if info.is_main:
            n = sum(p.numel() for p in model.parameters())
            log.info("%s: %s, %.2fM parameters, %d training images", args.out, _describe(spec), n / 1e6, len(dataset))
        result = fit(
            model, dataset, recipe, seed=args.seed, out=args.out, collate_fn=collate_train, stop_at=args.stop_at,
            device=info.device,
            metadata={"layout": args.layout, "arch": json.dumps(arch, sort_keys=True)},
        )
    finally:
        distributed.cleanup_distributed()
    if not result.completed:
        if info.is_main:
            log.info("stopped at iteration %d of %d; run the same command again to continue", result.step, recipe.iters)
        return EXIT_STOPPED
    return 0


def _describe(spec: Any) -> str:
    name = spec.backbone or f"ViT E{spec.embed_dim} L{spec.depth} H{spec.num_heads} P{spec.patch_size}"
    return f"{name} at {spec.crop[0]}x{spec.crop[1]}, {spec.num_classes} classes"
