"""``segcompress policy``: train the CTS policy net (which 2×2 superpatches hold one class).

    segcompress policy --layout ade20k --root data/ade20k --crop 512 --iters 50000 \\
        --out models/ade20k/vit-s/cts-policy.safetensors
    segcompress policy --model models/ade20k/vit-s/dense.safetensors --layout ade20k --root data/ade20k \\
        --img-scale 2048 512 --recipe '{"iters": 100, "batch_size": 8}' --out cts-policy.safetensors

The policy is trained separately, before (or beside) the segmenter, as in CTS: AdamW (lr 5e-5,
weight decay 1e-3), batch 8, cross-entropy with ignore 255 on targets derived from the labels
(1 if a 2p×2p region holds one class; ADE20K ignores border regions with one class plus ignore).
Inputs are Segmenter's training crops (``build_dataset(mode="train")``), a superset of the
reference's flip-only augmentation. ``--model`` only supplies the crop and patch size.

The backbone starts from ``--pretrained`` (or the recipe's ``pretrained``, the config's
``methods.cts.policy.pretrained``): ``timm`` (timm's ImageNet ``efficientnet_lite0`` weights, as
the reference; needs the network or a cache), a local ``.safetensors``/``.pth`` state dict of that
model, or null/``none`` (random init, the default: nothing can be downloaded offline). The policy
file's metadata records it as ``policy_init`` (``random``, ``timm:efficientnet_lite0`` or
``file:<path>``), so a report can say whether the policy was random-initialised.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from segcompress.commands._conventions import (
    add_crop_argument, add_device_argument, add_photometric_argument, crop_hw, resolve_device
)

log = logging.getLogger("segcompress.policy")

RECIPE_DEFAULTS: dict[str, Any] = {
    "iters": 50000, "batch_size": 8, "lr": 5e-5, "weight_decay": 1e-3, "num_workers": 0, "log_every": 50,
    "pretrained": None,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layout", required=True, help="dataset layout: ade20k or cityscapes")
    parser.add_argument("--root", required=True, type=Path, help="dataset root folder")
    parser.add_argument("--split", default="train", help="split to train on (default: train)")
    parser.add_argument("--model", type=Path, metavar="CKPT", help="segmenter whose crop and patch size to use")
    add_crop_argument(parser, help="training crop (without --model)")
    parser.add_argument("--patch-size", type=int, default=16, help="ViT patch size (without --model; default 16)")
    parser.add_argument("--img-scale", type=int, nargs=2, metavar=("LONG", "SHORT"),
                        help="resize scale (default: Segmenter's for the layout, scaled to the crop)")
    parser.add_argument("--recipe", default="{}", help="JSON overrides of " + ", ".join(sorted(RECIPE_DEFAULTS)))
    parser.add_argument("--iters", type=int, default=None, help="optimisation steps (overrides the recipe)")
    parser.add_argument("--border-ignore", action=argparse.BooleanOptionalAction, default=None,
                        help="ignore border regions with one class plus ignore (default: ADE20K yes, Cityscapes no)")
    parser.add_argument("--pretrained", metavar="SOURCE",
                        help="initial backbone weights (overrides the recipe's 'pretrained'): timm (timm's "
                             "ImageNet efficientnet_lite0; needs the network or a cache), a local "
                             ".safetensors/.pth file, or none (random init; the default)")
    parser.add_argument("--max-images", type=int, default=None, help="train on the first N images only")
    add_photometric_argument(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    add_device_argument(parser)
    parser.add_argument("--out", required=True, type=Path, help="policy weights (.safetensors)")


def default_img_scale(layout: str, crop: tuple[int, int]) -> tuple[int, int]:
    """Segmenter's resize scale for the layout, scaled with the crop (ADE20K 2048x512 @512, Cityscapes 2048x1024 @768)."""
    s = min(crop)
    if layout == "cityscapes":
        return round(2048 * s / 768), round(1024 * s / 768)
    return 4 * s, s


def main(args: argparse.Namespace) -> int:
    import torch

    from segcompress.commands._model_options import parse_json_arg, require_safetensors_out
    from segcompress.data.datasets import build_dataset, collate_train, seed_worker
    from segcompress.seeding import seed_everything
    from segcompress.tokens.cts import PolicyNet, policy_metadata, save_policy, train_policy

    if args.threads:
        torch.set_num_threads(args.threads)
    require_safetensors_out(args.out)
    recipe = dict(RECIPE_DEFAULTS)
    overrides = parse_json_arg(args.recipe, "--recipe")
    unknown = sorted(set(overrides) - set(RECIPE_DEFAULTS))
    if unknown:
        raise ValueError(f"--recipe: unknown key(s) {', '.join(unknown)} (allowed: {', '.join(sorted(RECIPE_DEFAULTS))})")
    recipe.update(overrides)
    if args.iters is not None:
        recipe["iters"] = args.iters
    if args.pretrained is not None:
        recipe["pretrained"] = None if args.pretrained.lower() in ("none", "null") else args.pretrained
    if recipe["pretrained"] is not None and not isinstance(recipe["pretrained"], str):
        raise ValueError(f"--recipe: 'pretrained' must be \"timm\", a file path or null, got {recipe['pretrained']!r}")
    if args.model is not None:
        from segcompress.models.checkpoint import spec_path
        from segcompress.models.spec import SegmenterSpec

        spec = SegmenterSpec.load(spec_path(args.model))
        crop, patch = spec.crop, spec.patch_size
    elif args.crop is not None:
        crop = crop_hw(args.crop)
        patch = args.patch_size
    else:
        raise ValueError("give --model or --crop")
    img_scale = tuple(args.img_scale) if args.img_scale else default_img_scale(args.layout, crop)
    border_ignore = args.border_ignore if args.border_ignore is not None else args.layout == "ade20k"
    device = resolve_device(args.device)

    seed_everything(args.seed)
    policy = PolicyNet(pretrained=recipe["pretrained"])  # first: a bad weights file fails before any work
    ds = build_dataset(args.layout, args.root, args.split, mode="train", crop=list(crop), img_scale=img_scale,
                       max_images=args.max_images, photometric=args.photometric)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=int(recipe["batch_size"]), shuffle=True, drop_last=len(ds) >= int(recipe["batch_size"]),
        collate_fn=collate_train, num_workers=int(recipe["num_workers"]), worker_init_fn=seed_worker,
        generator=torch.Generator().manual_seed(args.seed),
    )
    every = max(1, int(recipe["log_every"]))

    def on_step(step: int, loss: float) -> None:
        if step % every == 0 or step + 1 == recipe["iters"]:
            log.info("step %d/%d loss %.4f", step + 1, recipe["iters"], loss)

    log.info("training the CTS policy net (%s init): %d steps, crop %s, patch %d, %d images on %s",
             policy.init, recipe["iters"], list(crop), patch, len(ds), device)
    losses = train_policy(policy, loader, int(recipe["iters"]), patch_size=patch, border_ignore=border_ignore,
                          lr=float(recipe["lr"]), weight_decay=float(recipe["weight_decay"]), device=device,
                          on_step=on_step)
    meta = policy_metadata(layout=args.layout, crop=list(crop), patch_size=patch, iters=recipe["iters"],
                           seed=args.seed, border_ignore=border_ignore, final_loss=losses[-1] if losses else None)
    save_policy(policy.cpu(), args.out, meta)
    log.info("wrote %s", args.out)
    return 0
