"""``segcompress policy``: train a token method's policy on a dense model, once per dense model.

    segcompress policy --method cts --layout ade20k --root data/ade20k --crop 512 --iters 50000 \\
        --out models/ade20k/vit-s/cts-policy.safetensors
    segcompress policy --method dtop --model models/ade20k/vit-s/dense.safetensors --layout ade20k \\
        --root data/ade20k --settings '{"policy": {"iters": 2000}}' --out dtop-policy.safetensors

A *policy* is the network a token method decides with, trained apart from the Segmenter and kept in
its own file (the knob's ``policy_file``):

* **cts**: the policy net that picks the superpatches (:func:`segcompress.methods.cts.train_policy`).
  Trained as in CTS: AdamW (lr 5e-5, weight decay 1e-3), batch 8, cross-entropy with ignore 255
  on targets derived from the labels (1 if a 2p×2p region holds one class; ADE20K ignores border
  regions with one class plus ignore). ``--model`` only supplies the crop and patch size. The
  backbone starts from ``--pretrained`` (or the recipe's ``pretrained``): ``timm`` (ImageNet
  ``efficientnet_lite0``, as the reference; needs the network or a cache), a local
  ``.safetensors``/``.pth`` state dict, or null/``none`` (random init, the default: nothing can
  be downloaded offline); the file's metadata records it as ``policy_init``.
* **dtop**: the auxiliary heads, trained on the frozen dense model ``--model`` (required) with nothing exiting
  (:mod:`segcompress.tokens.dtop_train`); their shape comes from ``--settings`` (split, head_dim,
  head_layers, head_dropout).

Inputs are Segmenter's training crops (``build_dataset(mode="train")``). The recipe is the
method's defaults, then ``--settings``' ``policy`` entry (the config's ``methods.<name>.policy``),
then ``--recipe``, then ``--iters``.
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", default="cts", help="the token method whose policy to train (cts, dtop; default cts)")
    parser.add_argument("--settings", default="{}", metavar="JSON",
                        help="the method's settings (the config's methods.<name>), inline JSON or a .json file")
    parser.add_argument("--layout", required=True, help="dataset layout: ade20k or cityscapes")
    parser.add_argument("--root", required=True, type=Path, help="dataset root folder")
    parser.add_argument("--split", default="train", help="split to train on (default: train)")
    parser.add_argument("--model", type=Path, metavar="CKPT",
                        help="the dense segmenter (dtop: trained on; cts: its crop and patch size)")
    add_crop_argument(parser, help="training crop (without --model)")
    parser.add_argument("--patch-size", type=int, default=16, help="ViT patch size (without --model; default 16)")
    parser.add_argument("--img-scale", type=int, nargs=2, metavar=("LONG", "SHORT"),
                        help="resize scale (default: Segmenter's for the layout, scaled to the crop)")
    parser.add_argument("--recipe", default="{}", help="JSON overrides of the method's policy recipe")
    parser.add_argument("--iters", type=int, default=None, help="optimisation steps (overrides the recipe)")
    parser.add_argument("--border-ignore", action=argparse.BooleanOptionalAction, default=None,
                        help="cts: ignore border regions with one class plus ignore (default: ADE20K yes, Cityscapes no)")
    parser.add_argument("--pretrained", metavar="SOURCE",
                        help="cts: initial backbone weights (overrides the recipe's 'pretrained'): timm (timm's "
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


def policy_recipe(defaults: dict[str, Any], *layers: tuple[dict[str, Any], str]) -> dict[str, Any]:
    """``defaults`` updated by each (overrides, source) in turn; unknown keys are refused by source."""
    recipe = dict(defaults)
    for overrides, source in layers:
        unknown = sorted(set(overrides) - set(defaults))
        if unknown:
            raise ValueError(f"{source}: unknown key(s) {', '.join(unknown)} (allowed: {', '.join(sorted(defaults))})")
        recipe.update(overrides)
    return recipe


def main(args: argparse.Namespace) -> int:
    import torch

    from segcompress import methods
    from segcompress.commands._model_options import parse_json_arg, require_safetensors_out
    from segcompress.data.datasets import build_dataset, collate_train, seed_worker
    from segcompress.seeding import seed_everything

    if args.threads:
        torch.set_num_threads(args.threads)
    require_safetensors_out(args.out)
    method = methods.get(args.method)
    if not method.needs_policy:
        raise ValueError(f"--method {args.method} has no policy to train (choose one of "
                         f"{', '.join(methods.names(needs_policy=True))})")
    code = method.code()
    settings = method.parse_settings(parse_json_arg(args.settings, "--settings"))
    recipe = policy_recipe(code.POLICY_RECIPE, (dict(getattr(settings, "policy", {}) or {}), f"methods.{args.method}.policy"),
                           (parse_json_arg(args.recipe, "--recipe"), "--recipe"))
    if args.iters is not None:
        recipe["iters"] = args.iters
    options = {"border_ignore": args.border_ignore, "pretrained": args.pretrained}
    given = [f"--{k.replace('_', '-')}" for k, v in options.items() if v is not None and k not in code.POLICY_OPTIONS]
    if given:
        raise ValueError(f"{', '.join(given)}: not an option of {args.method}'s policy")
    if args.model is not None:
        from segcompress.models.checkpoint import spec_path
        from segcompress.models.spec import SegmenterSpec

        spec = SegmenterSpec.load(spec_path(args.model))
        crop, patch = tuple(spec.crop), spec.patch_size
    elif args.crop is not None:
        crop, patch = crop_hw(args.crop), args.patch_size
    else:
        raise ValueError("give --model (or, for cts, --crop)")
    img_scale = tuple(args.img_scale) if args.img_scale else default_img_scale(args.layout, crop)
    device = resolve_device(args.device)
    seed_everything(args.seed)

    def batches() -> Any:
        ds = build_dataset(args.layout, args.root, args.split, mode="train", crop=list(crop), img_scale=img_scale,
                           max_images=args.max_images, photometric=args.photometric)
        size = int(recipe["batch_size"])
        log.info("%d training images, crop %s, patch %d, on %s", len(ds), list(crop), patch, device)
        return torch.utils.data.DataLoader(
            ds, batch_size=size, shuffle=True, drop_last=len(ds) >= size, collate_fn=collate_train,
            num_workers=int(recipe["num_workers"]), worker_init_fn=seed_worker,
            generator=torch.Generator().manual_seed(args.seed),
        )

    every, iters = max(1, int(recipe["log_every"] or 0) or 1), int(recipe["iters"])

    def on_step(step: int, loss: float) -> None:
        if (recipe["log_every"] and step % every == 0) or step + 1 == iters:
            log.info("step %d/%d loss %.4f", step + 1, iters, loss)

    meta = {"layout": args.layout, "crop": list(crop), "patch_size": patch, "iters": iters, "seed": args.seed,
            "recipe": recipe}
    what = code.train_policy(
        args.model, batches, recipe, settings, seed=args.seed, device=device, on_step=on_step, out=args.out,
        metadata=meta, options={"layout": args.layout, "patch_size": patch, **options},
    )
    log.info("wrote %s (%s)", args.out, what)
    return 0
