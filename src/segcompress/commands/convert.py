"""``segcompress convert``: import a released Segmenter checkpoint as a project model.

``--format mmseg``: an mmsegmentation Segmenter ``.pth`` (architecture read off the weights; heads
are width // 64 unless ``--backbone``/``--num-heads`` say otherwise).
``--format segmenter``: the original code's ``checkpoint.pth`` with ``variant.yml`` (by default the
one beside the checkpoint).
Writes ``--out`` (.safetensors) and its ``.json`` spec, atomically, and prints a JSON summary.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from segcompress.commands._conventions import add_crop_argument
from segcompress.commands._model_options import require_safetensors_out
from segcompress.convert import FORMATS, import_checkpoint
from segcompress.flops import count_params
from segcompress.models.checkpoint import save_model, spec_path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", required=True, choices=FORMATS, help="checkpoint format")
    parser.add_argument("--checkpoint", required=True, type=Path, help="the released .pth file")
    parser.add_argument("--variant", type=Path, help="original format: variant.yml (default: beside the checkpoint)")
    parser.add_argument("--num-classes", type=int, metavar="K", help="check the number of classes")
    add_crop_argument(parser, help="crop to build the model for (default: the checkpoint's; position embeddings "
                                   "are resized)")
    parser.add_argument("--backbone", metavar="NAME", help="timm name of the encoder architecture (checked)")
    parser.add_argument("--num-heads", type=int, help="encoder heads when not width // 64 (no --variant)")
    parser.add_argument("--decoder-heads", type=int, help="mmseg: decoder heads when not width // 64")
    parser.add_argument("--out", required=True, type=Path, help="output model, models/.../NAME.safetensors")


def main(args: argparse.Namespace) -> int:
    require_safetensors_out(args.out)
    model = import_checkpoint(
        args.format, args.checkpoint, variant=args.variant, num_classes=args.num_classes, crop=args.crop,
        backbone=args.backbone, num_heads=args.num_heads, decoder_heads=args.decoder_heads,
    )
    save_model(model, args.out, metadata={"source": str(args.checkpoint), "format": args.format})
    print(json.dumps({
        "out": str(args.out),
        "spec": str(spec_path(args.out)),
        "format": args.format,
        "source": str(args.checkpoint),
        "params_m": round(count_params(model) / 1e6, 6),
        **{k: v for k, v in model.spec.to_dict().items() if k != "blocks"},
    }, indent=2))
    return 0
