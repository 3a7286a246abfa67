"""Figures of the report, drawn from the points and per-corruption tables (benchmark.csv alone).

* :func:`accuracy_compute` — the study's Fig. 2: one column per (dataset, backbone), top row clean
  mIoU, bottom row corrupted mIoU, against achieved GFLOPs; one line per method (points sorted by
  GFLOPs), the dense model as a star; with several seeds a shaded band of ± one std over seeds
  (an error bar for a method with a single point).
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
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from segcompress.io import atomic_path
from segcompress.report.aggregate import METHOD_LABELS, method_label, method_rank

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


def _colours(methods: Sequence[str]) -> dict[str, str]:
    """One colour per method, the same in every figure: the known methods by their fixed order,
    others after them alphabetically."""
    known = len(METHOD_LABELS)
    others = sorted(set(methods) - set(METHOD_LABELS))
    return {m: f"C{(list(METHOD_LABELS).index(m) if m in METHOD_LABELS else known + others.index(m)) % 10}"
            for m in set(methods)}


def _legend(fig: Any, axes: np.ndarray) -> None:
    handles, labels = [], []
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 3 * axes.shape[1]))


def _curves(ax: Any, pts: pd.DataFrame, value: str, std: str, colours: dict[str, str], scale: float) -> bool:
    """One line (with a ± std band) per method and a star for dense; False if nothing was drawn."""
    drawn = False
    for method, g in sorted(pts.groupby("method"), key=lambda kv: method_rank(kv[0])):
        g = g[g["gflops_mean"].notna() & g[value].notna()].sort_values("gflops_mean")
        if g.empty:
            continue
        x = g["gflops_mean"].to_numpy(float)
        y = g[value].to_numpy(float) * scale
        e = g[std].to_numpy(float) * scale
        colour, label = colours[method], method_label(method)
        if method == "dense" or len(x) == 1:  # a lone point: an error bar, as a band needs two
            style = {"marker": "*", "markersize": 13} if method == "dense" else {"marker": "o", "markersize": 4}
            ax.errorbar(x, y, yerr=None if np.isnan(e).all() else np.nan_to_num(e), color=colour, linestyle="none",
                        capsize=3, label=label, zorder=3, **style)
        else:
            ax.plot(x, y, marker="o", markersize=4, color=colour, label=label)
            if not np.isnan(e).all():
                e = np.nan_to_num(e)
                ax.fill_between(x, y - e, y + e, color=colour, alpha=0.2, linewidth=0)
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
    rows = (("clean_miou", "mIoU clean (%)"), ("corrupted_miou", "mIoU corrupted (%)"))
    for j, (ds, bb) in enumerate(panels):
        sub = pts[(pts["dataset"] == ds) & (pts["backbone"] == bb)]
        for i, (metric, ylabel) in enumerate(rows):
            ax = axes[i][j]
            if not _curves(ax, sub, f"{metric}_mean", f"{metric}_std", colours, 100.0):
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
            _curves(ax, sub, value, std, colours, 1.0)
            ax.invert_xaxis()
            _label_panel(ax, f"{ds} ({bb})" if i == 0 else "", ylabel)
    _legend(fig, axes)
    save(fig, png, pdf)


def heatmap_matrix(pc: pd.DataFrame, value: str) -> pd.DataFrame:
    """Rows "Method target" (dense first, then by method and decreasing target), columns corruptions."""
    pc = pc.copy()
    pc["row"] = [method_label(m) if m == "dense" else f"{method_label(m)} {t:g}" for m, t in zip(pc["method"], pc["target"])]
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
