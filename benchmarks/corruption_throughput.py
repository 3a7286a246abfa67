"""Corruption-generation throughput: segcompress's corrupt jobs run side by side against a naive loop.

Both run in the same invocation, each in a fresh Python process, on the same synthetic images
and the whole protocol (16 Kamann & Rother corruptions x 5 severities by default):

* naive: a plain sequential loop over ``imagecorruptions.corrupt`` that saves each result with
  ``PIL.Image.save`` (PNG, default level), as a user would write it; it pays imports and
  glass_blur's numba compile in its one process;
* segcompress: one ``segcompress.corrupt.generate`` call per (corruption, severity) folder, as
  the workflow's corrupt jobs, ``--workers`` folders at a time (default 2, as Snakemake runs
  one-thread jobs side by side; this script's pool stands in for Snakemake) and each folder with
  ``--processes`` processes (default 1; the SLURM profile gives a job 8): seeded, atomic writes,
  provenance, per-folder manifests; it also pays process start, imports and each worker's
  glass_blur compile. It runs once per ``--compress-levels`` entry: its default PNG level 1, and
  level 6 (PIL's default, what the naive loop writes) to separate the gain of the workers from the
  gain of the faster PNG level.

Prints images/s per corruption (naive: wall time of its calls; segcompress: outputs divided by
the seconds spent on them / (workers x processes), the rate if every process were evenly busy)
and, the headline, the overall wall-clock ratio over the whole run (process start to exit). Then
regenerates a few outputs in-process and checks they are byte-identical to what the runs wrote.

    .venv/bin/python benchmarks/corruption_throughput.py                  # 4 images 1024x512
    .venv/bin/python benchmarks/corruption_throughput.py --images 2 --size 512x256 --severities 1 5
    .venv/bin/python benchmarks/corruption_throughput.py --images 1 --size 128x64 --corruptions fog,glass_blur \
        --severities 1 --compress-levels 1                                # a smoke test, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def texture_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A (h, w, 3) uint8 scene: a few coloured regions with multi-scale texture and sharp edges."""
    import cv2

    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.zeros((h, w, 3), np.float32)
    # Multi-scale value noise (random grids upsampled bicubically), like natural textures.
    for cells, amp in ((4, 60.0), (16, 30.0), (64, 15.0)):
        grid = rng.normal(0, 1, (cells, max(1, cells * w // h), 3)).astype(np.float32)
        img += amp * cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)
    # Regions: a horizon, a few rectangles and discs of random colour.
    horizon = h * rng.uniform(0.3, 0.6)
    img[yy < horizon] += rng.uniform(60, 200, 3)
    img[yy >= horizon] += rng.uniform(40, 160, 3)
    for _ in range(6):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(h / 20, h / 5)
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r if rng.random() < 0.5 else (
            (abs(yy - cy) < r) & (abs(xx - cx) < 1.5 * r))
        img[mask] = rng.uniform(0, 255, 3) + img[mask] * 0.3
    img += rng.normal(0, 4, img.shape)  # sensor noise
    return np.clip(img, 0, 255).astype(np.uint8)


def make_dataset(root: Path, n: int, w: int, h: int, seed: int) -> list[Path]:
    """ADE20K-layout val images (JPEG, quality 90) under ``root``."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder = root / "images" / "validation"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(1, n + 1):
        path = folder / f"ADE_val_{i:08d}.jpg"
        Image.fromarray(texture_image(rng, h, w)).save(path, quality=90)
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------- the two runners


def run_naive(root: Path, out: Path, corruptions: list[str], severities: list[int]) -> dict:
    """The plain loop (runs in its own fresh process)."""
    t_import = time.perf_counter()
    from imagecorruptions import corrupt
    from PIL import Image

    seconds = {c: 0.0 for c in corruptions}
    count = {c: 0 for c in corruptions}
    import_s = time.perf_counter() - t_import
    for path in sorted((root / "images" / "validation").glob("*.jpg")):
        image = np.array(Image.open(path).convert("RGB"))
        for c in corruptions:
            for s in severities:
                t0 = time.perf_counter()
                result = corrupt(image, corruption_name=c, severity=s)
                dst = out / c / str(s) / path.with_suffix(".png").name
                dst.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(result).save(dst)
                seconds[c] += time.perf_counter() - t0
                count[c] += 1
    return {"seconds": seconds, "count": count, "import_s": import_s}


def corruption_names(spec: str) -> list[str]:
    """``kamann`` (16), ``all`` (19) or a comma list of names."""
    from segcompress.corrupt import ALL_CORRUPTIONS, KAMANN_CORRUPTIONS, check_corruption

    presets = {"kamann": KAMANN_CORRUPTIONS, "all": ALL_CORRUPTIONS}
    names = presets.get(spec) or [check_corruption(c.strip()) for c in spec.split(",") if c.strip()]
    if not names:
        sys.exit("--corruptions: empty; pass kamann, all or names like fog,snow")
    return list(dict.fromkeys(names))


def _folder(root: Path, out: Path, corruption: str, severity: int, processes: int, compress_level: int):
    """One workflow job: one folder (``segcompress corrupt --corruption C --severity S``)."""
    from segcompress.corrupt import generate

    return corruption, generate("ade20k", root, out, "bench", corruption, severity, processes=processes,
                                compress_level=compress_level, progress=False)


def _init_worker() -> None:
    import cv2

    cv2.setNumThreads(1)  # as a one-thread Snakemake job (OMP_NUM_THREADS=1)


def run_parallel(root: Path, out: Path, corruptions: list[str], severities: list[int], workers: int,
                 processes: int, compress_level: int) -> dict:
    """segcompress's corrupt jobs, ``workers`` at a time (runs in its own fresh process)."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    t0 = time.perf_counter()
    folders = [(root, out, c, s, processes, compress_level) for c in corruptions for s in severities]
    if workers == 1:
        done = [_folder(*f) for f in folders]
    else:
        ctx = mp.get_context("forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn")
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker) as pool:
            done = list(pool.map(_folder, *zip(*folders)))
    seconds = {c: 0.0 for c in corruptions}
    count = {c: 0 for c in corruptions}
    for c, report in done:
        seconds[c] += report.worker_seconds
        count[c] += report.generated
    return {"seconds": seconds, "count": count, "generate_s": time.perf_counter() - t0}


def timed_subprocess(mode: str, args: argparse.Namespace, root: Path, out: Path, level: int = 1) -> tuple[float, dict]:
    """Run this script in ``--_run MODE`` in a fresh interpreter; (wall seconds, its JSON)."""
    cmd = [sys.executable, __file__, "--_run", mode, "--_root", str(root), "--_out", str(out),
           "--corruptions", ",".join(args.corruption_list), "--workers", str(args.workers),
           "--processes", str(args.processes),
           "--severities", *map(str, args.severities), "--compress-levels", str(level)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"{mode} run failed:\n{proc.stderr}")
    return wall, json.loads(proc.stdout.strip().splitlines()[-1])


def verify(root: Path, out: Path, corruptions: list[str], severities: list[int], level: int) -> int:
    """Regenerate one output per corruption in-process, in reverse order; count byte mismatches."""
    from segcompress.corrupt import corrupt_file, list_val_images, output_relpath

    rels = list_val_images("ade20k", root)
    bad = 0
    for i, c in enumerate(reversed(corruptions)):
        rel, s = rels[i % len(rels)], severities[i % len(severities)]
        data = corrupt_file(root / rel, rel, "bench", c, s, seed=0, compress_level=level)
        bad += data != (out / c / str(s) / output_relpath(rel)).read_bytes()
    return bad


# ----------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4, help="synthetic images (default 4)")
    parser.add_argument("--size", default="1024x512", help="WxH of the images (default 1024x512)")
    parser.add_argument("--corruptions", default="kamann", help="kamann (default), all, or a comma list")
    parser.add_argument("--severities", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    parser.add_argument("--workers", type=int, default=2, help="folders (workflow jobs) at a time (default 2)")
    parser.add_argument("--processes", type=int, default=1,
                        help="processes per folder, segcompress corrupt --processes (default 1)")
    parser.add_argument("--compress-levels", type=int, nargs="+", default=[1, 6],
                        help="PNG levels of the segcompress runs (default: 1 6; the naive loop writes 6)")
    parser.add_argument("--keep", type=Path, default=None, help="work in this folder and keep it")
    parser.add_argument("--_run", choices=["naive", "parallel"], help=argparse.SUPPRESS)
    parser.add_argument("--_root", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--_out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.workers < 1 or args.processes < 1:
        sys.exit(f"--workers {args.workers} / --processes {args.processes}: each must be >= 1")
    args.corruption_list = corruption_names(args.corruptions)
    if args._run == "naive":
        print(json.dumps(run_naive(args._root, args._out, args.corruption_list, args.severities)))
        return
    if args._run == "parallel":
        print(json.dumps(run_parallel(args._root, args._out, args.corruption_list, args.severities, args.workers,
                                      args.processes, args.compress_levels[0])))
        return

    w, h = (int(v) for v in args.size.lower().split("x"))
    with tempfile.TemporaryDirectory(prefix="corrupt-bench-") as tmp:
        work = args.keep or Path(tmp)
        root = work / "data" / "bench"
        make_dataset(root, args.images, w, h, seed=0)
        n_out = args.images * len(args.corruption_list) * len(args.severities)
        load0 = os.getloadavg()
        naive_wall, naive = timed_subprocess("naive", args, root, work / "naive")
        runs = {lvl: timed_subprocess("parallel", args, root, work / f"bench-c-{lvl}", lvl)
                for lvl in args.compress_levels}
        load1 = os.getloadavg()

        print(f"{args.images} images {w}x{h}, {len(args.corruption_list)} corruptions x severities "
              f"{args.severities} = {n_out} outputs; {os.cpu_count()} CPUs, load avg {load0[0]:.1f} -> {load1[0]:.1f}")
        head = "".join(f" {'segc. L' + str(lvl) + ' img/s':>16} {'ratio':>6}" for lvl in runs)
        print(f"{'corruption':<18} {'naive img/s':>12}{head}")
        for c in args.corruption_list:
            r_naive = naive["count"][c] / naive["seconds"][c]
            cells = ""
            for _, par in runs.values():
                r_par = par["count"][c] / (par["seconds"][c] / (args.workers * args.processes))
                cells += f" {r_par:>16.2f} {r_par / r_naive:>5.2f}x"
            print(f"{c:<18} {r_naive:>12.2f}{cells}")
        print(f"naive loop (1 process, PNG level 6): {naive_wall:.1f} s wall = {n_out / naive_wall:.2f} img/s "
              f"(imports {naive['import_s']:.1f} s; "
              f"glass_blur incl. JIT {naive['seconds'].get('glass_blur', 0):.1f} s)")
        for lvl, (wall, par) in runs.items():
            print(f"segcompress ({args.workers} jobs at a time x {args.processes} processes, PNG level {lvl}): "
                  f"{wall:.1f} s wall = {n_out / wall:.2f} img/s "
                  f"(the jobs {par['generate_s']:.1f} s); overall wall-clock ratio {naive_wall / wall:.2f}x")
        print("target: >= 1.8x on 2 cores")
        for lvl in runs:
            bad = verify(root, work / f"bench-c-{lvl}", args.corruption_list, args.severities, lvl)
            print(f"bit-exact regeneration check (level {lvl}): {len(args.corruption_list) - bad}/"
                  f"{len(args.corruption_list)} outputs identical when regenerated in-process in reverse order")

if __name__ == "__main__":
    main()
