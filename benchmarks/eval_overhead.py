"""How close sliding-window evaluation runs to the model's pure forward throughput.

In one run: a synthetic val set is written to a temporary folder
(:func:`segcompress.data.synthetic.generate`), evaluated whole with
:func:`segcompress.evaluate.evaluate` (data loading, windows, stitching, resize, argmax, metric),
and the same windows, cut out beforehand and held in memory, are pushed through the model alone in
the same batches. Prints windows/s of both and their ratio (evaluation ÷ forward; 1.0 = no
overhead; also with this process's CPU time, which other processes on a shared machine perturb
far less), then where the difference goes, each stage timed on its own on the same images:
data loading, the windows (their forward passes, and stitching them into averaged logits), the
resize of those to the label size, the class index (argmax) and the metric.

    .venv/bin/python benchmarks/eval_overhead.py                  # the default study's setting
    .venv/bin/python benchmarks/eval_overhead.py --backbone vit_tiny_patch16_384 --crop 512 \\
        --img-scale 2048 512 --stride 480 --num-val 4             # Segmenter's ADE20K protocol

The model is randomly initialised (speed does not depend on the weights); its default is the
default study's backbone (config.yaml ``vit_p8_d12``: patch 8, width 64, depth 12, 2 heads).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

import torch


def build_model(backbone: str | None, num_classes: int, crop: int) -> torch.nn.Module:
    """A randomly initialised Segmenter: timm ``backbone``, or the default study's ``vit_p8_d12``."""
    from segcompress.models import build_segmenter
    from segcompress.models.spec import SegmenterSpec, spec_from_timm

    torch.manual_seed(0)
    if backbone:
        spec = spec_from_timm(backbone, num_classes, crop)
    else:
        spec = SegmenterSpec(num_classes=num_classes, img_size=[crop, crop], patch_size=8, embed_dim=64, depth=12,
                             num_heads=2, drop_path_rate=0.0, decoder_dropout=0.0)
    return build_segmenter(spec).eval()


def window_batches(dataset: Any, crop: int, stride: int, batch: int) -> list[torch.Tensor]:
    """Every image's sliding windows, batched as evaluation batches them (per image, ``batch`` at most)."""
    from segcompress.evaluate import sliding_windows

    out = []
    for i in range(len(dataset)):
        image, boxes = sliding_windows(dataset[i]["image"], crop, stride)
        crops = [image[:, :, y:y + crop, x:x + crop] for y, x in boxes]
        out.extend(torch.cat(crops[j:j + batch]) for j in range(0, len(crops), batch))
    return out


def clocked(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def forward_all(model: torch.nn.Module, batches: list[torch.Tensor]) -> None:
    """Run the model on every batch (inference mode)."""
    with torch.inference_mode():
        for x in batches:
            model(x)


def stage_times(model: torch.nn.Module, dataset: Any, crop: int, stride: int, batch: int,
                num_classes: int) -> dict[str, float]:
    """Seconds per stage of evaluation over the whole dataset, summed over its images: loading, then
    per image the steps of :func:`segcompress.evaluate.predict` (windows, resize, argmax) and the
    metric."""
    from segcompress.evaluate import SegMetric, first_max_class, resize_logits, slide_inference

    def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
        t0 = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - t0

    items, load = timed(lambda: [dataset[i] for i in range(len(dataset))])
    metric = SegMetric(num_classes)
    seconds = dict.fromkeys(("slide_s", "resize_s", "argmax_s", "metric_s"), 0.0)
    for it in items:  # one image at a time, as evaluation holds them
        logits, t = timed(lambda: slide_inference(model, it["image"], crop, stride, batch))
        seconds["slide_s"] += t
        resized, t = timed(lambda: resize_logits(logits, it["label"].shape))
        seconds["resize_s"] += t
        pred, t = timed(lambda: first_max_class(resized))
        seconds["argmax_s"] += t
        _, t = timed(lambda: metric.update(pred, it["label"], it["name"]))
        seconds["metric_s"] += t
    return {"load_s": load, **seconds}


def main(argv: list[str] | None = None) -> int:
    from segcompress.bench import add_allocator_argument, use_allocator
    from segcompress.data.datasets import build_dataset
    from segcompress.data.synthetic import generate
    from segcompress.evaluate import evaluate

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default=None, help="timm ViT name (default: the default study's vit_p8_d12)")
    p.add_argument("--layout", default="ade20k", choices=["ade20k", "cityscapes"])
    p.add_argument("--num-classes", type=int, default=150)
    p.add_argument("--crop", type=int, default=128)
    p.add_argument("--stride", type=int, default=96)
    p.add_argument("--img-scale", type=int, nargs=2, default=[512, 128], metavar=("LONG", "SHORT"))
    p.add_argument("--num-val", type=int, default=16, help="synthetic val images")
    p.add_argument("--batch", type=int, default=8, help="windows per forward pass")
    p.add_argument("--repeats", type=int, default=3, help="(evaluation, forward) pairs; medians are printed")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="also write the result to this file")
    add_allocator_argument(p)
    args = p.parse_args(argv)
    allocator = use_allocator(args.allocator)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_model(args.backbone, args.num_classes, args.crop)
    with tempfile.TemporaryDirectory(prefix="eval_overhead_") as root:
        generate(args.layout, root, num_train=0, num_val=args.num_val, seed=0, progress=False)
        ds = build_dataset(args.layout, root, "val", "test", args.crop, args.img_scale)
        batches = window_batches(ds, args.crop, args.stride, args.batch)
        windows = sum(len(b) for b in batches)
        print(f"# {args.backbone or 'vit_p8_d12'} crop {args.crop} stride {args.stride} img_scale {args.img_scale} "
              f"{len(ds)} images {windows} windows batch {args.batch} threads {torch.get_num_threads()} "
              f"allocator {allocator}", flush=True)
        forward_all(model, batches[:1])  # warm-up
        evals, forwards = [], []
        for _ in range(args.repeats):  # interleaved, so that load drifts hit both alike
            evals.append(clocked(lambda: evaluate(model, ds, args.crop, args.stride, args.num_classes, args.batch,
                                                  progress=False)))
            forwards.append(clocked(lambda: forward_all(model, batches)))
        stages = stage_times(model, ds, args.crop, args.stride, args.batch, args.num_classes)
    ev, fw = statistics.median(t for t, _ in evals), statistics.median(t for t, _ in forwards)
    ratios_cpu = [f[1] / e[1] for e, f in zip(evals, forwards)]
    result = {"images": len(ds), "windows": windows, "eval_s": ev, "forward_s": fw, "eval_windows_per_s": windows / ev,
              "forward_windows_per_s": windows / fw, "ratio": fw / ev, "ratio_cpu": statistics.median(ratios_cpu),
              **stages, "stitch_s": max(stages["slide_s"] - fw, 0.0)}
    print(f"evaluation {result['eval_windows_per_s']:.1f} windows/s ({ev:.2f} s), forward "
          f"{result['forward_windows_per_s']:.1f} windows/s ({fw:.2f} s): ratio {result['ratio']:.2f} "
          f"(CPU time: {result['ratio_cpu']:.2f})")
    print(f"stages: load {stages['load_s']:.3f} s, windows {stages['slide_s']:.3f} s (forward {fw:.3f} + stitch "
          f"{result['stitch_s']:.3f}), resize {stages['resize_s']:.3f} s, argmax {stages['argmax_s']:.3f} s, "
          f"metric {stages['metric_s']:.3f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
