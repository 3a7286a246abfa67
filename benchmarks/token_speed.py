"""Real speed of the token methods against the dense Segmenter, at matched FLOPs.

For each token method of the registry (ToMe, ToFu, ALGM, CTS, DToP) and each FLOPs target
(fractions of the dense GFLOPs) the knob is solved (:mod:`segcompress.tokens.match`), then images/s
are measured with the dense model in the same run, interleaved (dense, method, dense, method, ...)
so that load drifts on a shared machine hit both alike. Prints one row per point: achieved GFLOPs,
FLOPs reduction (dense/achieved), images/s (median wall time), speed-up over dense (median over the
pairs of dense time / method time, wall clock; ``cpu×``: the same with this process's CPU time,
less sensitive to other processes on a shared machine) and efficiency = speed-up / FLOPs reduction.
On a GPU (``--device cuda``) the times are CUDA events (:func:`segcompress.bench.timed_call`;
``cpu×`` then means little); ``--dtype bfloat16`` runs every pass under autocast.

    .venv/bin/python benchmarks/token_speed.py                     # ViT-S, 512 crop, batch 8
    .venv/bin/python benchmarks/token_speed.py --backbone vit_tiny_patch16_384 --crop 256 --batch 2
    .venv/bin/python benchmarks/token_speed.py --device cuda --batch 32 --dtype bfloat16  # a GPU

The model is randomly initialised unless ``--model`` is given (speed does not depend on the
weights, except ALGM's token counts, which follow the images and the model's features). The
images are synthetic scenes (piecewise-constant regions with mild texture); ALGM's threshold is
bisected on the same images (and DToP's exit threshold, with untrained heads drawn from a fixed
seed), so its mean GFLOPs over the batch meets the target.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F


def scene_images(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Normalised synthetic scenes: blocky regions of random colour plus texture, (n, 3, h, w)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        cells = int(torch.randint(3, 9, (1,), generator=g))
        low = torch.rand(1, 3, cells, cells, generator=g) * 2 - 1
        img = F.interpolate(low, size=(h, w), mode="nearest")
        img = img + 0.15 * torch.randn(1, 3, h, w, generator=g)
        out.append(img.clamp(-1, 1))
    return torch.cat(out)


def timed(model: torch.nn.Module, img: torch.Tensor) -> tuple[float, float]:
    """(seconds, CPU seconds of this process) of one forward pass; seconds: wall clock on CPU, CUDA
    events on a GPU (:func:`segcompress.bench.timed_call`)."""
    from segcompress.bench import timed_call

    cpu = time.process_time()
    seconds = timed_call(lambda: model(img), img.device)
    return seconds, time.process_time() - cpu


def main(argv: list[str] | None = None) -> int:
    from segcompress.bench import DTYPES, add_allocator_argument, autocast, resolve_device, use_allocator
    from segcompress.flops import analytic_gmacs
    from segcompress import methods
    from segcompress.methods import apply_method
    from segcompress.models import build_segmenter
    from segcompress.models.checkpoint import load_model
    from segcompress.models.spec import spec_from_timm

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="vit_small_patch16_384", help="timm ViT name (random init)")
    p.add_argument("--model", default=None, help="a saved Segmenter instead of --backbone")
    p.add_argument("--num-classes", type=int, default=150)
    p.add_argument("--crop", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--fractions", type=float, nargs="+", default=[0.75, 0.5, 0.3])
    p.add_argument("--methods", nargs="+", default=list(methods.names(family="token")),
                   choices=methods.names(family="token"))
    p.add_argument("--repeats", type=int, default=3, help="timed (dense, method) pairs per point")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--settings", default="{}",
                   help="method settings as JSON; each method takes the keys it has (e.g. decoder_on_merged)")
    p.add_argument("--device", default="cpu", help="cpu, cuda[:i] or auto (CUDA if available)")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32",
                   help="bfloat16: the forward passes under torch.autocast (weights stay float32)")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    add_allocator_argument(p)
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    allocator = use_allocator(args.allocator)
    if args.threads:
        torch.set_num_threads(args.threads)
    extra = json.loads(args.settings)

    if args.model:
        model = load_model(args.model).eval()
    else:
        torch.manual_seed(0)
        model = build_segmenter(spec_from_timm(args.backbone, args.num_classes, args.crop)).eval()
    model.to(device)
    spec = model.spec
    h, w = spec.crop
    img = scene_images(args.batch, h, w).to(device)
    dense_g = analytic_gmacs(spec)
    print(f"# {spec.backbone or 'custom'} crop {h}x{w} batch {args.batch} threads {torch.get_num_threads()} "
          f"dense {dense_g:.2f} GFLOPs, allocator {allocator}, {args.dtype} on {device}", flush=True)

    rows: list[dict[str, Any]] = []
    header = (f"{'method':6} {'target':>6} {'GFLOPs':>8} {'reduct':>6} {'img/s':>7} {'dense':>7} {'speedup':>7} "
              f"{'effic':>6} {'cpu x':>6} {'effic':>6} knob")
    print(header, flush=True)
    with torch.inference_mode(), autocast(device, args.dtype):
        for name in args.methods:
            for frac in args.fractions:
                target = frac * dense_g
                keys = methods.get(name).settings.keys()
                m = methods.solve(name, spec, target, {k: v for k, v in extra.items() if k in keys},
                                  model=model, images=[img])
                for _ in range(args.warmup):
                    apply_method(model, "dense")
                    model(img)
                    apply_method(model, name, m.knob)
                    model(img)
                dense_t, method_t = [], []
                for _ in range(args.repeats):
                    apply_method(model, "dense")
                    dense_t.append(timed(model, img))
                    apply_method(model, name, m.knob)
                    method_t.append(timed(model, img))
                apply_method(model, "dense")
                td = statistics.median(t for t, _ in dense_t)
                tm = statistics.median(t for t, _ in method_t)
                reduction = dense_g / m.achieved_gflops
                speedup = statistics.median(d[0] / t[0] for d, t in zip(dense_t, method_t))
                cpu_speedup = statistics.median(d[1] / t[1] for d, t in zip(dense_t, method_t))
                knob = {k: v for k, v in m.knob.items() if k in ("r", "threshold", "k")}
                if isinstance(knob.get("r"), list):
                    knob["r"] = f"{min(knob['r'])}..{max(knob['r'])}"
                row = {
                    "method": name, "target_fraction": frac, "achieved_gflops": m.achieved_gflops,
                    "gflops_std": m.gflops_std, "within_tolerance": m.within_tolerance,
                    "flops_reduction": reduction, "images_per_s": args.batch / tm,
                    "dense_images_per_s": args.batch / td, "batch": args.batch, "device": str(device),
                    "dtype": args.dtype,
                    "speedup": speedup, "efficiency": speedup / reduction, "cpu_speedup": cpu_speedup,
                    "cpu_efficiency": cpu_speedup / reduction, "knob": m.knob,
                    "dense_times": dense_t, "method_times": method_t,
                }
                rows.append(row)
                flag = "" if m.within_tolerance else "  (out of reach)"
                print(f"{name:6} {frac:6.2f} {m.achieved_gflops:8.2f} {reduction:6.2f} {row['images_per_s']:7.2f} "
                      f"{row['dense_images_per_s']:7.2f} {speedup:7.2f} {row['efficiency']:6.2f} {cpu_speedup:6.2f} "
                      f"{row['cpu_efficiency']:6.2f} {knob}{flag}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2, default=float)
    return 0


if __name__ == "__main__":
    sys.exit(main())
