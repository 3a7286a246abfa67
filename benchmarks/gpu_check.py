"""The GPU check: every speed benchmark and the ``.test`` studies on CUDA, in one prepared run.

    .venv/bin/python benchmarks/gpu_check.py --out gpu_check.md      # on a CUDA machine (< 8 min)
    .venv/bin/python benchmarks/gpu_check.py --smoke --out smoke.md  # anywhere: tiny sizes, ~1 min

Steps, each printed as it runs and added to ``--out`` (one Markdown file, the figures of the run)
as soon as it ends, so that a crash or a kill keeps the steps before it; a failed step is written
with what it printed and its traceback, and the others still run (exit status 1):

1. every token method (ToMe, ToFu, ALGM, CTS, DToP) against dense at 50 % and 35 % of the dense
   FLOPs (``benchmarks/token_speed.py``) and the NViT-pruned models (``benchmarks/prune_speed.py``),
   at batch 1 and 32, in float32 and under bfloat16 autocast; GPU times are CUDA events around
   each forward pass after a synchronise (:func:`segcompress.bench.timed_call`);
2. the ``.test`` study with every method (``.test/config-all-methods.yaml``: data, train, match,
   prune, evaluate, report) end to end with Snakemake in a temporary copy of the workflow, its
   fork server on as in a user's run, at most 7 minutes; its evaluation rows must all name the
   GPU (their ``device`` column), and its job logs are kept beside ``--out`` (``<out>.study-logs``).

Without CUDA it stops at once unless ``--smoke`` is given (the full sizes would run for hours on
a CPU); with ``--smoke`` the device falls back to the CPU. ``--smoke`` shrinks everything (a ViT-Ti at a
64 crop, batch 1 and 2, one repeat, the study as a dry run) so that the script itself is proven
to run (tests/test_benchmarks.py); its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable

import torch

from segcompress.bench import device_name, resolve_device

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

#: What a copy of the project needs to run the workflow (as tests/test_workflow.py copies it).
WORKFLOW_FILES = ("Snakefile", "config.yaml", "workflow", "profiles", "envs", ".test")
STUDY_CONFIG = ".test/config-all-methods.yaml"


def sizes(smoke: bool) -> dict:
    """Benchmark settings: the paper's ViT-S/16 at 512 on a GPU, a ViT-Ti at 64 for ``--smoke``."""
    if smoke:
        return {"model": ["--backbone", "vit_tiny_patch16_384", "--crop", "64", "--num-classes", "5"],
                "batches": [1, 2], "repeats": "1", "warmup": "0", "prune": ["--prune-steps", "1"]}
    return {"model": ["--backbone", "vit_small_patch16_384", "--crop", "512", "--num-classes", "150"],
            "batches": [1, 32], "repeats": "10", "warmup": "3", "prune": []}


class _Tee(io.StringIO):
    """Keeps what is printed and echoes it at once (a crash or a kill keeps what came before)."""

    def __init__(self, echo) -> None:
        super().__init__()
        self.echo = echo

    def write(self, text: str) -> int:
        self.echo.write(text)
        self.echo.flush()
        return super().write(text)


def captured(fn: Callable[[list[str]], object], argv: list[str]) -> str:
    """Run a benchmark's ``main(argv)`` in this process; returns what it printed (also echoed live)."""
    out = _Tee(sys.stdout)
    try:
        with contextlib.redirect_stdout(out):
            fn(argv)
    except (Exception, SystemExit) as e:  # what it printed before it failed goes into the file too
        e.add_note(f"printed before the failure:\n{out.getvalue()}")
        raise
    return out.getvalue()


def speed_sections(device: str, smoke: bool) -> list[tuple[str, Callable[[], str]]]:
    """(title, run) of every speed benchmark, batch and dtype; run() returns the printed table."""
    import prune_speed
    import token_speed

    s = sizes(smoke)
    sections = []
    for batch in s["batches"]:
        for dtype in ("float32", "bfloat16"):
            common = [*s["model"], "--batch", str(batch), "--repeats", s["repeats"], "--warmup", s["warmup"],
                      "--device", device, "--dtype", dtype]
            title = f"batch {batch}, {dtype}"
            sections.append((f"Token methods, {title}", functools.partial(
                captured, token_speed.main, [*common, "--fractions", "0.5", "0.35"])))  # every token method
            sections.append((f"NViT pruning, {title}", functools.partial(
                captured, prune_speed.main, [*common, "--targets", "0.5", "0.35", "--clock", "wall", *s["prune"]])))
    return sections


def study_section(smoke: bool, cores: int, device: torch.device, keep: Path) -> str:
    """Run the every-method ``.test`` study in a temporary copy (``--smoke``: a dry run only)."""
    snakemake = str(Path(sys.executable).parent / "snakemake")
    with tempfile.TemporaryDirectory(prefix="gpu_check_study_") as tmp:
        work = Path(tmp)
        for name in WORKFLOW_FILES:
            src = ROOT / name
            (shutil.copytree if src.is_dir() else shutil.copy2)(src, work / name)
        # one GPU job at a time, as the README says to run on one machine without a scheduler
        cmd = [snakemake, "--configfile", STUDY_CONFIG, "--cores", str(cores), "--resources", "gpu=1"]
        if smoke:
            cmd += ["-n", "--quiet", "rules"]
        t0 = time.perf_counter()
        # With the fork server on, as in a user's run: it must not have touched CUDA before it forks
        # a job (segcompress.forkserver); the 7-minute limit keeps a hung job from eating the session.
        try:
            run = subprocess.run(cmd, cwd=work, capture_output=True, text=True, check=False,
                                 timeout=None if smoke else 420)
        finally:
            if not smoke and (work / "logs").is_dir():  # the jobs' logs outlive the temporary copy
                shutil.copytree(work / "logs", keep, dirs_exist_ok=True)
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
            if device.type == "cuda" and devices != [device_name(device)]:
                raise RuntimeError("\n".join(lines) + f"\nexpected every row on {device_name(device)}")
    text = "\n".join(lines) + "\n"
    print(text, flush=True)
    return text


def gpu_facts() -> str:
    """nvidia-smi's driver, CUDA compute mode and clocks, where it runs ("" elsewhere). In the
    Exclusive_Process mode the study's jobs cannot open the GPU this process holds."""
    query = "name,driver_version,compute_mode,clocks.sm,clocks.max.sm,power.limit"
    try:
        run = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv"], capture_output=True,
                             text=True, timeout=20, check=True)
    except (OSError, subprocess.SubprocessError):
        return ""
    return f"\n```\n{run.stdout.strip()}\n```\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="Markdown file the figures are written to")
    p.add_argument("--smoke", action="store_true", help="tiny sizes and a dry-run study: proves the script runs")
    p.add_argument("--device", default="auto", help="auto (CUDA if available, else CPU), cpu or cuda[:i]")
    p.add_argument("--cores", type=int, default=len(os.sched_getaffinity(0)),
                   help="Snakemake --cores of the study (default: all)")
    p.add_argument("--skip-study", action="store_true", help="speed benchmarks only")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    if device.type != "cuda" and not args.smoke:  # full sizes on a CPU would run for hours
        raise SystemExit(f"gpu_check: no CUDA device (torch {torch.__version__}, CUDA {torch.version.cuda}); "
                         "use --smoke on a CPU")
    out = Path(args.out)
    t0 = time.perf_counter()
    head = (f"# GPU check{' (smoke)' if args.smoke else ''}\n\n{device_name(device)} ({device.type}), "
            f"torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n\n"
            f"float32 matmul precision {torch.get_float32_matmul_precision()}, cuDNN TF32 "
            f"{torch.backends.cudnn.allow_tf32} (float32 convolutions may run in TF32)\n{gpu_facts()}")
    steps = speed_sections(str(device), args.smoke)
    if not args.skip_study:
        title = "Study .test/config-all-methods.yaml" + (" (dry run)" if args.smoke else "")
        keep = out.with_name(out.name + ".study-logs")
        steps.append((title, lambda: study_section(args.smoke, args.cores, device, keep)))
    body, failed = "", 0
    for title, step in steps:  # the file is rewritten after every step: a crash keeps the steps before
        t1 = time.perf_counter()
        try:
            text = step()
        except (Exception, SystemExit):  # SystemExit: a benchmark's argparse error, say
            text, failed = f"FAILED\n{traceback.format_exc()}", failed + 1
            print(text, file=sys.stderr, flush=True)
        body += f"\n## {title}\n\n```\n{text.rstrip()}\n```\n({time.perf_counter() - t1:.0f} s)\n"
        out.write_text(f"{head}{body}\nSo far {time.perf_counter() - t0:.0f} s.\n")
    out.write_text(f"{head}{body}\n{failed} step(s) failed. Total {time.perf_counter() - t0:.0f} s.\n")
    print(f"wrote {args.out} ({time.perf_counter() - t0:.0f} s, {failed} step(s) failed)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
