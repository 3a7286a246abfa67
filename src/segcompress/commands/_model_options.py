"""Command-line options shared by the verbs that measure a model variant (``flops``, ``bench``).

A variant is a model (a saved checkpoint, a config backbone entry, or a timm architecture) plus a
token method and its knob, attached through :func:`segcompress.methods.apply_method`.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from segcompress.commands._conventions import add_crop_argument, crop_hw, parse_json_arg  # noqa: F401 (re-export)
from segcompress.models.spec import SegmenterSpec


@dataclass
class Variant:
    """A model variant as selected on the command line.

    Args:
        model: the Segmenter with the method attached, in eval mode.
        spec: its architecture.
        method: method name (``dense`` for none).
        knob: the method's knob.
        source: where the weights came from (a checkpoint path, or ``random init (seed S)``).
    """

    model: nn.Module
    spec: SegmenterSpec
    method: str
    knob: dict[str, Any] = field(default_factory=dict)
    source: str = "random init"

    def describe(self) -> dict[str, Any]:
        """The fields every measuring verb reports about the variant."""
        h, w = self.spec.crop
        return {
            "method": self.method,
            "knob": self.knob,
            "backbone": self.spec.backbone,
            "num_classes": self.spec.num_classes,
            "crop": [h, w],
            "weights": self.source,
        }


def require_safetensors_out(out: Path, option: str = "--out") -> None:
    """Fail before any work when ``option`` does not name a ``.safetensors`` file (the model format)."""
    if out.suffix != ".safetensors":
        raise ValueError(f"{option} {out}: must end in .safetensors")


def add_model_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """Options that select the model, the method and (for input-dependent methods) calibration images.

    ``required=False`` lets a verb offer another way to name its models (``bench --variant``); it
    then checks that one was given.
    """
    src = parser.add_argument_group("model (one of --model, --arch, --backbone)")
    which = src.add_mutually_exclusive_group(required=required)
    which.add_argument("--model", type=Path, metavar="CKPT", help="a saved model (.safetensors with its .json spec)")
    which.add_argument("--arch", metavar="JSON", help="a config backbones entry, inline JSON or a .json file")
    which.add_argument("--backbone", metavar="NAME", help="a timm ViT name, e.g. vit_small_patch16_384")
    src.add_argument("--num-classes", type=int, metavar="K", help="classes (with --arch/--backbone)")
    add_crop_argument(src, help="training crop (with --arch/--backbone)")
    meth = parser.add_argument_group("method")
    meth.add_argument("--method", default="dense", help="token method (default: dense)")
    meth.add_argument("--knob", default=None, metavar="JSON", help='the method\'s knob, e.g. \'{"r": 8}\'')
    cal = parser.add_argument_group("calibration images (input-dependent methods)")
    cal.add_argument("--calib-root", type=Path, metavar="DIR", help="dataset root to draw calibration images from")
    cal.add_argument("--calib-layout", default="ade20k", metavar="L", help="dataset layout (ade20k, cityscapes)")
    cal.add_argument("--calib-split", default="val", help="split to draw from (default: val)")
    cal.add_argument("--calib-images", type=int, default=16, metavar="N", help="number of calibration images")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the random weights of --arch/--backbone and of the random input when no "
                             "images are given (default: 0), so repeated calls count the same model")


def spec_and_model(args: argparse.Namespace) -> tuple[SegmenterSpec, nn.Module, str]:
    """The dense model the options select: (spec, model, weights source).

    ``--arch``/``--backbone`` models get random weights drawn from ``--seed`` (the global torch
    generator is left as it was), so an input-dependent method's FLOPs are repeatable.
    """
    from segcompress.models.checkpoint import load_model
    from segcompress.models.segmenter import build_segmenter
    from segcompress.models.spec import spec_from_arch, spec_from_timm
    from segcompress.seeding import preserved_global_rng

    if args.model is not None:
        model = load_model(args.model)
        spec = model.spec
        if args.num_classes is not None and args.num_classes != spec.num_classes:
            raise ValueError(f"--num-classes {args.num_classes} but {args.model} has {spec.num_classes} classes")
        if args.crop is not None and crop_hw(args.crop) != spec.crop:
            raise ValueError(f"--crop {args.crop} but {args.model} was built for crop {list(spec.crop)}")
        return spec, model, str(args.model)
    if args.num_classes is None or args.crop is None:
        raise ValueError("--arch/--backbone need --num-classes and --crop")
    if args.arch is not None:
        spec, _pretrained = spec_from_arch(parse_json_arg(args.arch, "--arch"), args.num_classes, args.crop)
    else:
        spec = spec_from_timm(args.backbone, args.num_classes, args.crop)
    with preserved_global_rng():
        torch.manual_seed(args.seed)
        model = build_segmenter(spec)
    return spec, model, f"random init (seed {args.seed})"


def variant_from_args(args: argparse.Namespace) -> Variant:
    """Build the selected model and attach ``--method`` with ``--knob``; eval mode."""
    from segcompress.methods import apply_method

    spec, model, source = spec_and_model(args)
    knob = parse_json_arg(args.knob, "--knob")
    model = apply_method(model.eval(), args.method, knob).eval()
    return Variant(model=model, spec=spec, method=args.method, knob=knob, source=source)


def random_image(spec: SegmenterSpec, batch: int = 1, seed: int = 0) -> torch.Tensor:
    """A seeded random normalised input (batch, 3, H, W) at the spec's crop."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, *spec.crop, generator=gen)


def calibration_images(args: argparse.Namespace, spec: SegmenterSpec) -> Iterator[torch.Tensor]:
    """Up to ``--calib-images`` normalised images (1, 3, H, W), each resized to the crop.

    As ALGM's FLOPs script: every image is resized (aspect distorted) to crop×crop, batch 1
    (:func:`segcompress.tokens.cost.image_crops`, which evaluation uses on each condition's images).
    """
    from segcompress.tokens.cost import image_crops

    yield from image_crops(args.calib_layout, args.calib_root, args.calib_split, spec.crop, args.calib_images)
