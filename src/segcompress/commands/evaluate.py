"""``segcompress evaluate``: sliding-window mIoU of one model variant on one dataset split.

Writes one results row (JSON, atomically): the row's tags (``--tag key=value``; values are parsed
as JSON when they can be, so ``severity=3`` is a number), the measured metrics (percent), the
per-class IoU, ``num_images``, ``seconds`` and the hardware and software versions. Metrics are
fractions in [0, 1]. ``--match FILE`` (a ``segcompress match`` result) supplies the knob and the
target / achieved GFLOPs columns.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Columns of docs/contracts.md ("Results rows"), in order; unknown ones stay None.
ROW_COLUMNS = (
    "dataset", "backbone", "method", "knob", "target_fraction", "target_gflops", "achieved_gflops", "gflops_std",
    "params_m", "corruption", "category", "severity", "seed", "miou", "aacc", "macc", "num_images",
    "device", "torch", "timm",
)
# Columns evaluate measures or takes from its own arguments; tags may set every other one (a pruned
# model's row, for instance, sets method=nvit while --method is dense).
RESERVED = {"params_m", "miou", "aacc", "macc", "num_images", "per_class_iou", "per_class_acc", "seconds",
            "device", "torch", "timm", "python", "split", "crop", "stride", "img_scale", "model", "img_root"}
MATCH_COLUMNS = ("target_fraction", "target_gflops", "achieved_gflops", "gflops_std")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, type=Path, help="checkpoint .safetensors (spec .json beside it)")
    parser.add_argument("--method", default="dense", help="token method to attach (default: dense)")
    parser.add_argument("--knob", default=None,
                        help='method knob as JSON (e.g. \'{"r": 8}\'), or @FILE: a JSON file (its "knob" key if any)')
    parser.add_argument("--match", type=Path,
                        help="a match result (JSON): its knob (unless --knob is given) and its target_fraction, "
                             "target_gflops, achieved_gflops and gflops_std go into the row")
    parser.add_argument("--layout", required=True, choices=["ade20k", "cityscapes"])
    parser.add_argument("--root", required=True, type=Path, help="dataset root (labels, and images unless --img-root)")
    parser.add_argument("--img-root", type=Path, help="read images from here (corrupted set; same paths, .png)")
    parser.add_argument("--split", default="val", help="split (default: val)")
    parser.add_argument("--crop", type=int, help="window size (default and required: the model's crop)")
    parser.add_argument("--stride", type=int, help="window stride (default: max(crop - 32, crop // 2))")
    parser.add_argument("--img-scale", required=True, type=int, nargs=2, metavar=("LONG", "SHORT"),
                        help="keep-ratio resize scale of test images (ADE20K: 2048 512; Cityscapes: 2048 1024)")
    parser.add_argument("--out", required=True, type=Path, help="results row (JSON)")
    parser.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE", help="row column (repeatable)")
    parser.add_argument("--max-images", type=int, help="evaluate the first N images only")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default: 8)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers (default: 0)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def parse_tags(tags: list[str]) -> dict[str, Any]:
    """``["severity=3", "corruption=fog"]`` -> ``{"severity": 3, "corruption": "fog"}``."""
    out: dict[str, Any] = {}
    for tag in tags:
        key, sep, value = tag.partition("=")
        if not sep or not key:
            raise ValueError(f"--tag {tag!r}: expected KEY=VALUE")
        if key in RESERVED:
            raise ValueError(f"--tag {key}: evaluate sets this column itself; remove the tag")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def parse_knob(text: str) -> dict[str, Any]:
    """A knob from JSON text, or from a JSON file (``@FILE`` or a path ending in ``.json``; the
    file's ``knob`` entry when it has one)."""
    if text.startswith("@") or (not text.lstrip().startswith("{") and text.endswith(".json")):
        from segcompress.io import read_json

        path = text[1:] if text.startswith("@") else text
        data = read_json(path)
        knob = data.get("knob", data) if isinstance(data, dict) else data
        where = path
    else:
        try:
            knob = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"--knob {text!r}: not valid JSON ({e})") from None
        where = "--knob"
    if isinstance(knob, str):  # a knob stored as a JSON string (results rows do this)
        knob = json.loads(knob)
    if not isinstance(knob, dict):
        raise ValueError(f"{where}: the knob must be a JSON object, got {type(knob).__name__}")
    return knob


def main(args: argparse.Namespace) -> int:
    import torch

    from segcompress.data.datasets import build_dataset
    from segcompress.data.layouts import get_layout
    from segcompress.evaluate import environment, evaluate
    from segcompress.io import read_json, write_json
    from segcompress.methods import apply_method
    from segcompress.models.checkpoint import load_model

    tags = parse_tags(args.tag)
    match: dict[str, Any] = {}
    if args.match is not None:
        match = read_json(args.match)
        if not isinstance(match, dict):
            raise ValueError(f"{args.match}: a match result must be a JSON object")
    if args.knob is not None:
        knob = parse_knob(args.knob)
    elif "knob" in match:
        knob = parse_knob(f"@{args.match}")
    else:
        knob = {}
    layout = get_layout(args.layout)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")

    model = load_model(args.model, map_location=device)
    spec = model.spec
    if spec.num_classes != layout.num_classes:
        raise ValueError(
            f"{args.model}: model predicts {spec.num_classes} classes but {args.layout} has {layout.num_classes}"
        )
    crop = spec.crop
    if args.crop is not None and (args.crop, args.crop) != crop:
        raise ValueError(f"--crop {args.crop}: the model {args.model} runs on {crop[0]}x{crop[1]} crops")
    stride = args.stride if args.stride is not None else max(min(crop) - 32, min(crop) // 2)
    model = apply_method(model, args.method, knob).to(device).eval()
    params_m = sum(p.numel() for p in model.parameters()) / 1e6

    dataset = build_dataset(
        args.layout, args.root, args.split, "test", crop, args.img_scale, img_root=args.img_root,
        max_images=args.max_images,
    )
    log.info("evaluating %s (%s %s) on %d %s images, crop %s stride %d", args.model, args.method, knob,
             len(dataset), args.split, crop, stride)
    result = evaluate(model, dataset, crop, stride, layout.num_classes, batch_size=args.batch_size, device=device,
                      num_workers=args.workers, progress=not args.no_progress)

    row: dict[str, Any] = dict.fromkeys(ROW_COLUMNS)
    row.update(
        dataset=args.layout, backbone=spec.backbone, method=args.method, knob=json.dumps(knob, sort_keys=True),
        corruption="clean" if args.img_root is None else None, severity=0 if args.img_root is None else None,
    )
    row.update({k: match[k] for k in MATCH_COLUMNS if k in match})
    row.update(tags)
    row.update(
        params_m=params_m, miou=result["miou"], aacc=result["aacc"], macc=result["macc"],
        num_images=result["num_images"], **environment(device),
        seconds=result["seconds"], split=args.split, crop=list(crop), stride=stride, img_scale=list(args.img_scale),
        model=str(args.model), img_root=None if args.img_root is None else str(args.img_root),
        per_class_iou=result["iou"], per_class_acc=result["acc"],
    )
    write_json(args.out, row)
    log.info("%s: mIoU %.2f%% aAcc %.2f%% mAcc %.2f%% (%d images, %.1f s)", args.out, *(
        100 * (row[k] if row[k] is not None else float("nan")) for k in ("miou", "aacc", "macc")),
        row["num_images"], row["seconds"])
    return 0
