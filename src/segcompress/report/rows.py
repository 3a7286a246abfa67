"""Raw rows -> the long-format table ``results/benchmark.csv``.

One CSV row per raw evaluation row (``results/raw/**/*.json``, written by ``segcompress
evaluate``): a row is one variant on one condition (clean, or one corruption at one severity) and
nothing else, whatever other stages ran. Two per-variant measurements are joined onto those rows
as columns, never as rows of their own:

* throughput (``segcompress bench`` rows, ``results/raw_bench/**``): ``images_per_s``,
  ``speedup`` (over the dense model of the same dataset, backbone and seed, timed in the same
  job), ``bench_statistic`` (which timed batch gave images/s: ``best`` or ``median``) and
  ``bench_batch`` / ``bench_device`` / ``bench_threads``, the same value on every
  condition of a variant (throughput does not depend on the image content for input-independent
  methods; ALGM and CTS are timed on a real val image);
* effective rank (``segcompress rank`` rows, ``results/raw_rank/**``): ``erank_mean``,
  ``erank_std`` and ``erank_images`` on the row of the same variant *and* condition; conditions
  the rank stage did not run on stay empty.

A side row is matched to a variant by (dataset, backbone, method, target_fraction, seed).

Two columns say whether a point reached its FLOPs target (:func:`mark_targets`), on every row
with a target: ``achieved_fraction`` = the row's ``achieved_gflops`` / the dense model's GFLOPs
(``target_gflops / target_fraction``, else the dense row's achieved GFLOPs of the same dataset and
backbone), i.e. where the row's point sits; ``target_reached`` = the match's verdict: the row's
``within_tolerance`` when it carries one, else ``|cost − target_gflops| ≤ tolerance·target_gflops``
with cost the ``calibration_gflops`` the knob was matched on (input-dependent methods, whose
per-condition cost may move away from it) or ``achieved_gflops``, and the row's ``tolerance``
(else the study's, 1 % by default, then written to the row's ``tolerance`` column).
``miou_ci_low`` / ``miou_ci_high`` are the row's 95 % image-level bootstrap interval
(:mod:`segcompress.report.stats`) when it has ``per_image`` areas; older rows without them get
empty cells. ``per_image`` itself stays in the table (compact JSON),
so the report's intervals and paired comparisons can be recomputed from ``benchmark.csv`` alone.

Columns:
the contract's (:data:`COLUMNS`) first in a fixed order, then any further columns alphabetically;
rows sorted by dataset, backbone, method, target (least compressed first), seed, corruption
(clean first), severity.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import statistics
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from segcompress.corrupt import CATEGORY_OF
from segcompress.report import stats

log = logging.getLogger(__name__)

# Columns of a results row (docs/contracts.md), in the order they appear in benchmark.csv.
COLUMNS: tuple[str, ...] = (
    "dataset",
    "backbone",
    "method",
    "knob",
    "target_fraction",
    "target_gflops",
    "achieved_gflops",
    "gflops_std",
    "achieved_fraction",
    "target_reached",
    "params_m",
    "corruption",
    "category",
    "severity",
    "seed",
    "miou",
    "miou_ci_low",
    "miou_ci_high",
    "aacc",
    "macc",
    "num_images",
    "images_per_s",
    "speedup",
    "erank_mean",
    "erank_std",
    "device",
    "torch",
    "timm",
)
# A raw row without one of these cannot be placed in the table.
REQUIRED: tuple[str, ...] = ("dataset", "backbone", "method", "corruption", "severity", "seed", "miou")
# A side row (rank, bench) without these cannot be matched to a variant.
SIDE_REQUIRED: tuple[str, ...] = ("dataset", "backbone", "method", "seed")
#: Relative FLOPs tolerance of a target when neither the row nor the caller gives one (the
#: default of the config's ``matching.tolerance``).
TOLERANCE = 0.01

# Corruption -> category (noise, blur, weather, digital): the corruption stage's own table.
CORRUPTION_CATEGORIES: dict[str, str] = dict(CATEGORY_OF)
CATEGORIES: tuple[str, ...] = ("noise", "blur", "weather", "digital")


def category_of(corruption: str) -> str:
    """Category of a corruption name (``clean`` for clean images, ``other`` if unknown)."""
    if corruption == "clean":
        return "clean"
    return CORRUPTION_CATEGORIES.get(corruption, "other")


# --------------------------------------------------------------------------------------------
# Reading and normalising raw rows


def find_row_files(paths: Iterable[str | Path]) -> list[Path]:
    """The JSON files named in ``paths``; a folder stands for every ``*.json`` below it."""
    files: set[Path] = set()
    for p in map(Path, paths):
        if p.is_dir():
            files.update(q for q in p.rglob("*.json") if not q.name.startswith("."))
        elif p.is_file():
            files.add(p)
        else:
            raise FileNotFoundError(f"{p}: no such file or folder (expected raw result rows)")
    return sorted(files)


def _knob_text(knob: Any) -> str:
    """One spelling per knob: compact JSON with sorted keys; empty for no knob."""
    if isinstance(knob, str):
        try:
            knob = json.loads(knob) if knob.strip() else None
        except json.JSONDecodeError:
            return knob
    if knob is None or knob == {}:
        return ""
    return _json(knob)


def num(v: Any) -> float:
    """A number for sorting, matching and averaging (NaN for missing or non-numeric)."""
    if v is None or v == "":
        return math.nan
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def normalise_row(row: Mapping[str, Any], source: str | Path = "<row>") -> dict[str, Any]:
    """Check one raw row and bring it to the table's conventions.

    ``knob`` becomes a compact JSON string (empty for none), ``category`` is filled from the
    corruption name when missing, clean rows get severity 0, nested values become JSON strings
    (except ``per_image``, kept as a list for :func:`add_intervals` and written as compact JSON).
    """
    if not isinstance(row, Mapping):
        raise ValueError(f"{source}: a raw result row must be a JSON object, got {type(row).__name__}")
    missing = [k for k in REQUIRED if k not in row or row[k] is None]
    if missing:
        raise ValueError(
            f"{source}: raw result row lacks {', '.join(missing)}; rerun `segcompress evaluate` "
            "with the workflow's --tag options (or delete the file)"
        )
    out = dict(row)
    out["knob"] = _knob_text(row.get("knob"))
    out["corruption"] = str(row["corruption"])
    out["severity"] = 0 if out["corruption"] == "clean" else int(row["severity"])
    out["seed"] = int(row["seed"])
    if not out.get("category"):
        out["category"] = category_of(out["corruption"])
    for k, v in out.items():
        if isinstance(v, (dict, list, tuple)) and k != "per_image":
            out[k] = _json(v)
    return out


def _json(v: Any) -> str:
    """Compact JSON with sorted keys: the table's one spelling of a nested value."""
    return json.dumps(v, sort_keys=True, separators=(",", ":"))


def _identity(row: Mapping[str, Any]) -> tuple:
    return (
        row["dataset"],
        row["backbone"],
        row["method"],
        row["knob"],
        num(row.get("target_fraction")),
        row["seed"],
        row["corruption"],
        row["severity"],
    )


def _sort_key(row: Mapping[str, Any]) -> tuple:
    target = num(row.get("target_fraction"))
    return (
        str(row["dataset"]),
        str(row["backbone"]),
        str(row["method"]),
        # highest fraction (least compressed) first; dense (no target) before all
        -(1.0 if math.isnan(target) else target),
        row["knob"],
        row["seed"],
        row["corruption"] != "clean",
        row["corruption"],
        row["severity"],
    )


def _read(f: Path) -> Any:
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{f}: invalid JSON ({e}); delete it and rerun the job that wrote it") from None


def load_rows(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """Read, check and sort every raw row under ``paths``; duplicates are an error."""
    rows: list[dict[str, Any]] = []
    seen: dict[tuple, Path] = {}
    for f in find_row_files(paths):
        row = normalise_row(_read(f), f)
        key = _identity(row)
        if key in seen:
            raise ValueError(f"{f}: duplicates the result row of {seen[key]} (same variant and condition)")
        seen[key] = f
        rows.append(row)
    rows.sort(key=_sort_key)
    return rows


# --------------------------------------------------------------------------------------------
# Joining per-variant measurements (throughput, effective rank)


def variant_key(row: Mapping[str, Any]) -> tuple:
    """(dataset, backbone, method, target_fraction rounded, seed): a model variant."""
    target = num(row.get("target_fraction"))
    return (
        str(row["dataset"]),
        str(row["backbone"]),
        str(row["method"]),
        None if math.isnan(target) else round(target, 6),
        int(row["seed"]),
    )


def _condition(row: Mapping[str, Any]) -> tuple[str, int]:
    corruption = str(row.get("corruption") or "clean")
    return corruption, 0 if corruption == "clean" else int(row["severity"])


def load_side_rows(paths: Iterable[str | Path], what: str, with_condition: bool) -> dict[tuple, dict[str, Any]]:
    """Rank or bench rows under ``paths``, keyed by variant (and condition); duplicates are an error."""
    out: dict[tuple, dict[str, Any]] = {}
    where: dict[tuple, Path] = {}
    for f in find_row_files(paths):
        row = _read(f)
        if not isinstance(row, Mapping):
            raise ValueError(f"{f}: a {what} row must be a JSON object")
        missing = [k for k in SIDE_REQUIRED if row.get(k) is None]
        if missing:
            raise ValueError(f"{f}: {what} row lacks {', '.join(missing)}; rerun it with the workflow's --tag options")
        key = variant_key(row) + (_condition(row) if with_condition else ())
        if key in out:
            raise ValueError(f"{f}: duplicates the {what} row of {where[key]} (same variant{' and condition' * with_condition})")
        out[key], where[key] = dict(row), f
    return out


def join_throughput(rows: list[dict[str, Any]], bench: Mapping[tuple, Mapping[str, Any]]) -> int:
    """Set ``images_per_s``, its spread over the timed repeats (``images_per_s_min``, ``_median``,
    ``_max``), the statistic it was taken by, batch, device, threads and ``speedup`` on every row
    of a benched variant.

    ``speedup`` is over the dense model of the same dataset, backbone and seed (:func:`speedup_over`).
    Every variant of a seed is timed in one job, in interleaved rounds (``segcompress bench``), so
    the ratio holds when the machine's own speed drifts between runs, which moves all of a job's
    images/s alike.

    Returns the number of bench rows that matched no result row (they are left out, with a warning).
    """
    used: set[tuple] = set()
    for r in rows:
        b = bench.get(variant_key(r))
        if b is None:
            continue
        used.add(variant_key(r))
        dense_row = bench.get(variant_key({**r, "method": "dense", "target_fraction": None}), {})
        r.update(images_per_s=b.get("images_per_s"), images_per_s_min=b.get("images_per_s_min"),
                 images_per_s_median=b.get("images_per_s_median"), images_per_s_max=b.get("images_per_s_max"),
                 bench_statistic=b.get("statistic"), bench_batch=b.get("batch"), bench_device=b.get("device"),
                 bench_threads=b.get("threads"),
                 speedup=speedup_over(b, dense_row))
    unused = len(set(bench) - used)
    if unused:
        log.warning("%d throughput row(s) match no result row (variant not evaluated); left out", unused)
    return unused


def speedup_over(row: Mapping[str, Any], dense: Mapping[str, Any]) -> float | None:
    """A bench row's speed-up over the dense model's bench row of the same job.

    Paired round by round where both rows come from the same timing rounds (the same
    ``timed_at``) and carry ``batch_times_s``: the median over the rounds of the dense batch time
    over the variant's in the same round. Each round of
    ``segcompress bench`` times one batch of every variant within about a second
    (:func:`segcompress.bench.measure_throughputs`), so a slow spell of the machine falls on both
    batches of a pair, and the paired median moves far less between two runs of a study than a
    ratio of two separately taken statistics (docs/methods.md §7.3). Other rows (timed apart, or
    written before batch times were recorded) give the ratio of their ``images_per_s``. None
    without a dense row.
    """
    times, ref = row.get("batch_times_s") or [], dense.get("batch_times_s") or []
    same_rounds = row.get("timed_at") is not None and row.get("timed_at") == dense.get("timed_at")
    if same_rounds and times and len(times) == len(ref):
        return float(statistics.median(r / t for r, t in zip(ref, times)))
    ips, dense_ips = row.get("images_per_s"), dense.get("images_per_s")
    return ips / dense_ips if ips is not None and dense_ips else None


def join_rank(rows: list[dict[str, Any]], ranks: Mapping[tuple, Mapping[str, Any]]) -> int:
    """Set ``erank_mean``, ``erank_std`` (the selected normalisation), ``erank_raw_mean``,
    ``erank_raw_std`` and ``erank_images`` on the row of the same variant and condition.

    Returns the number of rank rows that matched no result row (left out, with a warning).
    """
    used: set[tuple] = set()
    for r in rows:
        key = variant_key(r) + _condition(r)
        k = ranks.get(key)
        if k is None:
            continue
        used.add(key)
        r.update(erank_mean=k.get("erank_mean"), erank_std=k.get("erank_std"), erank_images=k.get("num_images"),
                 erank_raw_mean=k.get("erank_raw_mean"), erank_raw_std=k.get("erank_raw_std"))
    unused = len(set(ranks) - used)
    if unused:
        log.warning("%d effective-rank row(s) match no result row (condition not evaluated); left out", unused)
    return unused


# --------------------------------------------------------------------------------------------
# Targets reached and per-row intervals


def _dense_gflops(rows: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str], float]:
    """Mean achieved GFLOPs of the dense model's rows per (dataset, backbone)."""
    found: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        g = num(r.get("achieved_gflops"))
        if r["method"] == "dense" and not math.isnan(g):
            found.setdefault((str(r["dataset"]), str(r["backbone"])), []).append(g)
    return {k: sum(v) / len(v) for k, v in found.items()}


def _flag(v: Any) -> bool | None:
    """A boolean cell (bool, or the CSV/JSON spellings true/false/1/0); None when missing."""
    if isinstance(v, bool) or v is None:
        return v
    text = str(v).strip().lower()
    return {"true": True, "1": True, "1.0": True, "false": False, "0": False, "0.0": False}.get(text)


def mark_targets(rows: list[dict[str, Any]], tolerance: float = TOLERANCE) -> int:
    """Set ``achieved_fraction`` and ``target_reached`` on every row with a target (see the module
    docstring); returns the number of rows that did not reach theirs. A row whose verdict had to
    be computed also gets the ``tolerance`` it was computed with."""
    dense = _dense_gflops(rows)
    missed = 0
    for r in rows:
        target = num(r.get("target_fraction"))
        if math.isnan(target) or target <= 0:
            continue
        target_g, achieved = num(r.get("target_gflops")), num(r.get("achieved_gflops"))
        reference = target_g / target if not math.isnan(target_g) else \
            dense.get((str(r["dataset"]), str(r["backbone"])), math.nan)
        if math.isnan(target_g):
            target_g = target * reference
        if reference > 0 and not math.isnan(achieved):
            r["achieved_fraction"] = achieved / reference
        reached = _flag(r.get("within_tolerance"))
        if reached is None:
            cost = num(r.get("calibration_gflops"))
            cost = achieved if math.isnan(cost) else cost
            tol = num(r.get("tolerance"))
            if math.isnan(tol):
                tol = r["tolerance"] = tolerance
            reached = None if math.isnan(cost - target_g) else abs(cost - target_g) <= tol * target_g
        r["target_reached"] = reached
        missed += reached is False
    return missed


def per_image_of(row: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    """A row's ``per_image`` list (from the list or its JSON text); None when absent or empty."""
    v = row.get("per_image")
    if isinstance(v, str):
        v = json.loads(v) if v.strip() else None
    return v or None


def add_intervals(rows: list[dict[str, Any]], replicates: int = stats.REPLICATES, seed: int = stats.SEED) -> int:
    """Set ``miou_ci_low`` / ``miou_ci_high`` (95 % image bootstrap) on every row with ``per_image``;
    returns how many rows got one. Rows of one dataset share the image draws."""
    done = 0
    counts: dict[int, Any] = {}
    for r in rows:
        per_image = per_image_of(r)
        if per_image is None:
            continue
        n = len(per_image)
        if n not in counts:
            counts[n] = stats.bootstrap_counts(n, replicates, seed)
        k = 1 + max((max(p["classes"], default=-1) for p in per_image), default=-1)
        inter, union = stats.dense_areas(per_image, max(k, 1))
        r["miou_ci_low"], r["miou_ci_high"] = stats.interval(stats.miou_replicates(counts[n], inter, union))
        done += 1
    return done


# --------------------------------------------------------------------------------------------
# The long-format table


def columns_of(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The contract's columns in their order, then every other column alphabetically
    (``per_image`` goes to the table's sidecar, :func:`per_image_jsonl`)."""
    extra = sorted({k for r in rows for k in r} - set(COLUMNS) - {"per_image"})
    return [*COLUMNS, *extra]


def per_image_path(csv_path: str | Path) -> Path:
    """The sidecar of ``benchmark.csv`` that holds each row's per-image class areas
    (``benchmark.per_image.jsonl``): line i belongs to row i. They stay out of the CSV, which would
    otherwise grow by ~0.3 MB per row at 2,000 ADE20K images and be unusable in a spreadsheet."""
    path = Path(csv_path)
    return path.with_name(f"{path.stem}.per_image.jsonl")


def per_image_jsonl(rows: Sequence[Mapping[str, Any]]) -> str:
    """One line per row, in the CSV's order: its ``per_image`` list as compact JSON, or null."""
    lines = []
    for r in rows:
        v = r.get("per_image")
        lines.append(v if isinstance(v, str) else json.dumps(v, separators=(",", ":")))
    return "\n".join(lines) + "\n" if lines else ""


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "" if math.isnan(v) else repr(v)
    if isinstance(v, (dict, list, tuple)):
        return _json(v)
    return str(v)


def to_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    """The rows as CSV text (floats written with ``repr``, so they read back exactly)."""
    buf = io.StringIO()
    cols = columns_of(rows)
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(cols)
    for r in rows:
        writer.writerow([_cell(r.get(c)) for c in cols])
    return buf.getvalue()
