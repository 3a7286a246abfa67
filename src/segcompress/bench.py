"""Throughput (images/s) of a model at a fixed batch, as docs/methods.md §7.3 recommends.

Fixed batch and dtype (fp32), untimed warm-up batches, then ``repeats`` timed batches under
``torch.inference_mode``; on CUDA each batch is timed with CUDA events after a synchronise
(:func:`timed_call`, the one timing of every speed benchmark). The headline images/s comes from
the fastest batch by default (``statistic="best"``, as ``timeit`` advises: other work on the
machine only ever adds time to a batch), or from the median; the median, the slowest and the
fastest batch and every batch's time are recorded beside it. The device name,
the software versions and the code's provenance are recorded with the numbers, in the columns
evaluation rows use (:func:`segcompress.evaluate.environment`).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import platform
import statistics
import time
from typing import Any, Callable, Sequence

import torch
from torch import nn

ALLOCATORS = ("reuse", "default")

#: Which batch time a row's ``images_per_s`` is computed from: the fastest (``best``) or the median.
STATISTICS = ("best", "median")


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep and reuse freed memory for large CPU tensors (call once, early).

    By default glibc maps every allocation above 32 MB afresh with ``mmap`` and unmaps it when
    freed, so each forward pass page-faults through its large tensors again (at a 512 crop the
    150-class logits alone are 1.26 GB per batch of 8): on this machine that first touch costs
    more than the bilinear upsampling that writes them. This is the effect PyTorch's CPU
    performance guide addresses with jemalloc/tcmalloc; here ``mallopt`` serves large blocks from
    the heap (``M_MMAP_MAX = 0``) and never trims it (``M_TRIM_THRESHOLD``), as a caching
    allocator would (CUDA's already does). The process keeps its peak memory until it exits.

    Returns:
        whether it was applied (False off glibc, e.g. macOS).
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if platform.system() != "Linux" or name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        m_trim_threshold, m_mmap_max = -1, -4  # glibc's <malloc.h>
        return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2 ** 31 - 1))
    except (OSError, AttributeError):
        return False


def add_allocator_argument(parser: argparse.ArgumentParser) -> None:
    """``--allocator reuse|default``, the option of every timing entry point (see :func:`use_allocator`)."""
    parser.add_argument("--allocator", choices=ALLOCATORS, default="reuse",
                        help="reuse (default): glibc's malloc keeps freed memory for large CPU tensors instead of "
                             "page-faulting them afresh every forward pass (segcompress.bench.keep_freed_memory); "
                             "default: leave malloc as it is")


def use_allocator(choice: str) -> str:
    """Apply ``--allocator``; returns the allocator in effect (``reuse`` only where it took)."""
    return "reuse" if choice == "reuse" and keep_freed_memory() else "default"


def device_name(device: torch.device) -> str:
    """A human-readable name of ``device`` (the GPU model, or the CPU model)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; otherwise ``torch.device(name)``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but CUDA is not available")
    return device


def software_versions(device: torch.device) -> dict[str, Any]:
    """The software and provenance columns of evaluation rows (:func:`segcompress.evaluate.environment`:
    torch, timm, python, segcompress_version, source_revision, source_dirty) and CUDA's version
    where present; the device column is bench's own (:func:`device_name`: the CPU model too)."""
    from segcompress.evaluate import environment

    out = {k: v for k, v in environment(device).items() if k != "device"}
    if torch.version.cuda:
        out["cuda"] = str(torch.version.cuda)
    return out


#: ``--dtype`` choices of the timing entry points: the autocast dtype of the forward pass.
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def autocast(device: torch.device, dtype: str = "float32") -> contextlib.AbstractContextManager:
    """The context a timed forward pass runs in: nothing for ``float32``, ``torch.autocast`` to
    ``dtype`` (``bfloat16``) on ``device`` otherwise (weights stay float32, as in mixed precision)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[dtype])


def timed_call(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds one call of ``fn`` takes on ``device``: the one timing of every speed measurement.

    CPU: wall clock around the call. CUDA: the device is synchronised first (earlier work does not
    count), then the call is bracketed by two CUDA events and the time between them is read after
    synchronising again (kernels run asynchronously: a host clock would time the launches only).
    """
    if device.type != "cuda":
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize(device)
    return start.elapsed_time(end) / 1000.0


def _hw(crop: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(crop, int):
        return crop, crop
    return int(crop[0]), int(crop[1])


def measure_throughput(
        model: nn.Module,
        batch: int,
        crop: int | tuple[int, int] | list[int],
        warmup: int = 3,
        repeats: int = 10,
        device: str | torch.device = "cpu",
        inputs: torch.Tensor | None = None,
        seed: int = 0,
        statistic: str = "best",
) -> dict[str, Any]:
    """Images per second of ``model`` on batches of ``batch`` crops.

    Args:
        model: any module taking (B, 3, H, W); moved to ``device`` (it stays there) and put in
            eval mode (its mode is restored after).
        batch: images per forward pass.
        crop: ``S`` or ``(H, W)``.
        warmup: untimed batches first.
        repeats: timed batches.
        device: where to run (``auto`` picks CUDA when available).
        inputs: the batch to run, (batch, 3, H, W); default a seeded random batch. Input-dependent
            methods should get real images (ALGM: one image repeated ``batch`` times).
        seed: seed of the random batch.
        statistic: ``best`` (the fastest batch) or ``median``: which batch time ``images_per_s``
            and ``batch_time_s`` come from (:data:`STATISTICS`).

    Returns:
        ``images_per_s`` and ``batch_time_s`` by ``statistic``; ``images_per_s_median``,
        ``images_per_s_min`` (slowest batch) and ``images_per_s_max`` (fastest), the batch times
        alike (``batch_time_s_median``/``_min``/``_max``) and every batch's (``batch_times_s``,
        in timing order, one per round); ``timed_at``, the UTC start of the rounds, the same in
        every row of one :func:`measure_throughputs` call; the settings, the device name, thread
        count, software versions and the code's provenance (:func:`software_versions`).
    """
    return measure_throughputs([(model, inputs)], batch, crop, warmup, repeats, device, seed, statistic)[0]


def measure_throughputs(
        runs: Sequence[tuple[nn.Module, torch.Tensor | None]],
        batch: int,
        crop: int | tuple[int, int] | list[int],
        warmup: int = 3,
        repeats: int = 10,
        device: str | torch.device = "cpu",
        seed: int = 0,
        statistic: str = "best",
) -> list[dict[str, Any]]:
    """:func:`measure_throughput` of several ``(model, inputs)`` runs, timed in interleaved rounds.

    Every model gets its warm-up batches first; then each of the ``repeats`` rounds times one
    batch of every model in turn, each round starting one model further on. A slow spell of the
    machine (clock changes, another process, the allocator settling) then falls on all models
    alike instead of on whichever is timed first, so speed-ups between them are measured under
    the same conditions. Returns one row per run.
    """
    if batch < 1 or repeats < 1 or warmup < 0:
        raise ValueError("batch and repeats must be >= 1 and warmup >= 0")
    if statistic not in STATISTICS:
        raise ValueError(f"statistic must be one of {', '.join(STATISTICS)}, got {statistic!r}")
    dev = resolve_device(device) if isinstance(device, str) else device
    h, w = _hw(crop)
    xs = []
    for _, inputs in runs:
        if inputs is None:
            inputs = torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(seed))
        if inputs.shape[0] != batch or tuple(inputs.shape[-2:]) != (h, w):
            raise ValueError(f"inputs of shape {tuple(inputs.shape)} do not match batch {batch} and crop {(h, w)}")
        xs.append(inputs.to(dev, torch.float32))
    modes = [model.training for model, _ in runs]
    # one stamp for every row of these rounds: which rows' batch times pair up (report.rows.speedup_over)
    timed_at = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds")
    times: list[list[float]] = [[] for _ in runs]
    try:
        with torch.inference_mode():
            for (model, _), x in zip(runs, xs):
                model.to(dev).eval()
                for _ in range(warmup):
                    model(x)
            for r in range(repeats):  # each round starts one model further on: no fixed predecessor
                for j in range(len(runs)):
                    i = (r + j) % len(runs)
                    model, x = runs[i][0], xs[i]
                    times[i].append(timed_call(lambda: model(x), dev))
    finally:
        for (model, _), mode in zip(runs, modes):
            model.train(mode)
    common = {
        "batch": batch, "crop": [h, w], "warmup": warmup, "repeats": repeats, "statistic": statistic,
        "timed_at": timed_at, "dtype": "float32", "device": device_name(dev), "device_type": dev.type,
        "threads": torch.get_num_threads(),
        **software_versions(dev),
    }
    rows = []
    for t in times:
        med, fastest, slowest = statistics.median(t), min(t), max(t)
        headline = fastest if statistic == "best" else med
        rows.append({
            "images_per_s": batch / headline,
            "images_per_s_median": batch / med,
            "images_per_s_min": batch / slowest,
            "images_per_s_max": batch / fastest,
            "batch_time_s": headline,
            "batch_time_s_median": med,
            "batch_time_s_min": fastest,
            "batch_time_s_max": slowest,
            "batch_times_s": list(t),
            **common,
        })
    return rows
