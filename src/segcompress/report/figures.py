"""Figures of the report, drawn from the points and per-corruption tables (benchmark.csv alone).

* :func:`accuracy_compute` — the study's Fig. 2: one column per (dataset, backbone), top row clean
  mIoU, bottom row corrupted mIoU, against achieved GFLOPs (the corrupted row at each point's
  measured cost on corrupted images); one line per method (points sorted by GFLOPs), the dense
  model as a star and the dense control as a diamond; error bars: the 95 % image-bootstrap
  interval (± one std over seeds where the rows have no per-image areas). A point whose FLOPs
  target was not reached is drawn hollow and not joined to its method's line
  (:func:`curve_points` holds what decides it).
* :func:`effective_rank` — Fig. 4: normalised effective rank against GFLOPs (x axis decreasing,
  as the paper draws it), band of ± one std over images (pooled over seeds; dense: error bar); top row clean, a
  bottom row for corrupted images when the rank stage ran on any.
* :func:`corruption_heatmap` — per-corruption mIoU (or relative robustness) of every point, one
  panel per (dataset, backbone): rows method × target, columns corruptions, values annotated.

Every figure is written as PNG and PDF, atomically, without timestamps (byte-stable reruns).
A figure with nothing to draw still gets written, with a one-line message, so the workflow's
outputs do not depend on which analyses ran.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from segcompress.io import atomic_path
from segcompress.methods import labels
from segcompress.report.aggregate import is_reference, method_label, method_rank

X_LABEL = "achieved GFLOPs (GMACs, one crop)"


def _figure(ncols: int, nrows: int, width: float = 4.2, height: float = 3.2) -> tuple[Any, np.ndarray]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * max(ncols, 1), height * nrows + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, max(ncols, 1), squeeze=False)


def save(fig: Any, png: str | Path, pdf: str | Path) -> None:
    """Write ``fig`` as PNG (150 dpi) and PDF, atomically and without timestamps."""
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png", dpi=150, metadata={"Software": None})
    with atomic_path(pdf) as tmp:
        fig.savefig(tmp, format="pdf", metadata={"CreationDate": None, "Creator": None, "Producer": None})


def _empty(png: str | Path, pdf: str | Path, message: str) -> None:
    fig, axes = _figure(1, 1, 5.0, 1.6)
    ax = axes[0][0]
    ax.text(0.5, 0.5, message, ha="center", va="center", wrap=True)
    ax.set_axis_off()
    save(fig, png, pdf)


def _colours(methods: Sequence[str]) -> dict[str, Any]:
    """One colour per method, the same in every figure: the known methods by their fixed order,
    others after them alphabetically."""
    from matplotlib import colormaps

    order = list(labels())
    others = sorted(set(methods) - set(order))

    def colour(i: int) -> Any:  # matplotlib's 10 default colours, then tab20b's
        return f"C{i}" if i < 10 else colormaps["tab20b"]((i - 10) % 20)

    return {m: colour(order.index(m) if m in order else len(order) + others.index(m)) for m in set(methods)}


UNREACHED_LABEL = "target not reached"


def _legend(fig: Any, axes: np.ndarray) -> None:
    """One legend below the panels: methods in drawing order, the unreached-target marker last."""
    entries: dict[str, Any] = {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(lab, h)
    if UNREACHED_LABEL in entries:
        entries[UNREACHED_LABEL] = entries.pop(UNREACHED_LABEL)
    if entries:
        fig.legend(list(entries.values()), list(entries), loc="outside lower center",
                   ncols=min(len(entries), 2 * axes.shape[1]))


@dataclass(frozen=True)
class Curve:
    """What one method's points look like in a panel: coordinates (sorted by x), error-bar
    bounds (NaN: none), which points are hollow (target not reached: drawn apart, not joined)."""

    method: str
    x: np.ndarray
    y: np.ndarray
    low: np.ndarray
    high: np.ndarray
    hollow: np.ndarray

    @property
    def joined(self) -> np.ndarray:
        """The points on the method's line: the reached ones of a compressed method."""
        return ~self.hollow if not is_reference(self.method) else np.zeros_like(self.hollow)


def curve_points(pts: pd.DataFrame, value: str, x: str = "gflops_mean", spread: str | None = None,
                 interval: tuple[str, str] | None = None, scale: float = 1.0) -> list[Curve]:
    """One :class:`Curve` per method with a value (known methods first). Error bars come from the
    ``interval`` columns where they are numbers, else ``value`` ± the ``spread`` column."""
    out = []
    for method, g in sorted(pts.groupby("method"), key=lambda kv: method_rank(kv[0])):
        xs = g[x] if x in g.columns else g["gflops_mean"]
        xs = xs.where(xs.notna(), g["gflops_mean"])
        g = g.assign(_x=xs)[xs.notna() & g[value].notna()].sort_values("_x")
        if g.empty:
            continue
        y = g[value].to_numpy(float)
        e = g[spread].to_numpy(float) if spread and spread in g.columns else np.full(len(g), np.nan)
        low, high = y - e, y + e
        if interval and interval[0] in g.columns:
            lo, hi = g[interval[0]].to_numpy(float), g[interval[1]].to_numpy(float)
            has = ~(np.isnan(lo) | np.isnan(hi))
            low, high = np.where(has, lo, low), np.where(has, hi, high)
        reached = g["target_reached"] if "target_reached" in g.columns else pd.Series(pd.NA, g.index)
        hollow = np.array([pd.notna(r) and not bool(r) for r in reached], dtype=bool)
        out.append(Curve(str(method), g["_x"].to_numpy(float), y * scale, low * scale, high * scale, hollow))
    return out


REFERENCE_MARKERS: dict[str, dict[str, Any]] = {"dense": {"marker": "*", "markersize": 13},
                                                 "dense_control": {"marker": "D", "markersize": 7}}


def _errorbar(ax: Any, c: Curve, sel: np.ndarray, colour: str, label: str | None, **style: Any) -> None:
    """Markers (``style``; ``marker="none"`` for bars only) and one vertical bar per point from
    ``low`` to ``high`` where both are numbers, as a single collection (cheap to lay out)."""
    x, y, low, high = c.x[sel], c.y[sel], c.low[sel], c.high[sel]
    if style.get("marker") != "none":
        ax.plot(x, y, color=colour, linestyle="none", label=label, zorder=3, **style)
    bars = ~(np.isnan(low) | np.isnan(high))
    if bars.any():
        ax.vlines(x[bars], low[bars], high[bars], color=colour, linewidth=1.2, zorder=2)


def _curves(ax: Any, pts: pd.DataFrame, value: str, std: str, colours: dict[str, str], scale: float,
            x: str = "gflops_mean", interval: tuple[str, str] | None = None, band: bool = False) -> bool:
    """One line per method (error bars, or a ± std band with ``band``), a marker per reference,
    hollow unjoined markers for unreached targets; False if nothing was drawn."""
    drawn = False
    for c in curve_points(pts, value, x, std, interval, scale):
        colour, label = colours[c.method], method_label(c.method)
        if is_reference(c.method):
            _errorbar(ax, c, np.ones(len(c.x), bool), colour, label, **REFERENCE_MARKERS.get(c.method, {"marker": "s"}))
            drawn = True
            continue
        on = c.joined
        if on.any():
            ax.plot(c.x[on], c.y[on], marker="o", markersize=4, color=colour, label=label)
            if band and on.sum() > 1 and not np.isnan(c.low[on]).all():
                ax.fill_between(c.x[on], np.nan_to_num(c.low[on]), np.nan_to_num(c.high[on]), color=colour, alpha=0.2,
                                linewidth=0)
            else:
                _errorbar(ax, c, on, colour, None, marker="none")
        if c.hollow.any():
            _errorbar(ax, c, c.hollow, colour, None if on.any() else label, marker="o", markersize=6,
                      markerfacecolor="none")
            ax.plot([], [], marker="o", markerfacecolor="none", color="grey", linestyle="none",
                    label=UNREACHED_LABEL)
        drawn = True
    return drawn


def accuracy_compute(pts: pd.DataFrame, png: str | Path, pdf: str | Path) -> None:
    """Fig. 2: clean (top) and corrupted (bottom) mIoU against achieved GFLOPs."""
    panels = sorted({(d, b) for d, b in zip(pts["dataset"], pts["backbone"])})
    if not panels:
        _empty(png, pdf, "no result rows")
        return
    fig, axes = _figure(len(panels), 2)
    colours = _colours(pts["method"])
    rows = (("clean_miou", "gflops_mean", "mIoU clean (%)"),
            ("corrupted_miou", "gflops_corrupted_mean", "mIoU corrupted (%)"))
    for j, (ds, bb) in enumerate(panels):
        sub = pts[(pts["dataset"] == ds) & (pts["backbone"] == bb)]
        for i, (metric, x, ylabel) in enumerate(rows):
            ax = axes[i][j]
            if not _curves(ax, sub, f"{metric}_mean", f"{metric}_std", colours, 100.0, x,
                           (f"{metric}_ci_low", f"{metric}_ci_high")):
                ax.text(0.5, 0.5, "not evaluated", ha="center", va="center", transform=ax.transAxes)
            _label_panel(ax, f"{ds} ({bb})" if i == 0 else "", ylabel)
    _legend(fig, axes)
    save(fig, png, pdf)


def _label_panel(ax: Any, title: str, ylabel: str) -> None:
    """Title, axis labels (GFLOPs on x) and grid of one curve panel."""
    ax.set_title(title)
    ax.set_xlabel(X_LABEL)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)


def effective_rank(pts: pd.DataFrame, png: str | Path, pdf: str | Path) -> None:
    """Fig. 4: normalised effective rank against achieved GFLOPs (decreasing to the right)."""
    has = pts[pts["erank_clean_mean"].notna() | pts["erank_corrupted_mean"].notna()]
    panels = sorted({(d, b) for d, b in zip(has["dataset"], has["backbone"])})
    if not panels:
        _empty(png, pdf, "no effective-rank rows (the analysis stage did not run)")
        return
    rows = [("erank_clean_mean", "erank_clean_img_std", "normalised erank, clean")]
    if has["erank_corrupted_mean"].notna().any():
        rows.append(("erank_corrupted_mean", "erank_corrupted_img_std", "normalised erank, corrupted"))
    fig, axes = _figure(len(panels), len(rows))
    colours = _colours(has["method"])
    for j, (ds, bb) in enumerate(panels):
        sub = has[(has["dataset"] == ds) & (has["backbone"] == bb)]
        for i, (value, std, ylabel) in enumerate(rows):
            ax = axes[i][j]
            _curves(ax, sub, value, std, colours, 1.0, band=True)
            ax.invert_xaxis()
            _label_panel(ax, f"{ds} ({bb})" if i == 0 else "", ylabel)
    _legend(fig, axes)
    save(fig, png, pdf)


def heatmap_matrix(pc: pd.DataFrame, value: str) -> pd.DataFrame:
    """Rows "Method target" (dense first, then by method and decreasing target), columns corruptions."""
    pc = pc.copy()
    texts = pc["target_text"] if "target_text" in pc.columns else pd.Series([f"{t:g}" for t in pc["target"]], pc.index)
    pc["row"] = [method_label(m) if is_reference(m) else f"{method_label(m)} {t}" for m, t in zip(pc["method"], texts)]
    order = (pc.drop_duplicates("row")
             .assign(rank=lambda d: [method_rank(m) for m in d["method"]])
             .sort_values(["rank", "target"], ascending=[True, False])["row"].tolist())
    cols = pc.drop_duplicates("corruption").sort_values(["category", "corruption"])["corruption"].tolist()
    return pc.pivot_table(index="row", columns="corruption", values=value, aggfunc="mean").reindex(index=order,
                                                                                                  columns=cols)


def corruption_heatmap(pc: pd.DataFrame, png: str | Path, pdf: str | Path, value: str = "miou") -> None:
    """Per-corruption mIoU (%) or relative robustness, one panel per (dataset, backbone)."""
    if pc.empty:
        _empty(png, pdf, "no corrupted rows (study.corruptions is empty)")
        return
    panels = sorted({(d, b) for d, b in zip(pc["dataset"], pc["backbone"])})
    mats = {p: heatmap_matrix(pc[(pc["dataset"] == p[0]) & (pc["backbone"] == p[1])], value) for p in panels}
    nrows = max(len(m.index) for m in mats.values())
    ncols = max(len(m.columns) for m in mats.values())
    fig, axes = _figure(len(panels), 1, width=1.0 + 0.9 * ncols, height=0.8 + 0.32 * nrows)
    scale, fmt, label = (100.0, "{:.1f}", "mIoU (%)") if value == "miou" else (1.0, "{:.2f}", "corrupted / clean mIoU")
    for j, p in enumerate(panels):
        ax, mat = axes[0][j], mats[p] * scale
        im = ax.imshow(mat.to_numpy(float), aspect="auto", cmap="viridis")
        ax.set_xticks(range(len(mat.columns)), [c.replace("_", " ") for c in mat.columns], rotation=35, ha="right",
                      fontsize=8)
        ax.set_yticks(range(len(mat.index)), mat.index, fontsize=8)
        finite = mat.to_numpy(float)[np.isfinite(mat.to_numpy(float))]
        mid = (finite.min() + finite.max()) / 2 if finite.size else 0.0
        for (r, c), v in np.ndenumerate(mat.to_numpy(float)):
            if not math.isnan(v):
                ax.text(c, r, fmt.format(v), ha="center", va="center", fontsize=7,
                        color="black" if v > mid else "white")
        ax.set_title(f"{p[0]} ({p[1]})")
        fig.colorbar(im, ax=ax, label=label, shrink=0.8)
    save(fig, png, pdf)
