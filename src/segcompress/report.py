"""Aggregate the raw result rows into the long-format table, a summary table and the first figure.

Everything here is derived from the raw rows (``results/raw/**/*.json``, one flat JSON object per
evaluation, written by ``segcompress evaluate``) and nothing else, so a table or figure can always
be rebuilt from the rows alone.

- ``results/benchmark.csv``: one row per raw row, the columns of docs/contracts.md first in a fixed
  order, then any further columns in alphabetical order; rows sorted by dataset, backbone, method,
  target, seed, corruption (clean first), severity.
- ``results/tables/summary.md``: per dataset and backbone, one line per (method, target): achieved
  GFLOPs, clean mIoU and corrupted mIoU (mean ± std over seeds).
- ``results/figures/miou_vs_gflops.{png,pdf}``: mIoU against achieved GFLOPs, one line per method,
  one column of panels per dataset, top row clean, bottom row corrupted.

Corrupted mIoU of one model ("mIoU_noise" in the paper, whose definition is an open question) is
the mean over the selected corruptions of the mean over the selected severities
(Kamann & Rother's protocol); ``categories`` and ``severities`` select what enters it.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from segcompress.corrupt import CATEGORY_OF
from segcompress.io import atomic_path, atomic_write_text

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
    "params_m",
    "corruption",
    "category",
    "severity",
    "seed",
    "miou",
    "aacc",
    "macc",
    "num_images",
    "device",
    "torch",
    "timm",
)
# A raw row without one of these cannot be placed in the table.
REQUIRED: tuple[str, ...] = ("dataset", "backbone", "method", "corruption", "severity", "seed", "miou")

# Corruption -> category (noise, blur, weather, digital): the corruption stage's own table.
CORRUPTION_CATEGORIES: dict[str, str] = dict(CATEGORY_OF)
CATEGORIES: tuple[str, ...] = ("noise", "blur", "weather", "digital")

# Display names and drawing order of the known methods; other methods follow alphabetically.
METHOD_LABELS: dict[str, str] = {
    "dense": "Dense",
    "nvit": "NViT",
    "tome": "ToMe",
    "algm": "ALGM",
    "cts": "CTS",
    "nvit_tome": "NViT+ToMe",
}


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
    return json.dumps(knob, sort_keys=True, separators=(",", ":"))


def normalise_row(row: Mapping[str, Any], source: str | Path = "<row>") -> dict[str, Any]:
    """Check one raw row and bring it to the table's conventions.

    ``knob`` becomes a compact JSON string (empty for none), ``category`` is filled from the
    corruption name when missing, clean rows get severity 0, nested values become JSON strings.
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
        if isinstance(v, (dict, list, tuple)):
            out[k] = json.dumps(v, sort_keys=True, separators=(",", ":"))
    return out


def _identity(row: Mapping[str, Any]) -> tuple:
    return (
        row["dataset"],
        row["backbone"],
        row["method"],
        row["knob"],
        _num(row.get("target_fraction")),
        row["seed"],
        row["corruption"],
        row["severity"],
    )


def _num(v: Any) -> float:
    """A number for sorting and averaging (NaN for missing or non-numeric)."""
    if v is None or v == "":
        return math.nan
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _sort_key(row: Mapping[str, Any]) -> tuple:
    target = _num(row.get("target_fraction"))
    return (
        str(row["dataset"]),
        str(row["backbone"]),
        str(row["method"]),
        # highest fraction (least compression) first; dense (no target) before all
        -(1.0 if math.isnan(target) else target),
        row["knob"],
        row["seed"],
        row["corruption"] != "clean",
        row["corruption"],
        row["severity"],
    )


def load_rows(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """Read, check and sort every raw row under ``paths``; duplicates are an error."""
    rows: list[dict[str, Any]] = []
    seen: dict[tuple, Path] = {}
    for f in find_row_files(paths):
        try:
            data = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{f}: invalid JSON ({e}); delete it and rerun its evaluation") from None
        row = normalise_row(data, f)
        key = _identity(row)
        if key in seen:
            raise ValueError(f"{f}: duplicates the result row of {seen[key]} (same variant and condition)")
        seen[key] = f
        rows.append(row)
    rows.sort(key=_sort_key)
    return rows


# --------------------------------------------------------------------------------------------
# The long-format table


def columns_of(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The contract's columns in their order, then every other column alphabetically."""
    extra = sorted({k for r in rows for k in r} - set(COLUMNS))
    return [*COLUMNS, *extra]


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "" if math.isnan(v) else repr(v)
    return str(v)


def to_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    buf = io.StringIO()
    cols = columns_of(rows)
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(cols)
    for r in rows:
        writer.writerow([_cell(r.get(c)) for c in cols])
    return buf.getvalue()


# --------------------------------------------------------------------------------------------
# Aggregation: one point per (dataset, backbone, method, target) over seeds


@dataclass
class Point:
    """One compressed model (method at one target) aggregated over its seeds."""

    dataset: str
    backbone: str
    method: str
    target_fraction: float
    gflops: list[float] = field(default_factory=list)
    params_m: list[float] = field(default_factory=list)
    clean: list[float] = field(default_factory=list)
    corrupted: list[float] = field(default_factory=list)
    by_category: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))


def _mean(xs: Sequence[float]) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return sum(xs) / len(xs) if xs else math.nan


def _std(xs: Sequence[float]) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    if len(xs) < 2:
        return math.nan
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def corrupted_miou(
    rows: Sequence[Mapping[str, Any]],
    categories: Sequence[str] | None = None,
    severities: Sequence[int] | None = None,
) -> float:
    """Mean over corruptions of the mean over severities, of one model's corrupted rows.

    ``categories`` / ``severities`` restrict what enters (``None``: all present).
    """
    per_corruption: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        if r["corruption"] == "clean":
            continue
        if categories is not None and r["category"] not in categories:
            continue
        if severities is not None and int(r["severity"]) not in severities:
            continue
        per_corruption[r["corruption"]].append(_num(r["miou"]))
    return _mean([_mean(v) for v in per_corruption.values()]) if per_corruption else math.nan


def aggregate(
    rows: Sequence[Mapping[str, Any]],
    categories: Sequence[str] | None = None,
    severities: Sequence[int] | None = None,
) -> list[Point]:
    """Group rows by model (seed included), reduce conditions, then collect seeds per point."""
    models: dict[tuple, list[Mapping[str, Any]]] = defaultdict(list)
    for r in rows:
        target = _num(r.get("target_fraction"))
        target = 1.0 if math.isnan(target) else target
        models[(r["dataset"], r["backbone"], r["method"], target, r["seed"])].append(r)
    points: dict[tuple, Point] = {}
    for (ds, bb, method, target, _seed), group in models.items():
        p = points.setdefault((ds, bb, method, target), Point(ds, bb, method, target))
        clean = [r for r in group if r["corruption"] == "clean"]
        gfl = [_num(r.get("achieved_gflops")) for r in clean] or [_num(r.get("achieved_gflops")) for r in group]
        p.gflops.append(_mean(gfl))
        p.params_m.append(_mean([_num(r.get("params_m")) for r in group]))
        p.clean.append(_mean([_num(r["miou"]) for r in clean]))
        p.corrupted.append(corrupted_miou(group, categories, severities))
        for cat in CATEGORIES:
            if categories is None or cat in categories:
                p.by_category[cat].append(corrupted_miou(group, [cat], severities))
    return sorted(points.values(), key=lambda p: (p.dataset, p.backbone, _method_rank(p.method), -p.target_fraction))


def _method_rank(method: str) -> tuple[int, str]:
    order = list(METHOD_LABELS)
    return (order.index(method), method) if method in order else (len(order), method)


# --------------------------------------------------------------------------------------------
# Summary table (markdown)


def _fmt(mean: float, std: float = math.nan, scale: float = 1.0, digits: int = 1) -> str:
    if math.isnan(mean):
        return "–"
    text = f"{mean * scale:.{digits}f}"
    if not math.isnan(std):
        text += f" ± {std * scale:.{digits}f}"
    return text


def summary_markdown(points: Sequence[Point], rows: Sequence[Mapping[str, Any]]) -> str:
    """Markdown tables: one per (dataset, backbone), one line per (method, target)."""
    lines = [
        "# Benchmark summary",
        "",
        f"Derived from {len(rows)} raw result rows. mIoU in %, mean ± std over seeds; corrupted mIoU = mean",
        "over corruptions of the mean over severities; GFLOPs are achieved GFLOPs (fvcore GMACs of one crop).",
    ]
    groups: dict[tuple[str, str], list[Point]] = defaultdict(list)
    for p in points:
        groups[(p.dataset, p.backbone)].append(p)
    cats = [c for c in CATEGORIES if any(not math.isnan(_mean(p.by_category.get(c, []))) for p in points)]
    for (ds, bb), pts in groups.items():
        lines += ["", f"## {ds} / {bb}", ""]
        head = ["method", "target", "GFLOPs", "params (M)", "mIoU clean", "mIoU corrupted", *cats, "seeds"]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|")
        for p in pts:
            cells = [
                METHOD_LABELS.get(p.method, p.method),
                "–" if p.method == "dense" else f"{p.target_fraction:g}",
                _fmt(_mean(p.gflops), digits=3),
                _fmt(_mean(p.params_m), digits=2),
                _fmt(_mean(p.clean), _std(p.clean), 100),
                _fmt(_mean(p.corrupted), _std(p.corrupted), 100),
                *[_fmt(_mean(p.by_category.get(c, [])), scale=100) for c in cats],
                str(len(p.clean)),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Figure


def plot_miou_vs_gflops(points: Sequence[Point], png: str | Path, pdf: str | Path) -> None:
    """mIoU (clean, top; corrupted, bottom) against achieved GFLOPs, one column per dataset."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    datasets = sorted({(p.dataset, p.backbone) for p in points})
    ncol = max(1, len(datasets))
    fig = Figure(figsize=(4.2 * ncol, 6.4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, ncol, squeeze=False)
    methods = sorted({p.method for p in points}, key=_method_rank)
    colors = {m: f"C{i}" for i, m in enumerate(methods)}
    for j, (ds, bb) in enumerate(datasets):
        for i, (attr, label) in enumerate((("clean", "mIoU clean (%)"), ("corrupted", "mIoU corrupted (%)"))):
            ax = axes[i][j]
            for m in methods:
                pts = [p for p in points if (p.dataset, p.backbone, p.method) == (ds, bb, m)]
                xy = [
                    (_mean(p.gflops), 100 * _mean(getattr(p, attr)), 100 * _std(getattr(p, attr)))
                    for p in pts
                ]
                xy = sorted((x, y, e) for x, y, e in xy if not (math.isnan(x) or math.isnan(y)))
                if not xy:
                    continue
                xs, ys, es = zip(*xy)
                errs = [0.0 if math.isnan(e) else e for e in es]
                style = dict(marker="*", markersize=12, linestyle="none") if m == "dense" else dict(marker="o")
                ax.errorbar(xs, ys, yerr=errs if any(errs) else None, color=colors[m], capsize=3,
                            label=METHOD_LABELS.get(m, m), **style)
            ax.set_title(f"{ds} ({bb})" if i == 0 else "")
            ax.set_xlabel("achieved GFLOPs (GMACs, one crop)")
            ax.set_ylabel(label)
            ax.grid(True, alpha=0.3)
    handles, labels = [], []
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 6))
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png", dpi=150, metadata={"Software": None})
    with atomic_path(pdf) as tmp:
        fig.savefig(tmp, format="pdf", metadata={"CreationDate": None, "Creator": None, "Producer": None})


# --------------------------------------------------------------------------------------------
# Entry point used by the `report` verb


def write_report(
    inputs: Iterable[str | Path],
    csv_path: str | Path,
    figures: str | Path,
    tables: str | Path,
    categories: Sequence[str] | None = None,
    severities: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Build benchmark.csv, the summary table and the figure from the raw rows under ``inputs``."""
    inputs = list(inputs)
    rows = load_rows(inputs)
    if not rows:
        raise ValueError(f"no raw result rows found in {', '.join(map(str, inputs))}; run the evaluate phase first")
    atomic_write_text(csv_path, to_csv(rows))
    no_gflops = sum(math.isnan(_num(r.get("achieved_gflops"))) for r in rows)
    if no_gflops:
        log.warning("%d of %d rows have no achieved_gflops; the figure leaves them out", no_gflops, len(rows))
    points = aggregate(rows, categories, severities)
    atomic_write_text(Path(tables) / "summary.md", summary_markdown(points, rows))
    plot_miou_vs_gflops(points, Path(figures) / "miou_vs_gflops.png", Path(figures) / "miou_vs_gflops.pdf")
    return {"rows": len(rows), "points": len(points), "csv": str(csv_path)}
