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

Targets (:func:`collapse_targets`, :func:`unreached`): two targets of one method that give the
same model (same knob, and the same achieved GFLOPs and mIoU on every seed and condition) are one
point, kept at the target it reached (else the mildest one) with ``targets`` listing all of them;
``target_reached`` (False when any row of the kept target missed it) decides how tables and
figures flag a point, and :func:`unreached_points` says in one line per target which targets
were not reached. The dense model and the dense control (:data:`REFERENCES`) have no target.

GFLOPs: ``gflops`` is the mean achieved GFLOPs of the model's clean rows (all rows when it has no
clean row), ``gflops_corrupted`` that of its selected corrupted rows, so an input-dependent
method's corrupted point sits at its own measured cost.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from segcompress import robustness as R
from segcompress.methods import labels
from segcompress.report.rows import CATEGORIES

log = logging.getLogger(__name__)

#: Columns identifying one trained model in :func:`per_seed`.
MODEL_KEYS: tuple[str, ...] = ("dataset", "backbone", "method", "target", "seed")
#: Columns identifying one point of a curve in :func:`points`.
POINT_KEYS: tuple[str, ...] = ("dataset", "backbone", "method", "target")

def method_rank(method: str) -> tuple[int, str]:
    """Sort key: the registry's methods in its drawing order (:func:`segcompress.methods.labels`),
    then others alphabetically."""
    order = list(labels())
    return (order.index(method), method) if method in order else (len(order), method)


def method_label(method: str) -> str:
    """A method's display label (the registry's), else its name."""
    return labels().get(method, method)


#: Reference models without a FLOPs target: the dense model and the dense model trained for the
#: compressed variants' extra budget.
REFERENCES: tuple[str, ...] = ("dense", "dense_control")


def is_reference(method: str) -> bool:
    """True for the dense model and the dense control (drawn and tabled as references)."""
    return method in REFERENCES


def read_benchmark(path: str | Path) -> pd.DataFrame:
    """``benchmark.csv`` as a DataFrame, with ``target`` = target_fraction (1.0 for dense) and, when
    its sidecar (:func:`segcompress.report.rows.per_image_path`) is beside it, ``per_image`` (JSON
    text per row) for the intervals."""
    from segcompress.report.rows import per_image_path

    df = pd.read_csv(path, dtype={"knob": str, "corruption": str, "category": str, "method": str,
                                  "dataset": str, "backbone": str})
    sidecar = per_image_path(path)
    if sidecar.is_file():
        lines = sidecar.read_text().splitlines()
        if len(lines) != len(df):
            raise ValueError(f"{sidecar}: {len(lines)} lines for the {len(df)} rows of {path}; "
                             "rebuild both with `segcompress report`")
        df["per_image"] = [None if line == "null" else line for line in lines]
    return prepare(df)


def prepare(df: pd.DataFrame) -> pd.DataFrame:
    """Add the ``target`` column (target_fraction; 1.0 for a model without one, the dense model)
    and the optional numeric columns the report reads, empty when absent."""
    df = df.copy()
    df["target"] = pd.to_numeric(df.get("target_fraction"), errors="coerce").fillna(1.0).round(6)
    for col in ("achieved_gflops", "params_m", "images_per_s", "speedup", "erank_mean", "erank_std", "erank_images",
                "achieved_fraction", "target_gflops", "miou_ci_low", "miou_ci_high", "post_train_iters"):
        df[col] = pd.to_numeric(df[col], errors="coerce") if col in df.columns else np.nan
    reached = df["target_reached"] if "target_reached" in df.columns else pd.Series(None, df.index, dtype=object)
    df["target_reached"] = pd.array([_flag(v) for v in reached], dtype="boolean")
    df["knob"] = df["knob"].fillna("") if "knob" in df.columns else ""
    df["severity"] = pd.to_numeric(df["severity"]).astype(int)
    df["seed"] = pd.to_numeric(df["seed"]).astype(int)
    return df


def _flag(v: object) -> bool | None:
    """A ``target_reached`` cell as True / False / None (missing)."""
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    return {"true": True, "false": False, "1": True, "0": False, "1.0": True, "0.0": False}.get(str(v).strip().lower())


# --------------------------------------------------------------------------------------------
# Targets: collapsed and unreached points


def _signature(g: pd.DataFrame) -> tuple:
    """What a variant measured: (seed, condition, achieved GFLOPs, mIoU) of every row, sorted."""
    return tuple(sorted((int(r.seed), str(r.corruption), int(r.severity), round(float(r.achieved_gflops), 9)
                         if pd.notna(r.achieved_gflops) else None, float(r.miou))
                        for r in g[["seed", "corruption", "severity", "achieved_gflops", "miou"]].itertuples()))


def _reached(g: pd.DataFrame) -> bool | None:
    """A variant's target verdict: False if any row missed it, True if all reached, None if unknown."""
    flags = g["target_reached"].dropna()
    return None if flags.empty else bool(flags.all())


def collapse_targets(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with each set of targets that gave the same model kept once (see the module
    docstring), and a ``targets`` column: the point's target(s) as text, the kept one first."""
    df = df.copy()
    df["targets"] = [f"{t:g}" for t in df["target"]]
    keep = pd.Series(True, df.index)
    comp = df[~df["method"].isin(REFERENCES)]
    for _, g in comp.groupby(["dataset", "backbone", "method", "knob"], sort=False):
        variants: dict[tuple, list[tuple[float, pd.DataFrame]]] = {}
        for t, v in g.groupby("target", sort=False):
            variants.setdefault(_signature(v), []).append((float(t), v))
        for same in variants.values():
            if len(same) < 2:
                continue
            same.sort(key=lambda tv: (_reached(tv[1]) is not True, -tv[0]))  # reached first, then mildest
            text = ", ".join(f"{t:g}" for t, _ in same)
            df.loc[same[0][1].index, "targets"] = text
            for _, v in same[1:]:
                keep[v.index] = False
    return df[keep]


@dataclass(frozen=True)
class Unreached:
    """One target a variant did not reach (the match's verdict, ``target_reached`` false)."""

    dataset: str
    backbone: str
    method: str
    target: float
    achieved_fraction: float  # mean over the variant's clean rows (all rows when none is clean)
    why: str

    def line(self) -> str:
        """One human line: where, which target, what was achieved, why."""
        achieved = "unknown" if math.isnan(self.achieved_fraction) else f"{self.achieved_fraction:.3f}"
        return (f"{self.dataset} / {self.backbone} / {method_label(self.method)}: target {self.target:g} of dense "
                f"not reached, achieved {achieved} of dense; {self.why}")


def _why(g: pd.DataFrame) -> str:
    """The match's message when the rows carry one, else the tolerance rule."""
    for col in ("match_message", "message"):
        if col in g.columns:
            text = next((str(m) for m in g[col] if isinstance(m, str) and m.strip()), "")
            if text:
                return text
    tol = pd.to_numeric(g["tolerance"], errors="coerce").dropna() if "tolerance" in g.columns else pd.Series([])
    window = f"the {float(tol.iloc[0]):.0%}" if len(tol) else "the matching"
    return f"outside {window} tolerance of the target"


def unreached(df: pd.DataFrame) -> list[Unreached]:
    """Every (dataset, backbone, method, target) whose rows say the target was not reached."""
    out = []
    missed = df[df["target_reached"].fillna(True) == False]  # noqa: E712 (a nullable boolean column)
    for (ds, bb, method, target), g in missed.groupby(["dataset", "backbone", "method", "target"], sort=True):
        rows = df[(df["dataset"] == ds) & (df["backbone"] == bb) & (df["method"] == method) & (df["target"] == target)]
        clean = rows[rows["corruption"] == "clean"]
        frac = (clean if not clean.empty else rows)["achieved_fraction"].mean()
        out.append(Unreached(str(ds), str(bb), str(method), float(target), float(frac), _why(rows)))
    return sorted(out, key=lambda u: (u.dataset, u.backbone, method_rank(u.method), -u.target))


def unreached_points(df: pd.DataFrame) -> list[str]:
    """One human line per point that did not reach its FLOPs target (dataset, backbone, method,
    target, achieved fraction of dense, why); empty when every target was reached."""
    return [u.line() for u in unreached(df)]


def mark_points(pts: pd.DataFrame, missed: Sequence[Unreached]) -> pd.DataFrame:
    """``pts`` with ``target_text`` (the point's targets, each unreached one marked
    :data:`UNREACHED_MARK`; empty for the references) and ``footnote`` (one sentence per
    unreached target of the point, empty when none)."""
    pts = pts.copy()
    where = {(u.dataset, u.backbone, u.method, round(u.target, 6)): u for u in missed}
    texts, notes = [], []
    for _, p in pts.iterrows():
        if is_reference(p["method"]):
            texts.append("")
            notes.append("")
            continue
        listed = [float(t) for t in str(p.get("targets", f"{p['target']:g}")).split(",")]
        found = [where.get((p["dataset"], p["backbone"], p["method"], round(t, 6))) for t in listed]
        texts.append(", ".join(f"{t:g}" + (UNREACHED_MARK if u else "") for t, u in zip(listed, found)))
        same = f" (same model as target {listed[0]:g}, reported once)"
        notes.append(" ".join(f"{method_label(p['method'])} {u.target:g}: target not reached, achieved "
                              f"{u.achieved_fraction:.3f} of dense{same if i else ''}."
                              for i, u in enumerate(found) if u))
    pts["target_text"], pts["footnote"] = texts, notes
    return pts


#: Marks a target that was not reached in every table (footnoted) and in the heatmap's labels.
UNREACHED_MARK = "†"


def provenance(df: pd.DataFrame) -> dict[str, list[str]]:
    """The distinct ``segcompress_version``, ``source_revision`` (``+dirty`` when its rows say
    so) and ``settings_hash`` values of the rows (missing columns: empty lists), and under
    ``settings_conflicts`` the models (:data:`MODEL_KEYS`) whose rows carry more than one settings
    hash (``segcompress evaluate`` hashes each variant's own settings, so one hash per model is
    expected, several hashes across models are not a conflict)."""
    out: dict[str, list[str]] = {}
    for col in ("segcompress_version", "source_revision", "settings_hash"):
        if col not in df.columns:
            out[col] = []
            continue
        sub = df[df[col].notna()]
        if col == "source_revision" and "source_dirty" in df.columns:
            dirty = [_flag(v) for v in sub["source_dirty"]]
            values = [f"{r}+dirty" if d else str(r) for r, d in zip(sub[col], dirty)]
        else:
            values = [str(v) for v in sub[col]]
        out[col] = sorted(set(values))
    conflicts = []
    if "settings_hash" in df.columns:
        n = df.dropna(subset=["settings_hash"]).groupby(list(MODEL_KEYS))["settings_hash"].nunique()
        conflicts = [f"{ds} / {bb} / {method_label(m)}" + ("" if is_reference(m) else f" {t:g}") + f" seed {s}"
                     for (ds, bb, m, t, s), k in n.items() if k > 1]
    out["settings_conflicts"] = conflicts
    return out


# --------------------------------------------------------------------------------------------
# Per model and per point


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
    res = _model_info(df, sel, keys)
    rob = R.summary(sel, keys=keys, reference_method=None)
    res = res.merge(rob, on=keys, how="left")
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


def _model_info(df: pd.DataFrame, sel: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Per model: GFLOPs (clean rows; corrupted rows), parameters, throughput, achieved fraction
    (clean rows), post-compression training iterations, ``targets`` and ``target_reached``."""
    is_clean = df["corruption"] == "clean"
    has_clean = is_clean.groupby([df[k] for k in keys]).transform("any")
    own = df[is_clean | ~has_clean]  # a model's clean rows, or all of them when it has none
    res = df.groupby(keys, sort=True)[["params_m", "images_per_s", "speedup", "post_train_iters"]].mean()
    res["gflops"] = own.groupby(keys)["achieved_gflops"].mean()
    res["achieved_fraction"] = own.groupby(keys)["achieved_fraction"].mean()
    corrupted = sel[sel["corruption"] != "clean"]
    res["gflops_corrupted"] = corrupted.groupby(keys)["achieved_gflops"].mean()
    g = df.groupby(keys, sort=True)
    res["targets"] = g["targets"].first() if "targets" in df.columns else [f"{k[3]:g}" for k in res.index]
    res["target_reached"] = pd.array([_reached(v) for _, v in g], dtype="boolean")
    return res.reset_index()


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
    """Rows by dataset, backbone, method (:func:`method_rank` order), target (least compressed
    first), then seed when present."""
    def key(i: int) -> tuple:
        r = df.iloc[i]
        return (r["dataset"], r["backbone"], method_rank(r["method"]), -r["target"],
                r["seed"] if "seed" in df.columns else 0)

    return df.iloc[sorted(range(len(df)), key=key)].reset_index(drop=True)


#: Metrics aggregated over seeds in :func:`points`, in table order.
METRICS: tuple[str, ...] = (
    "gflops", "gflops_corrupted", "achieved_fraction", "post_train_iters", "params_m", "images_per_s",
    "speedup", "clean_miou", "corrupted_miou", "relative_robustness",
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
    out["targets"] = g["targets"].first()
    out["target_reached"] = g["target_reached"].agg(lambda v: None if v.isna().all() else bool(v.dropna().all()))
    out["target_reached"] = out["target_reached"].astype("boolean")
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
