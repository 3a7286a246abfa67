"""Robustness aggregates over the long results table (docs/contracts.md, "Results rows").

Every function takes the long table (one row per variant x corruption x severity, ``corruption ==
"clean"`` and ``severity == 0`` for clean images) and returns a new table keyed by the variant
columns (``VARIANT_KEYS`` that are present). Missing keys are fine; NaN keys (e.g. a dense row's
``target_fraction``) form their own group.

Aggregation (docs/methods.md §8):

* per corruption: mean mIoU over its severities;
* per category: mean over its corruptions of the per-corruption means;
* corrupted mIoU: mean over corruptions of the per-corruption means;
* relative robustness: corrupted mIoU / clean mIoU.

Corruption Degradation relative to a reference model (the dense model of the same dataset and
backbone), after Kamann & Rother, with D = 1 - mIoU (mIoU as a fraction):

    CD_c  = sum_s (1 - mIoU_{s,c}) / sum_s (1 - mIoU^ref_{s,c})
    rCD_c = sum_s (mIoU_clean - mIoU_{s,c}) / sum_s (mIoU^ref_clean - mIoU^ref_{s,c})

summed over the severities s the variant was evaluated at (the reference must have all of them).
mCD / mrCD are the means over corruptions. These are the formulas used here; they follow
Hendrycks & Dietterich's CE / relative CE with error = 1 - mIoU and are [UNCONFIRMED] against the
IJCV paper (docs/methods.md §12, item 9). A denominator <= 0 (a reference that does not degrade) gives
NaN, not a meaningless ratio.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from segcompress.corrupt import CATEGORIES, corruption_category

__all__ = [
    "VARIANT_KEYS",
    "REFERENCE_KEYS",
    "corruption_category",
    "with_category",
    "clean_miou",
    "per_corruption",
    "per_category",
    "corrupted_miou",
    "relative_robustness",
    "corruption_degradation",
    "mean_corruption_degradation",
    "summary",
]

#: Columns that identify one model variant in the long table.
VARIANT_KEYS: tuple[str, ...] = ("dataset", "backbone", "method", "knob", "target_fraction", "seed")
#: Columns that pick a variant's reference (dense) model.
REFERENCE_KEYS: tuple[str, ...] = ("dataset", "backbone")
CLEAN = "clean"


def _keys(df: pd.DataFrame, keys: Sequence[str] | None) -> list[str]:
    if keys is None:
        found = [k for k in VARIANT_KEYS if k in df.columns]
        if not found:
            raise KeyError(f"results table has none of the variant columns {list(VARIANT_KEYS)}")
        return found
    missing = [k for k in keys if k not in df.columns]
    if missing:
        raise KeyError(f"results table has no column(s) {missing}; columns are {list(df.columns)}")
    return list(keys)


def _check(df: pd.DataFrame, scale: float) -> None:
    missing = [c for c in ("corruption", "severity", "miou") if c not in df.columns]
    if missing:
        raise KeyError(f"results table has no column(s) {missing}; see docs/contracts.md 'Results rows'")
    too_big = df["miou"].max()
    if pd.notna(too_big) and too_big > scale + 1e-9:
        raise ValueError(
            f"results table: miou up to {too_big:g} exceeds scale={scale:g}; pass scale=100 for percentages"
        )


def _mean(df: pd.DataFrame, by: list[str], out: str, count: str | None = None) -> pd.DataFrame:
    g = df.groupby(by, dropna=False, sort=True)["miou"]
    res = g.mean().rename(out).to_frame()
    if count:
        res[count] = g.size()
    return res.reset_index()


def with_category(df: pd.DataFrame) -> pd.DataFrame:
    """A copy with the ``category`` column filled from the corruption names."""
    out = df.copy()
    out["category"] = [corruption_category(c) for c in out["corruption"]]
    return out


def _corrupted(df: pd.DataFrame) -> pd.DataFrame:
    return with_category(df[df["corruption"] != CLEAN])


def clean_miou(df: pd.DataFrame, keys: Sequence[str] | None = None, scale: float = 1.0) -> pd.DataFrame:
    """keys + ``clean_miou`` (mean over clean rows, normally exactly one per variant)."""
    _check(df, scale)
    return _mean(df[df["corruption"] == CLEAN], _keys(df, keys), "clean_miou")


def per_corruption(df: pd.DataFrame, keys: Sequence[str] | None = None, scale: float = 1.0) -> pd.DataFrame:
    """keys + corruption, category, ``miou`` (mean over severities), ``num_severities``."""
    _check(df, scale)
    return _mean(_corrupted(df), [*_keys(df, keys), "corruption", "category"], "miou", "num_severities")


def per_category(df: pd.DataFrame, keys: Sequence[str] | None = None, scale: float = 1.0) -> pd.DataFrame:
    """keys + category, ``miou`` (mean of its per-corruption means), ``num_corruptions``."""
    pc = per_corruption(df, keys, scale)
    return _mean(pc, [*_keys(df, keys), "category"], "miou", "num_corruptions")


def corrupted_miou(df: pd.DataFrame, keys: Sequence[str] | None = None, scale: float = 1.0) -> pd.DataFrame:
    """keys + ``corrupted_miou`` (mean over corruptions of the per-corruption means), ``num_corruptions``."""
    pc = per_corruption(df, keys, scale)
    return _mean(pc, _keys(df, keys), "corrupted_miou", "num_corruptions")


def relative_robustness(df: pd.DataFrame, keys: Sequence[str] | None = None, scale: float = 1.0) -> pd.DataFrame:
    """keys + ``clean_miou``, ``corrupted_miou``, ``relative_robustness`` (= corrupted / clean)."""
    k = _keys(df, keys)
    res = clean_miou(df, k, scale).merge(corrupted_miou(df, k, scale), on=k, how="outer")
    res["relative_robustness"] = res["corrupted_miou"] / res["clean_miou"]
    return res


def corruption_degradation(
    df: pd.DataFrame,
    keys: Sequence[str] | None = None,
    reference_method: str = "dense",
    reference_keys: Sequence[str] = REFERENCE_KEYS,
    scale: float = 1.0,
) -> pd.DataFrame:
    """keys + corruption, category, ``cd``, ``rcd``, ``num_severities`` for every variant.

    The reference of a variant is the row set with ``method == reference_method`` and the same
    ``reference_keys``; it must have exactly one row per (corruption, severity) and a clean row.
    """
    _check(df, scale)
    k = _keys(df, keys)
    rk = _keys(df, reference_keys)
    if "method" not in df.columns:
        raise KeyError("results table has no 'method' column; the reference model is picked by it")
    d = df.assign(miou=df["miou"] / scale)
    ref = d[d["method"] == reference_method]
    if ref.empty:
        raise ValueError(f"results table: no rows with method == {reference_method!r} to use as the CD reference")
    dup = ref.duplicated([*rk, "corruption", "severity"], keep=False)
    if dup.any():
        row = ref[dup].iloc[0]
        raise ValueError(
            f"results table: several {reference_method!r} rows for "
            f"{ {c: row[c] for c in [*rk, 'corruption', 'severity']} }; add a column (e.g. 'seed') to reference_keys"
        )
    ref_clean = ref[ref["corruption"] == CLEAN][[*rk, "miou"]].rename(columns={"miou": "ref_clean"})
    ref_corr = ref[ref["corruption"] != CLEAN][[*rk, "corruption", "severity", "miou"]].rename(
        columns={"miou": "ref_miou"}
    )
    var_clean = d[d["corruption"] == CLEAN].groupby(k, dropna=False)["miou"].mean().rename("clean").reset_index()

    rows = _corrupted(d)[[*dict.fromkeys([*k, *rk]), "corruption", "category", "severity", "miou"]]
    rows = rows.merge(ref_corr, on=[*rk, "corruption", "severity"], how="left")
    if rows["ref_miou"].isna().any():
        bad = rows[rows["ref_miou"].isna()].iloc[0]
        raise ValueError(
            f"results table: no {reference_method!r} row for corruption {bad['corruption']!r} severity "
            f"{bad['severity']} ({ {c: bad[c] for c in rk} }); evaluate the reference model there first"
        )
    rows = rows.merge(ref_clean, on=rk, how="left").merge(var_clean, on=k, how="left")
    rows["d"] = 1.0 - rows["miou"]
    rows["d_ref"] = 1.0 - rows["ref_miou"]
    rows["drop"] = rows["clean"] - rows["miou"]
    rows["drop_ref"] = rows["ref_clean"] - rows["ref_miou"]
    g = rows.groupby([*k, "corruption", "category"], dropna=False, sort=True)
    sums = g[["d", "d_ref", "drop", "drop_ref"]].sum(min_count=1)
    res = pd.DataFrame(
        {
            "cd": _ratio(sums["d"], sums["d_ref"]),
            "rcd": _ratio(sums["drop"], sums["drop_ref"]),
            "num_severities": g.size(),
        }
    )
    return res.reset_index()


def _ratio(num: pd.Series, den: pd.Series) -> pd.Series:
    return (num / den).where(den > 0, np.nan)


def mean_corruption_degradation(
    df: pd.DataFrame,
    keys: Sequence[str] | None = None,
    reference_method: str = "dense",
    reference_keys: Sequence[str] = REFERENCE_KEYS,
    scale: float = 1.0,
) -> pd.DataFrame:
    """keys + ``mcd``, ``mrcd``: means over corruptions of CD_c and rCD_c."""
    cd = corruption_degradation(df, keys, reference_method, reference_keys, scale)
    k = _keys(df, keys)
    return cd.groupby(k, dropna=False, sort=True)[["cd", "rcd"]].mean().rename(
        columns={"cd": "mcd", "rcd": "mrcd"}
    ).reset_index()


def summary(
    df: pd.DataFrame,
    keys: Sequence[str] | None = None,
    reference_method: str | None = "dense",
    reference_keys: Sequence[str] = REFERENCE_KEYS,
    scale: float = 1.0,
) -> pd.DataFrame:
    """One row per variant: clean, corrupted, relative robustness, ``miou_<category>`` for each
    category present, and (when ``reference_method`` is given) mCD and mrCD."""
    k = _keys(df, keys)
    res = relative_robustness(df, k, scale)
    cats = per_category(df, k, scale)
    present = [c for c in CATEGORIES if c in set(cats["category"])]
    for cat in present:  # one merge per category: NaN keys match NaN keys, unlike pivots
        col = cats[cats["category"] == cat][[*k, "miou"]].rename(columns={"miou": f"miou_{cat}"})
        res = res.merge(col, on=k, how="left")
    if reference_method is not None:
        res = res.merge(mean_corruption_degradation(df, k, reference_method, reference_keys, scale), on=k, how="left")
    return res
