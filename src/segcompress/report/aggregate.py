"""Numbers of the tables and figures, computed from ``benchmark.csv`` alone.

Two levels, both plain DataFrames so a test (or a reader) can recompute any cell:

1. :func:`per_seed` — one row per trained model: (dataset, backbone, method, target, seed) with
   achieved GFLOPs, parameters, throughput (means over the model's rows, which all carry the same
   value), clean mIoU, corrupted mIoU, relative robustness (corrupted / clean), the per-category
   corrupted mIoU, mCD and mrCD against the dense model of the same seed
   (:mod:`segcompress.robustness`), and the effective rank on clean and on corrupted images.
2. :func:`points` — one row per point of a curve: (dataset, backbone, method, target) with, for
   every metric, ``<metric>_mean``, ``<metric>_std`` (sample standard deviation over seeds, NaN
   for one seed) and ``n_seeds``.

Corrupted mIoU ("mIoU_noise" in the paper; open question 4) is the mean over corruptions of the
mean over severities, over the rows that :func:`select_corrupted` keeps (``categories`` and
``severities``; ``None`` keeps all). The per-corruption table feeds the heatmap.

Effective rank: ``erank_clean`` is the clean row's ``erank_mean``; ``erank_corrupted`` the mean
of the ranked corrupted rows' ``erank_mean`` (whatever conditions the rank stage ran on), and
``erank_corrupted_std`` the mean of their ``erank_std``. The spread shown is over *images*, as in
the paper's Fig. 4: ``erank_<clean|corrupted>_img_std`` is the population standard deviation of
the per-image values pooled over seeds, sqrt(mean_s(std_s² + (mean_s − mean)²)), exact for
equal image counts per seed (for corrupted images, the per-condition spreads are averaged first).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from segcompress import robustness as R
from segcompress.report.rows import CATEGORIES

log = logging.getLogger(__name__)

#: Columns identifying one trained model in :func:`per_seed`.
MODEL_KEYS: tuple[str, ...] = ("dataset", "backbone", "method", "target", "seed")
#: Columns identifying one point of a curve in :func:`points`.
POINT_KEYS: tuple[str, ...] = ("dataset", "backbone", "method", "target")

# Display names and drawing order of the known methods; other methods follow alphabetically.
METHOD_LABELS: dict[str, str] = {
    "dense": "Dense",
    "nvit": "NViT",
    "tome": "ToMe",
    "algm": "ALGM",
    "cts": "CTS",
    "nvit_tome": "NViT+ToMe",
}


def method_rank(method: str) -> tuple[int, str]:
    """Sort key: the known methods in :data:`METHOD_LABELS` order, then others alphabetically."""
    order = list(METHOD_LABELS)
    return (order.index(method), method) if method in order else (len(order), method)


def method_label(method: str) -> str:
    return METHOD_LABELS.get(method, method)


def read_benchmark(path: str | Path) -> pd.DataFrame:
    """``benchmark.csv`` as a DataFrame, with ``target`` = target_fraction (1.0 for dense)."""
    df = pd.read_csv(path, dtype={"knob": str, "corruption": str, "category": str, "method": str,
                                  "dataset": str, "backbone": str})
    return prepare(df)


def prepare(df: pd.DataFrame) -> pd.DataFrame:
    """Add the ``target`` column (target_fraction; 1.0 for a model without one, the dense model)
    and the optional numeric columns the report reads, empty when absent."""
    df = df.copy()
    df["target"] = pd.to_numeric(df.get("target_fraction"), errors="coerce").fillna(1.0).round(6)
    for col in ("achieved_gflops", "params_m", "images_per_s", "erank_mean", "erank_std", "erank_images"):
        df[col] = pd.to_numeric(df[col], errors="coerce") if col in df.columns else np.nan
    df["severity"] = pd.to_numeric(df["severity"]).astype(int)
    df["seed"] = pd.to_numeric(df["seed"]).astype(int)
    return df


def select_corrupted(df: pd.DataFrame, categories: Sequence[str] | None = None,
                     severities: Sequence[int] | None = None) -> pd.DataFrame:
    """Clean rows plus the corrupted rows in ``categories`` and at ``severities`` (None: all)."""
    df = R.with_category(df)
    keep = df["corruption"] == "clean"
    corrupted = ~keep
    if categories is not None:
        corrupted &= df["category"].isin(list(categories))
    if severities is not None:
        corrupted &= df["severity"].isin([int(s) for s in severities])
    return df[keep | corrupted]


def _pooled_std(group: pd.DataFrame) -> float:
    """Population std of all per-image values pooled over the group's rows (one row per seed)."""
    g = group.dropna(subset=["erank_mean"])
    if g.empty:
        return math.nan
    m, s = g["erank_mean"].to_numpy(float), g["erank_std"].fillna(0.0).to_numpy(float)
    return float(math.sqrt(np.mean(s ** 2 + (m - m.mean()) ** 2)))


def per_seed(df: pd.DataFrame, categories: Sequence[str] | None = None,
             severities: Sequence[int] | None = None) -> pd.DataFrame:
    """One row per trained model (:data:`MODEL_KEYS`); see the module docstring for the columns."""
    keys = list(MODEL_KEYS)
    sel = select_corrupted(df, categories, severities)
    base = df.groupby(keys, sort=True)[["achieved_gflops", "params_m", "images_per_s"]].mean()
    base = base.rename(columns={"achieved_gflops": "gflops"}).reset_index()
    rob = R.summary(sel, keys=keys, reference_method=None)
    res = base.merge(rob, on=keys, how="left")
    for cat in CATEGORIES:
        if f"miou_{cat}" not in res.columns:
            res[f"miou_{cat}"] = np.nan
    res = res.merge(_degradation(sel, keys), on=keys, how="left")
    clean = df[df["corruption"] == "clean"]
    erank = clean.groupby(keys)["erank_mean"].mean().rename("erank_clean")
    erank_std = clean.groupby(keys)["erank_std"].mean().rename("erank_clean_std")
    corrupted = df[df["corruption"] != "clean"].groupby(keys)
    corr = corrupted["erank_mean"].mean().rename("erank_corrupted")
    corr_std = corrupted["erank_std"].mean().rename("erank_corrupted_std")
    res = res.merge(pd.concat([erank, erank_std, corr, corr_std], axis=1).reset_index(), on=keys, how="left")
    for col in ("clean_miou", "corrupted_miou", "relative_robustness"):
        if col not in res.columns:
            res[col] = np.nan
    return ordered(res)


def _degradation(sel: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """mCD and mrCD against the dense model of the same dataset, backbone and seed (NaN where
    there is no dense reference with the same conditions)."""
    empty = pd.DataFrame(columns=[*keys, "mcd", "mrcd"])
    if not ((sel["method"] == "dense").any() and (sel["corruption"] != "clean").any()):
        return empty
    try:
        return R.mean_corruption_degradation(sel, keys=keys, reference_keys=("dataset", "backbone", "seed"))
    except ValueError as e:
        log.warning("mCD left out: %s", e)
        return empty


def ordered(df: pd.DataFrame) -> pd.DataFrame:
    """Rows by dataset, backbone, method (:data:`METHOD_LABELS` order), target (least compressed
    first), then seed when present."""
    def key(i: int) -> tuple:
        r = df.iloc[i]
        return (r["dataset"], r["backbone"], method_rank(r["method"]), -r["target"],
                r["seed"] if "seed" in df.columns else 0)

    return df.iloc[sorted(range(len(df)), key=key)].reset_index(drop=True)


#: Metrics aggregated over seeds in :func:`points`, in table order.
METRICS: tuple[str, ...] = (
    "gflops", "params_m", "images_per_s", "clean_miou", "corrupted_miou", "relative_robustness",
    *(f"miou_{c}" for c in CATEGORIES), "mcd", "mrcd", "erank_clean", "erank_corrupted",
)


def points(seeds: pd.DataFrame) -> pd.DataFrame:
    """One row per (dataset, backbone, method, target): ``<metric>_mean``, ``<metric>_std``
    (sample std over seeds; NaN for one seed), ``n_seeds``, and ``erank_clean_img_std`` /
    ``erank_corrupted_img_std`` (the spread over images, pooled over seeds)."""
    keys = list(POINT_KEYS)
    g = seeds.groupby(keys, sort=False)
    out = g.size().rename("n_seeds").to_frame()
    for m in METRICS:
        col = pd.to_numeric(seeds[m], errors="coerce") if m in seeds.columns else pd.Series(np.nan, seeds.index)
        out[f"{m}_mean"] = col.groupby([seeds[k] for k in keys], sort=False).mean()
        out[f"{m}_std"] = col.groupby([seeds[k] for k in keys], sort=False).std(ddof=1)
    for which in ("clean", "corrupted"):
        sub = seeds[[*keys, f"erank_{which}", f"erank_{which}_std"]].rename(
            columns={f"erank_{which}": "erank_mean", f"erank_{which}_std": "erank_std"})
        out[f"erank_{which}_img_std"] = sub.groupby(keys, sort=False)[["erank_mean", "erank_std"]].apply(_pooled_std)
    return ordered(out.reset_index())


def per_corruption(df: pd.DataFrame, severities: Sequence[int] | None = None) -> pd.DataFrame:
    """One row per (point, corruption): mIoU (mean over the selected severities, then over seeds)
    and the relative robustness (that mIoU / the model's clean mIoU, then over seeds)."""
    keys = list(MODEL_KEYS)
    sel = select_corrupted(df, None, severities)
    if (sel["corruption"] == "clean").all():
        return pd.DataFrame(columns=[*POINT_KEYS, "corruption", "category", "miou", "relative", "n_seeds"])
    pc = R.per_corruption(sel, keys=keys)
    clean = R.clean_miou(sel, keys=keys)
    pc = pc.merge(clean, on=keys, how="left")
    pc["relative"] = pc["miou"] / pc["clean_miou"]
    g = pc.groupby([*POINT_KEYS, "corruption", "category"], sort=False)
    out = g[["miou", "relative"]].mean()
    out["n_seeds"] = g.size()
    return out.reset_index()
