"""Speed of NViT-pruned Segmenters against the dense one, measured in the same run.

    python benchmarks/prune_speed.py                      # ViT-S/16, 512x512, batch 8, 75/50/30 %
    python benchmarks/prune_speed.py --backbone vit_tiny_patch16_384 --crop 256 --batch 2 --repeats 3
    python benchmarks/prune_speed.py --clock cpu          # CPU time, 1 thread: robust on a shared machine
    python benchmarks/prune_speed.py --device cuda --batch 32 --dtype bfloat16   # a GPU (CUDA events)

For each FLOPs target the dense model (random weights unless ``--model``: speed does not depend on
the weights, but the pruned *shapes* do, through the saliency) is pruned with
:func:`segcompress.prune.prune` on a few random batches; then every model is timed on the same
random input, interleaved (dense, 75 %, 50 %, ... then again) so machine noise hits all alike, and
the median over ``--repeats`` is reported, for the whole model and for the encoder alone
(``forward_features``: what pruning changes; the decoder and the upsampling to the crop are fixed
costs). ``--clock wall`` (default) is wall time with torch's threads; ``--clock cpu`` is the
process CPU time with one thread, which a loaded machine perturbs far less.

Goal (issue 4): at half the FLOPs the speed-up is at least 0.9 x the FLOPs reduction on CPU.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from typing import Callable

import torch

from segcompress.bench import DTYPES, add_allocator_argument, autocast, resolve_device, timed_call, use_allocator
from segcompress.flops import analytic_gmacs, count_params, decoder_macs
from segcompress.models.checkpoint import load_model
from segcompress.models.segmenter import Segmenter, build_segmenter
from segcompress.models.spec import SegmenterSpec, spec_from_timm
from segcompress.prune import PruneConfig, prune
from segcompress.seeding import seed_everything


class RandomScenes(torch.utils.data.Dataset):
    """Random normalised crops with random labels (the saliency only needs some gradient)."""

    def __init__(self, n: int, crop: tuple[int, int], num_classes: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.images = torch.randn(n, 3, *crop, generator=g)
        self.labels = torch.randint(0, num_classes, (n, *crop), generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[i], self.labels[i]


def encoder_gmacs(spec: SegmenterSpec) -> float:
    """Closed-form GMACs of patch embedding + encoder (the whole model minus decoder and upsampling)."""
    h, w = spec.crop
    gh, gw = spec.grid
    dec = decoder_macs(gh * gw, spec.num_classes, spec.embed_dim, spec.decoder_dim, spec.decoder_layers, h, w)
    return analytic_gmacs(spec) - dec / 1e9


def timed(fn: Callable[[], object], clock: Callable[[], float], device: torch.device) -> float:
    """Seconds of one call: CPU time for ``--clock cpu``, else :func:`segcompress.bench.timed_call`
    (wall clock on CPU, CUDA events on a GPU)."""
    if clock is time.process_time:
        t0 = clock()
        fn()
        return clock() - t0
    return timed_call(fn, device)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="vit_small_patch16_384", help="timm ViT name (random init)")
    parser.add_argument("--model", default=None, help="a dense checkpoint to prune instead of --backbone")
    parser.add_argument("--crop", type=int, default=512)
    parser.add_argument("--num-classes", type=int, default=150)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--targets", type=float, nargs="+", default=[0.75, 0.5, 0.3], help="fractions of dense FLOPs")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch threads for --clock wall")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    parser.add_argument("--prune-steps", type=int, default=3, help="pruning steps (one batch each)")
    parser.add_argument("--config-json", default="{}", help="extra PruneConfig keys as inline JSON")
    parser.add_argument("--device", default="cpu", help="cpu, cuda[:i] or auto (CUDA if available; --clock wall)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32",
                        help="bfloat16: the timed passes under torch.autocast (pruning stays float32)")
    add_allocator_argument(parser)
    args = parser.parse_args(argv)
    allocator = use_allocator(args.allocator)
    device = resolve_device(args.device)
    if args.clock == "cpu" and device.type == "cuda":
        raise ValueError("--clock cpu times this process's CPU; on a GPU use --clock wall (CUDA events)")

    if args.clock == "cpu":
        torch.set_num_threads(1)
    elif args.threads:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    seed_everything(0)
    if args.model:
        dense = load_model(args.model).eval()
        spec, name = dense.spec, args.model
    else:
        spec, name = spec_from_timm(args.backbone, args.num_classes, args.crop), args.backbone
        dense = build_segmenter(spec).eval()
    dense_g = analytic_gmacs(spec)
    config = PruneConfig.from_dict({
        "steps": args.prune_steps, "interval": 1, "kd_weight": 0.0,
        "recipe": {"batch_size": 1, "lr": 1e-6, "min_lr": 0.0, "log_every": 0, "num_workers": 0},
        **json.loads(args.config_json),
    })
    data = RandomScenes(args.prune_steps, spec.crop, spec.num_classes)
    models: list[tuple[str, Segmenter]] = [("dense", dense)]
    for f in args.targets:
        t0 = time.perf_counter()
        pruned = prune(copy.deepcopy(dense), data, f * dense_g, config, seed=0, device=device).model.eval()
        s = pruned.spec
        print(f"pruned to {f:.0%} in {time.perf_counter() - t0:.1f} s: E={s.embed_dim}, blocks (heads h qk/v m mlp) "
              + " ".join(f"{b.num_heads}h{b.qk_dim}/{b.v_dim}m{b.mlp_hidden}" for b in s.blocks), flush=True)
        models.append((f"{f:.0%}", pruned))

    x = torch.randn(args.batch, 3, *spec.crop, generator=torch.Generator().manual_seed(1)).to(device)
    for _, m in models:
        m.to(device)
    full: dict[str, list[float]] = {n: [] for n, _ in models}
    enc: dict[str, list[float]] = {n: [] for n, _ in models}
    with torch.inference_mode(), autocast(device, args.dtype):
        for _ in range(args.warmup):
            for _, m in models:
                m(x)
        for _ in range(args.repeats):
            for n, m in models:
                full[n].append(timed(lambda: m(x), clock, device))
                enc[n].append(timed(lambda: m.forward_features(x), clock, device))

    print(f"\n{name} {spec.crop[0]}x{spec.crop[1]}, batch {args.batch}, {torch.get_num_threads()} thread(s), "
          f"{args.clock} clock, median of {args.repeats}, allocator {allocator}, {args.dtype} on {device}")
    print(f"{'model':>6} {'GFLOPs':>7} {'params M':>8} {'img/s':>7} {'speed-up':>8} {'FLOPs red':>9} {'ratio':>5} | "
          f"{'enc GFLOPs':>10} {'enc speed-up':>12} {'enc FLOPs red':>13} {'ratio':>5}")
    base, base_enc, dense_enc = statistics.median(full["dense"]), statistics.median(enc["dense"]), encoder_gmacs(spec)
    for n, m in models:
        g, ge = analytic_gmacs(m.spec), encoder_gmacs(m.spec)
        t, te = statistics.median(full[n]), statistics.median(enc[n])
        sp, red, spe, rede = base / t, dense_g / g, base_enc / te, dense_enc / ge
        print(f"{n:>6} {g:7.2f} {count_params(m) / 1e6:8.2f} {args.batch / t:7.2f} {sp:7.2f}x {red:8.2f}x {sp / red:5.2f} | "
              f"{ge:10.2f} {spe:11.2f}x {rede:12.2f}x {spe / rede:5.2f}")


if __name__ == "__main__":
    main()
