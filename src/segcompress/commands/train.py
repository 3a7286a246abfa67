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

from segcompress.commands._conventions import (
    add_crop_argument, add_device_argument, add_photometric_argument, resolve_device
)
from segcompress.progress import add_progress_argument

log = logging.getLogger("segcompress.train")

EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped at --stop-at, rerun to continue


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layout", required=True, help="dataset layout: ade20k or cityscapes")
    parser.add_argument("--root", required=True, type=Path, help="dataset root folder")
    parser.add_argument("--split", default="train", help="split to train on (default: train)")
    add_crop_argument(parser, help="training crop", required=True)
    parser.add_argument("--img-scale", required=True, type=int, nargs=2, metavar=("LONG", "SHORT"),
                        help="resize scale before the 0.5-2.0 random ratio (ADE20K: 2048 512)")
    parser.add_argument("--arch", required=True, help="backbone entry as JSON, inline or a .json file")
    parser.add_argument("--recipe", default="{}", help="recipe overrides as JSON, inline or a .json file (default: {})")
    parser.add_argument("--seed", type=int, default=0, help="seed of init, data order, augmentation, drop-path")
    parser.add_argument("--out", required=True, type=Path,
                        help="final checkpoint, e.g. models/<ds>/<arch>/dense.safetensors")
    parser.add_argument("--max-images", type=int, default=None, help="train on the first N images only (smoke tests)")
    add_photometric_argument(parser)
    add_device_argument(parser)  # auto: a GPU per process (torchrun) when CUDA is available
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads per process (default: torch's)")
    parser.add_argument("--stop-at", type=int, default=None,
                        help=f"stop after this many iterations, keeping the resume point (exit status {EXIT_STOPPED})")
    add_progress_argument(parser)
    parser.add_argument("--from-checkpoint", type=Path, metavar="CKPT",
                        help="adopt this dense checkpoint instead of training (one of this project's, or one made "
                             "by `segcompress convert`): its classes, crop and widths must match --layout, --crop "
                             "and --arch; it is copied to --out unchanged")


def main(args: argparse.Namespace) -> int:
    import torch

    from segcompress import distributed
    from segcompress.commands._model_options import parse_json_arg, require_safetensors_out
    from segcompress.data.layouts import get_layout
    from segcompress.models.segmenter import build_segmenter
    from segcompress.models.spec import spec_from_arch
    from segcompress.seeding import seed_everything
    from segcompress.train import Output, Recipe, Runtime, fit

    if args.threads:
        torch.set_num_threads(args.threads)
    crop: int | list[int] = args.crop
    require_safetensors_out(args.out)
    layout = get_layout(args.layout)
    recipe = Recipe.from_dict(parse_json_arg(args.recipe, "--recipe"), source="--recipe")
    arch = parse_json_arg(args.arch, "--arch", "a JSON object (a config backbones entry)")
    try:
        spec, pretrained = spec_from_arch(arch, layout.num_classes, crop)
    except (TypeError, ValueError) as e:
        raise ValueError(f"--arch: {e}") from None

    if args.from_checkpoint is not None:
        adopt_checkpoint(args.from_checkpoint, spec, args.out)
        return 0

    from segcompress.data.datasets import build_dataset, collate_train

    info = distributed.init_distributed(device=None if args.device == "auto" else resolve_device(args.device))
    try:
        dataset = build_dataset(
            args.layout, args.root, args.split, mode="train", crop=crop, img_scale=tuple(args.img_scale),
            max_images=args.max_images, photometric=args.photometric,
        )
        seed_everything(args.seed)  # model init: the same on every rank
        model = build_segmenter(spec, pretrained=pretrained)
        if info.is_main:
            n = sum(p.numel() for p in model.parameters())
            log.info("%s: %s, %.2fM parameters, %d training images", args.out, _describe(spec), n / 1e6, len(dataset))
        result = fit(
            model, dataset, recipe, seed=args.seed, collate_fn=collate_train,
            output=Output(args.out, metadata={"layout": args.layout, "arch": json.dumps(arch, sort_keys=True)}),
            runtime=Runtime(device=info.device, stop_at=args.stop_at, progress=args.progress),
        )
    finally:
        distributed.cleanup_distributed()
    if not result.completed:
        if info.is_main:
            log.info("stopped at iteration %d of %d; run the same command again to continue", result.step, recipe.iters)
        return EXIT_STOPPED
    return 0


# The widths a dense checkpoint must share with its config backbone entry to stand in for it.
ADOPT_FIELDS = ("num_classes", "img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio")


def adopt_checkpoint(source: Path, expected: Any, out: Path) -> None:
    """Copy the dense checkpoint ``source`` (weights and spec) to ``out`` after checking it is the
    model ``expected`` (a :class:`~segcompress.models.spec.SegmenterSpec` from the config) describes.

    Raises:
        FileNotFoundError / ValueError: no such checkpoint, a spec that disagrees with its weights, a
            pruned model, or classes, crop or widths other than ``expected``'s (one line naming both).
    """
    from segcompress.io import atomic_write_bytes
    from segcompress.models.checkpoint import load_model, spec_path
    from segcompress.provenance import file_sha256

    given = load_model(source).spec  # checks the spec against the weights and their stored architecture
    if given.blocks is not None:
        raise ValueError(f"--from-checkpoint {source}: a pruned model (per-block widths); give a dense checkpoint")
    want, have = expected.to_dict(), given.to_dict()
    diffs = [f"{k} {have[k]} (config: {want[k]})" for k in ADOPT_FIELDS if _norm(have[k]) != _norm(want[k])]
    if diffs:
        raise ValueError(
            f"--from-checkpoint {source}: does not fit this study: {'; '.join(diffs)}; choose the checkpoint of "
            "this dataset and backbone, or convert it again (`segcompress convert --crop S --num-classes K`)"
        )
    atomic_write_bytes(spec_path(out), spec_path(source).read_bytes())  # spec first, as save_model
    atomic_write_bytes(out, source.read_bytes())
    log.info("%s: adopted %s (sha256 %s) instead of training: %s", out, source, file_sha256(out), _describe(given))


def _norm(value: Any) -> Any:
    """A spec value comparable across ``S`` / ``[S, S]`` crops and int / float ratios."""
    if isinstance(value, (list, tuple)):
        return tuple(_norm(v) for v in value) if len(set(value)) > 1 else _norm(value[0])
    return float(value) if isinstance(value, (int, float)) else value


def _describe(spec: Any) -> str:
    name = spec.backbone or f"ViT E{spec.embed_dim} L{spec.depth} H{spec.num_heads} P{spec.patch_size}"
    return f"{name} at {spec.crop[0]}x{spec.crop[1]}, {spec.num_classes} classes"
