"""Intervals, paired verdicts and the dense model's per-class IoU, from ``benchmark.csv``'s
``per_image`` areas (:mod:`segcompress.report.stats` does the arithmetic).

* :func:`add_point_intervals` — every point's clean and corrupted mIoU gets its 95 % interval
  (``<clean|corrupted>_miou_ci_low`` / ``_high``), resampling images, the seeds averaged per
  replicate.
* :func:`verdict` — per (dataset, backbone, FLOPs target) and per metric (clean, corrupted): the
  best and the runner-up method among the points that reached the target, and whether the best
  differs from the runner-up, the dense control and the dense model significantly (paired: the
  same image draws for both; the difference and its interval in mIoU points).
* :func:`dense_classes` — the dense model's clean IoU of the largest classes (by pixel count) and
  of the classes with the smallest objects (mean area per image where present), with intervals.

Rows without ``per_image`` (older result files) give empty intervals and untested comparisons,
never an error. All rows of a point must list the same images in the same order; the images of
two compared points must be the same too (otherwise the comparison is left untested).
"""

from __future__ import annotations

import functools
import logging
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import pandas as pd

from segcompress.report import stats
from segcompress.report.aggregate import is_reference, method_label, method_rank, select_corrupted
from segcompress.report.rows import per_image_of

log = logging.getLogger(__name__)

#: The mIoUs with intervals and verdicts: ``<metric>_miou_mean`` in the points table.
VERDICT_METRICS: tuple[str, ...] = ("clean", "corrupted")
#: Comparisons of the verdict: the column prefix and the reference it names.
COMPARED: tuple[str, ...] = ("runner_up", "dense_control", "dense")


@dataclass
class Bootstrap:
    """The per-image areas of a benchmark table and the replicates computed from them (cached).

    ``replicates`` and ``seed`` fix the image draws (:func:`stats.bootstrap_counts`); every point
    on the same images is resampled with the same draws.
    """

    df: pd.DataFrame
    categories: Sequence[str] | None = None
    severities: Sequence[int] | None = None
    replicates: int = stats.REPLICATES
    seed: int = stats.SEED
    _parsed: dict[int, list[dict[str, Any]] | None] = field(default_factory=dict)
    _classes: dict[str, int] = field(default_factory=dict)
    _cache: dict[tuple, tuple[tuple[str, ...], np.ndarray] | None] = field(default_factory=dict)

    def per_image(self, index: int) -> list[dict[str, Any]] | None:
        """The ``per_image`` list of row ``index`` of :attr:`df` (None when absent)."""
        if index not in self._parsed:
            v = self.df.at[index, "per_image"] if "per_image" in self.df.columns else None
            self._parsed[index] = per_image_of({"per_image": v}) if isinstance(v, str) else None  # NaN: none
        return self._parsed[index]

    def num_classes(self, dataset: str) -> int:
        """1 + the largest class id in any ``per_image`` of ``dataset``."""
        if dataset not in self._classes:
            top = -1
            for i in self.df.index[self.df["dataset"] == dataset]:
                for img in self.per_image(i) or ():
                    top = max(top, max(img["classes"], default=-1))
            self._classes[dataset] = top + 1
        return max(self._classes[dataset], 1)

    def counts(self, n_images: int) -> np.ndarray:
        return _counts(n_images, self.replicates, self.seed)

    def areas(self, index: int,
              keys: Sequence[str] = ("intersect", "union")) -> tuple[tuple[str, ...], np.ndarray] | None:
        """(image names, areas (len(keys), images, classes)) of row ``index``; None without per_image."""
        per_image = self.per_image(index)
        if per_image is None:
            return None
        k = self.num_classes(str(self.df.at[index, "dataset"]))
        return tuple(str(p.get("name", "")) for p in per_image), stats.dense_areas(per_image, k, keys)

    def rows(self, point: tuple, which: str) -> pd.DataFrame:
        """The rows of ``point`` (dataset, backbone, method, target) entering ``which`` (clean, corrupted)."""
        ds, bb, method, target = point
        df = self.df
        sel = df[(df["dataset"] == ds) & (df["backbone"] == bb) & (df["method"] == method) & (df["target"] == target)]
        if which == "clean":
            return sel[sel["corruption"] == "clean"]
        sel = select_corrupted(sel, self.categories, self.severities)
        return sel[sel["corruption"] != "clean"]

    def point(self, point: tuple, which: str) -> tuple[tuple[str, ...], np.ndarray] | None:
        """(image names, (B,) replicates of the point's seed-mean mIoU) for ``which``; None when a
        row lacks per-image areas or the rows disagree on the images."""
        key = (point, which)
        if key not in self._cache:
            self._cache[key] = self._point(point, which)
        return self._cache[key]

    def _point(self, point: tuple, which: str) -> tuple[tuple[str, ...], np.ndarray] | None:
        rows = self.rows(point, which)
        if rows.empty:
            return None
        names: tuple[str, ...] | None = None
        per_seed: list[np.ndarray] = []
        for _, g in rows.groupby("seed", sort=True):
            conditions = {}
            for i, r in g.iterrows():
                got = self.areas(i)
                if got is None or (names is not None and got[0] != names):
                    if got is not None:
                        log.warning("%s: rows list different images; no interval", _name(point))
                    return None
                names, (inter, union) = got[0], got[1]
                conditions[(str(r["corruption"]), int(r["severity"]))] = (inter, union)
            counts = self.counts(len(names))
            if which == "clean":
                per_seed.append(stats.miou_replicates(counts, *next(iter(conditions.values()))))
            else:
                per_seed.append(stats.corrupted_replicates(counts, conditions))
        assert names is not None
        return names, np.mean(per_seed, axis=0)


@functools.lru_cache(maxsize=16)
def _counts(n: int, replicates: int, seed: int) -> np.ndarray:
    """The image draws for ``n`` images (cached, read-only: the same for every point on ``n`` images)."""
    counts = stats.bootstrap_counts(n, replicates, seed)
    counts.setflags(write=False)
    return counts


def _name(point: tuple) -> str:
    ds, bb, method, target = point
    return f"{ds} / {bb} / {method_label(method)}" + ("" if is_reference(method) else f" {target:g}")


def _key(row: pd.Series) -> tuple:
    return (row["dataset"], row["backbone"], row["method"], float(row["target"]))


def add_point_intervals(pts: pd.DataFrame, boot: Bootstrap) -> pd.DataFrame:
    """``pts`` with ``clean_miou_ci_low/high`` and ``corrupted_miou_ci_low/high`` (NaN where the
    rows have no per-image areas)."""
    pts = pts.copy()
    for which in VERDICT_METRICS:
        bounds = []
        for _, p in pts.iterrows():
            got = boot.point(_key(p), which)
            bounds.append(stats.interval(got[1]) if got is not None else (math.nan, math.nan))
        pts[f"{which}_miou_ci_low"] = [b[0] for b in bounds]
        pts[f"{which}_miou_ci_high"] = [b[1] for b in bounds]
    return pts


def compare(boot: Bootstrap, a: pd.Series, b: pd.Series, which: str) -> stats.Comparison | None:
    """Paired comparison of points ``a`` − ``b`` on ``which`` mIoU (None when not testable)."""
    ra, rb = boot.point(_key(a), which), boot.point(_key(b), which)
    if ra is None or rb is None or ra[0] != rb[0]:
        return None
    return stats.paired(ra[1], rb[1], float(a[f"{which}_miou_mean"] - b[f"{which}_miou_mean"]))


def phrase(other: str, c: stats.Comparison | None) -> str:
    """How the best compares with ``other``: "better than" / "worse than" only when significant."""
    if c is None:
        return f"not tested against {other} (no per-image areas)"
    if c.significant:
        word = "better than" if c.diff > 0 else "worse than"
    else:
        word = "not significantly different from"
    return (f"{word} {other}: {100 * c.diff:+.1f} [{100 * c.low:+.1f}, {100 * c.high:+.1f}] points, "
            f"p = {c.p:.3f}")


def _reference(pts: pd.DataFrame, method: str) -> pd.Series | None:
    sel = pts[pts["method"] == method]
    return None if sel.empty else sel.iloc[0]


def verdict(pts: pd.DataFrame, boot: Bootstrap) -> pd.DataFrame:
    """One row per (dataset, backbone, target, metric); see the module docstring. Columns: best,
    its mIoU and interval, runner-up and its mIoU, for each of :data:`COMPARED` the difference
    (best − other, fraction), its interval, p and ``significant``, the worded ``verdict`` and the
    methods ``excluded`` at that target (target not reached)."""
    out = []
    for (ds, bb), g in pts.groupby(["dataset", "backbone"], sort=True):
        comp = g[[not is_reference(m) for m in g["method"]]]
        refs = {m: _reference(g, m) for m in ("dense_control", "dense")}
        evaluated = [w for w in VERDICT_METRICS if g[f"{w}_miou_mean"].notna().any()]  # no corruptions: clean only
        for target in sorted(set(comp["target"]), reverse=True):
            at = comp[comp["target"] == target]
            ok = at[at["target_reached"].fillna(True).astype(bool)]
            excluded = ", ".join(method_label(m) for m in at["method"][~at.index.isin(ok.index)])
            excluded = ", ".join(x for x in (excluded, _also_unreached(comp, target)) if x)
            for which in evaluated:
                out.append(_verdict_row(ds, bb, target, which, ok, refs, boot, excluded))
    return pd.DataFrame(out, columns=_VERDICT_COLUMNS)


_VERDICT_COLUMNS = ["dataset", "backbone", "target", "metric", "best", "best_miou", "best_ci_low", "best_ci_high",
                    "runner_up", "runner_up_miou",
                    *(f"vs_{c}_{x}" for c in COMPARED for x in ("diff", "ci_low", "ci_high", "p", "significant")),
                    "verdict", "excluded"]


def _also_unreached(comp: pd.DataFrame, target: float) -> str:
    """Methods whose point carries ``target`` only as a collapsed, unreached extra target."""
    names = []
    for _, p in comp.iterrows():
        listed = [float(t) for t in str(p["targets"]).split(",")]
        if p["target"] != target and any(math.isclose(t, target) for t in listed):
            names.append(method_label(p["method"]))
    return ", ".join(names)


def _verdict_row(ds: str, bb: str, target: float, which: str, ok: pd.DataFrame,
                 refs: dict[str, pd.Series | None], boot: Bootstrap, excluded: str) -> dict[str, Any]:
    col = f"{which}_miou_mean"
    ranked = ok[ok[col].notna()]
    ranked = ranked.iloc[sorted(range(len(ranked)), key=lambda i: (-ranked[col].iloc[i],
                                                                    method_rank(ranked["method"].iloc[i])))]
    row: dict[str, Any] = {"dataset": ds, "backbone": bb, "target": target, "metric": which,
                           "excluded": excluded}
    if ranked.empty:
        return {**row, "verdict": "no method reached this target" if excluded else "no method evaluated at this target"}
    best = ranked.iloc[0]
    row.update(best=method_label(best["method"]), best_miou=best[col],
               best_ci_low=best.get(f"{which}_miou_ci_low"), best_ci_high=best.get(f"{which}_miou_ci_high"))
    others = {"runner_up": ranked.iloc[1] if len(ranked) > 1 else None, **refs}
    if others["runner_up"] is not None:
        row.update(runner_up=method_label(others["runner_up"]["method"]), runner_up_miou=others["runner_up"][col])
    words = []
    for name in COMPARED:
        other = others[name]
        if other is None or pd.isna(other.get(col)):
            continue
        c = compare(boot, best, other, which)
        if c is not None:
            row.update({f"vs_{name}_diff": c.diff, f"vs_{name}_ci_low": c.low, f"vs_{name}_ci_high": c.high,
                        f"vs_{name}_p": c.p, f"vs_{name}_significant": c.significant})
        words.append(phrase(method_label(other["method"]), c))
    row["verdict"] = f"{row['best']}: " + "; ".join(words) if words else f"{row['best']}: the only point"
    return row


def dense_classes(df: pd.DataFrame, boot: Bootstrap, top: int = 5, smallest: int = 5) -> pd.DataFrame:
    """The dense model's clean per-class IoU (mean over seeds) with 95 % intervals, per (dataset,
    backbone): the ``top`` classes with the most label pixels, then the ``smallest`` classes with
    the smallest mean area per image among the rest. Empty without per-image areas."""
    out = []
    clean = df[(df["method"] == "dense") & (df["corruption"] == "clean")]
    for (ds, bb), g in clean.groupby(["dataset", "backbone"], sort=True):
        got = [boot.areas(i, ("intersect", "union", "label")) for i in g.index]
        if not got or any(a is None for a in got) or len({a[0] for a in got}) > 1:  # type: ignore[index]
            continue
        arrays = np.stack([a[1] for a in got])  # type: ignore[index]  (seeds, 3, images, classes)
        counts = boot.counts(arrays.shape[2])
        inter, union, label = arrays[:, 0], arrays[:, 1], arrays[:, 2]
        pixels, images = label[0].sum(axis=0), (label[0] > 0).sum(axis=0)
        with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a class absent from a replicate: NaN
            iou = np.nanmean(inter.sum(axis=1) / union.sum(axis=1), axis=0)
            reps = np.nanmean([(counts @ i) / (counts @ u) for i, u in zip(inter, union)], axis=0)  # (B, classes)
        present = np.flatnonzero(pixels > 0)
        largest = present[np.argsort(-pixels[present], kind="stable")][:top]
        rest = np.setdiff1d(present, largest)
        small = rest[np.argsort(pixels[rest] / images[rest], kind="stable")][:smallest]
        for kind, chosen in (("largest", largest), ("smallest objects", small)):
            for c in chosen:
                low, high = stats.interval(reps[:, c])
                out.append({"dataset": ds, "backbone": bb, "class": int(c), "kind": kind,
                            "label_pixels": int(pixels[c]), "images": int(images[c]),
                            "mean_area": float(pixels[c] / images[c]), "iou": float(iou[c]),
                            "iou_ci_low": low, "iou_ci_high": high, "n_seeds": len(got)})
    return pd.DataFrame(out, columns=["dataset", "backbone", "class", "kind", "label_pixels", "images", "mean_area",
                                      "iou", "iou_ci_low", "iou_ci_high", "n_seeds"])
