"""``segcompress qualitative``: prediction panels of several variants on a few images (Fig. 3).

Each ``--variant LABEL MODEL METHOD MATCH`` is one column: a checkpoint, the token method applied
to it (``dense`` for none; a pruned model is ``dense``) and a match result whose ``knob`` is used
(``-`` for none). Its achieved GFLOPs, when the match file has them, go into the column title.
Images are the first ``--images`` of the split (clean, or corrupted with ``--img-root``), run with
the evaluation's sliding windows; the zoom box is picked on the ground truth
(:mod:`segcompress.qualitative`). Writes the PNG (and ``--pdf``) atomically.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from segcompress.commands._conventions import add_device_argument

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--variant", nargs=4, action="append", required=True,
                        metavar=("LABEL", "MODEL", "METHOD", "MATCH"),
                        help="one column: title, checkpoint, token method (dense for none), match JSON or -")
    parser.add_argument("--layout", required=True, choices=["ade20k", "cityscapes"])
    parser.add_argument("--root", required=True, type=Path, help="dataset root (labels, and images unless --img-root)")
    parser.add_argument("--img-root", type=Path, help="read images from here (corrupted set; same paths, .png)")
    parser.add_argument("--split", default="val", help="split (default: val)")
    parser.add_argument("--stride", type=int, help="window stride (default: max(crop - 32, crop // 2))")
    parser.add_argument("--img-scale", required=True, type=int, nargs=2, metavar=("LONG", "SHORT"),
                        help="keep-ratio resize scale of test images")
    parser.add_argument("--images", type=int, default=2, help="the first N images of the split (default: 2)")
    parser.add_argument("--zoom", type=float, default=0.35, help="zoom box side as a fraction of the short side")
    parser.add_argument("--title", default=None, help="figure title")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default: 8)")
    add_device_argument(parser)
    parser.add_argument("--out", required=True, type=Path, help="panel PNG")
    parser.add_argument("--pdf", type=Path, help="also write the panel as PDF")


def _gflops_text(match: dict) -> str:
    """The title's cost line: the achieved GFLOPs, and a flag when the match missed its target."""
    g = match.get("achieved_gflops")
    text = f"\n{g:.3g} GFLOPs" if isinstance(g, (int, float)) else ""
    if match.get("within_tolerance") is False:
        frac = match.get("achieved_fraction")
        text += "\ntarget not reached" + (f" ({frac:.2f} of dense)" if isinstance(frac, (int, float)) else "")
    return text


def main(args: argparse.Namespace) -> int:
    import torch

    from segcompress.commands._conventions import resolve_device
    from segcompress.commands._evaluation import default_stride, knob_of, load_variant, read_match
    from segcompress.data.datasets import build_dataset
    from segcompress.evaluate import predict
    from segcompress.qualitative import Example, denormalise, render, zoom_box

    if args.images < 1:
        raise ValueError(f"--images must be >= 1, got {args.images}")
    device = resolve_device(args.device)
    titles: list[str] = []
    models = []
    for label, model_path, method, match_path in args.variant:
        match_file = None if match_path == "-" else Path(match_path)
        match = read_match(match_file)
        knob = knob_of(None, match_file, match)
        model, num_classes = load_variant(Path(model_path), method, knob, args.layout, device)
        models.append(model)
        titles.append(label + _gflops_text(match))
    crops = {tuple(m.spec.crop) for m in models}
    if len(crops) != 1:
        raise ValueError(f"--variant models run on different crops {sorted(crops)}; a panel needs one")
    crop = crops.pop()
    stride = default_stride(crop) if args.stride is None else args.stride
    dataset = build_dataset(args.layout, args.root, args.split, "test", crop, args.img_scale, img_root=args.img_root,
                            max_images=args.images)
    examples = []
    for i in range(min(args.images, len(dataset))):
        item = dataset[i]
        label = item["label"]
        ex = Example(name=str(item["name"]), image=denormalise(item["image"], label.shape), label=label.numpy())
        ex.box = zoom_box(ex.label, args.zoom)
        image = item["image"].to(device)
        with torch.inference_mode():
            for model in models:
                ex.predictions.append(predict(model, image, label.shape, crop, stride, args.batch_size).cpu().numpy())
        examples.append(ex)
    if not examples:
        raise ValueError(f"{args.root}: no {args.split} images found")
    render(examples, titles, num_classes, args.out, args.pdf, args.title)
    log.info("wrote %s (%d images x %d variants)", args.out, len(examples), len(models))
    return 0
