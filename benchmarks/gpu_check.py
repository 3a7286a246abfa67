"""The GPU check: every speed benchmark and the ``.test`` studies on CUDA, in one prepared run.

    .venv/bin/python benchmarks/gpu_check.py --out gpu_check.md      # on a CUDA machine (< 8 min)
    .venv/bin/python benchmarks/gpu_check.py --smoke --out smoke.md  # anywhere: tiny sizes, ~1 min

Steps, each printed and written to ``--out`` (one Markdown file, the figures of the run):

1. every token method (ToMe, ToFu, ALGM, CTS, DToP) against dense at 50 % and 35 % of the dense
   FLOPs (``benchmarks/token_speed.py``) and the NViT-pruned models (``benchmarks/prune_speed.py``),
   at batch 1 and 32, in float32 and under bfloat16 autocast; GPU times are CUDA events around
   each forward pass after a synchronise (:func:`segcompress.bench.timed_call`);
2. the ``.test`` study with every method (``.test/config-all-methods.yaml``: data, train, match,
   prune, evaluate, report) end to end with Snakemake in a temporary copy of the workflow; the
   ``device`` column of its evaluation rows shows where it ran.

Without CUDA the device falls back to the CPU. ``--smoke`` shrinks everything (a ViT-Ti at a
64 crop, batch 1 and 2, one repeat, the study as a dry run) so that the script itself is proven
to run (tests/test_benchmarks.py); its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

#: What a copy of the project needs to run the workflow (as tests/test_workflow.py copies it).
WORKFLOW_FILES = ("Snakefile", "config.yaml", "workflow", "envs", ".test")
STUDY_CONFIG = ".test/config-all-methods.yaml"


def sizes(smoke: bool) -> dict:
    """Benchmark settings: the paper's ViT-S/16 at 512 on a GPU, a ViT-Ti at 64 for ``--smoke``."""
    if smoke:
        return {"model": ["--backbone", "vit_tiny_patch16_384", "--crop", "64", "--num-classes", "5"],
                "batches": [1, 2], "repeats": "1", "warmup": "0", "prune": ["--prune-steps", "1"]}
    return {"model": ["--backbone", "vit_small_patch16_384", "--crop", "512", "--num-classes", "150"],
            "batches": [1, 32], "repeats": "10", "warmup": "3", "prune": []}


def captured(fn: Callable[[list[str]], object], argv: list[str]) -> str:
    """Run a benchmark's ``main(argv)`` in this process; returns what it printed (also echoed)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        fn(argv)
    print(out.getvalue(), end="", flush=True)
    return out.getvalue()


def speed_sections(device: str, smoke: bool) -> list[tuple[str, str]]:
    """(title, printed table) of every speed benchmark, batch and dtype."""
    import prune_speed
    import token_speed

    s = sizes(smoke)
    sections = []
    for batch in s["batches"]:
        for dtype in ("float32", "bfloat16"):
            common = [*s["model"], "--batch", str(batch), "--repeats", s["repeats"], "--warmup", s["warmup"],
                      "--device", device, "--dtype", dtype]
            title = f"batch {batch}, {dtype}"
            sections.append((f"Token methods, {title}", captured(
                token_speed.main, [*common, "--fractions", "0.5", "0.35"])))  # every token method
            sections.append((f"NViT pruning, {title}", captured(
                prune_speed.main, [*common, "--targets", "0.5", "0.35", "--clock", "wall", *s["prune"]])))
    return sections


def study_section(smoke: bool, cores: int) -> tuple[str, str]:
    """Run the every-method ``.test`` study in a temporary copy (``--smoke``: a dry run only)."""
    snakemake = str(Path(sys.executable).parent / "snakemake")
    with tempfile.TemporaryDirectory(prefix="gpu_check_study_") as tmp:
        work = Path(tmp)
        for name in WORKFLOW_FILES:
            src = ROOT / name
            (shutil.copytree if src.is_dir() else shutil.copy2)(src, work / name)
        cmd = [snakemake, "--configfile", STUDY_CONFIG, "--cores", str(cores)]
        if smoke:
            cmd += ["-n", "--quiet", "rules"]
        t0 = time.perf_counter()
        run = subprocess.run(cmd, cwd=work, capture_output=True, text=True, check=False)
        seconds = time.perf_counter() - t0
        if run.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd[1:])} failed in {work} (exit {run.returncode}):\n"
                               f"{run.stdout[-3000:]}{run.stderr[-3000:]}")
        rows = (work / "results" / "raw").rglob("*.json")
        devices = sorted({json.loads(p.read_text()).get("device", "?") for p in rows})
        csv = work / "results" / "benchmark.csv"
        lines = [f"`snakemake {' '.join(cmd[1:])}`: ok in {seconds:.0f} s"]
        if smoke:
            lines.append(run.stdout.strip())
        else:
            lines.append(f"evaluation rows ran on: {', '.join(devices) or 'no rows'}")
            lines.append(csv.read_text() if csv.is_file() else "no results/benchmark.csv")
    text = "\n".join(lines) + "\n"
    print(text, flush=True)
    return "Study .test/config-all-methods.yaml" + (" (dry run)" if smoke else ""), text


def main(argv: list[str] | None = None) -> int:
    from segcompress.bench import device_name, resolve_device

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="Markdown file the figures are written to")
    p.add_argument("--smoke", action="store_true", help="tiny sizes and a dry-run study: proves the script runs")
    p.add_argument("--device", default="auto", help="auto (CUDA if available, else CPU), cpu or cuda[:i]")
    p.add_argument("--cores", type=int, default=os.cpu_count() or 1,
                   help="Snakemake --cores of the study (default: all)")
    p.add_argument("--skip-study", action="store_true", help="speed benchmarks only")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    t0 = time.perf_counter()
    head = (f"# GPU check{' (smoke)' if args.smoke else ''}\n\n{device_name(device)} ({device.type}), "
            f"torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
    sections = speed_sections(str(device), args.smoke)
    if not args.skip_study:
        sections.append(study_section(args.smoke, args.cores))
    body = "".join(f"\n## {title}\n\n```\n{text.rstrip()}\n```\n" for title, text in sections)
    Path(args.out).write_text(f"{head}{body}\nTotal {time.perf_counter() - t0:.0f} s.\n")
    print(f"wrote {args.out} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
