"""Robustness aggregates on a hand-made results table with hand-computed numbers."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from segcompress import robustness as R

# (corruption, severity) -> mIoU for the dense model and one ToMe variant. shot_noise has one
# severity only, so "mean of per-corruption means" and "mean of rows" differ for the noise category.
DENSE = {("clean", 0): 0.50, ("gaussian_noise", 1): 0.40, ("gaussian_noise", 2): 0.30, ("shot_noise", 1): 0.38,
         ("fog", 1): 0.45, ("fog", 2): 0.35, ("motion_blur", 1): 0.48, ("motion_blur", 2): 0.44}
TOME = {("clean", 0): 0.40, ("gaussian_noise", 1): 0.35, ("gaussian_noise", 2): 0.20, ("shot_noise", 1): 0.30,
        ("fog", 1): 0.30, ("fog", 2): 0.30, ("motion_blur", 1): 0.40, ("motion_blur", 2): 0.36}


def _rows(method: str, knob: str, target: float, values: dict[tuple[str, int], float]) -> list[dict]:
    return [
        {"dataset": "ade20k", "backbone": "vit_tiny", "method": method, "knob": knob, "target_fraction": target,
         "achieved_gflops": 1.0, "corruption": c, "category": R.corruption_category(c), "severity": s, "seed": 0,
         "miou": m}
        for (c, s), m in values.items()
    ]


@pytest.fixture
def table() -> pd.DataFrame:
    # The dense row has no target (NaN): it must still form its own group.
    return pd.DataFrame(_rows("dense", "{}", float("nan"), DENSE) + _rows("tome", '{"r": 8}', 0.5, TOME))


def _by_method(df: pd.DataFrame, col: str) -> dict[str, float]:
    return dict(zip(df["method"], df[col]))


def test_corruption_category() -> None:
    assert R.corruption_category("clean") == "clean"
    assert R.corruption_category("jpeg_compression") == "digital"
    assert R.corruption_category("zoom_blur") == "blur"
    with pytest.raises(ValueError, match="unknown corruption"):
        R.corruption_category("rain")


def test_per_corruption_and_category(table: pd.DataFrame) -> None:
    pc = R.per_corruption(table)
    tome = pc[pc["method"] == "tome"].set_index("corruption")
    assert tome.loc["gaussian_noise", "miou"] == pytest.approx(0.275)
    assert tome.loc["shot_noise", "miou"] == pytest.approx(0.30)
    assert tome.loc["fog", "num_severities"] == 2 and tome.loc["fog", "category"] == "weather"
    assert len(pc) == 8  # 2 variants x 4 corruptions; the NaN target did not drop the dense rows

    cat = R.per_category(table)
    noise = cat[cat["category"] == "noise"]
    # mean of per-corruption means: dense (0.35 + 0.38) / 2, tome (0.275 + 0.30) / 2
    assert _by_method(noise, "miou") == pytest.approx({"dense": 0.365, "tome": 0.2875})
    assert set(noise["num_corruptions"]) == {2}


def test_corrupted_and_relative(table: pd.DataFrame) -> None:
    rel = R.relative_robustness(table)
    # dense: (0.35 + 0.38 + 0.40 + 0.46) / 4 = 0.3975; tome: (0.275 + 0.30 + 0.30 + 0.38) / 4 = 0.31375
    assert _by_method(rel, "corrupted_miou") == pytest.approx({"dense": 0.3975, "tome": 0.31375})
    assert _by_method(rel, "clean_miou") == pytest.approx({"dense": 0.50, "tome": 0.40})
    assert _by_method(rel, "relative_robustness") == pytest.approx({"dense": 0.795, "tome": 0.784375})


def test_corruption_degradation(table: pd.DataFrame) -> None:
    cd = R.corruption_degradation(table)
    tome = cd[cd["method"] == "tome"].set_index("corruption")
    # CD = sum(1 - m) / sum(1 - m_dense); rCD = sum(clean - m) / sum(clean_dense - m_dense)
    expected_cd = {"gaussian_noise": 1.45 / 1.30, "shot_noise": 0.70 / 0.62, "fog": 1.40 / 1.20,
                   "motion_blur": 1.24 / 1.08}
    expected_rcd = {"gaussian_noise": 0.25 / 0.30, "shot_noise": 0.10 / 0.12, "fog": 0.20 / 0.20,
                    "motion_blur": 0.04 / 0.08}
    assert tome["cd"].to_dict() == pytest.approx(expected_cd)
    assert tome["rcd"].to_dict() == pytest.approx(expected_rcd)
    dense = cd[cd["method"] == "dense"]
    assert list(dense["cd"]) == pytest.approx([1.0] * 4) and list(dense["rcd"]) == pytest.approx([1.0] * 4)

    m = R.mean_corruption_degradation(table)
    assert _by_method(m, "mcd") == pytest.approx({"dense": 1.0, "tome": sum(expected_cd.values()) / 4})
    assert _by_method(m, "mrcd")["tome"] == pytest.approx((0.25 / 0.30 + 0.10 / 0.12 + 1.0 + 0.5) / 4)


def test_summary_one_row_per_variant(table: pd.DataFrame) -> None:
    s = R.summary(table)
    assert len(s) == 2
    assert [c for c in s.columns if c.startswith("miou_")] == ["miou_blur", "miou_noise", "miou_weather"]
    tome = s[s["method"] == "tome"].iloc[0]
    assert tome["miou_blur"] == pytest.approx(0.38) and tome["miou_weather"] == pytest.approx(0.30)
    assert tome["mcd"] == pytest.approx(0.25 * (1.45 / 1.30 + 0.70 / 0.62 + 1.40 / 1.20 + 1.24 / 1.08))
    assert math.isnan(s[s["method"] == "dense"].iloc[0]["target_fraction"])


def test_percent_scale(table: pd.DataFrame) -> None:
    pct = table.assign(miou=table["miou"] * 100)
    with pytest.raises(ValueError, match="scale=100"):
        R.corruption_degradation(pct)
    cd = R.corruption_degradation(pct, scale=100)
    assert cd[cd["method"] == "tome"].set_index("corruption")["cd"]["fog"] == pytest.approx(1.40 / 1.20)


def test_reference_problems_are_clear(table: pd.DataFrame) -> None:
    no_ref_sev = table[~((table["method"] == "dense") & (table["corruption"] == "fog") & (table["severity"] == 2))]
    with pytest.raises(ValueError, match="no 'dense' row for corruption 'fog' severity 2"):
        R.corruption_degradation(no_ref_sev)
    two_seeds = pd.concat([table, table[table["method"] == "dense"].assign(seed=1)])
    with pytest.raises(ValueError, match="reference_keys"):
        R.corruption_degradation(two_seeds)
    assert len(R.corruption_degradation(two_seeds, reference_keys=("dataset", "backbone", "seed"))) == 12
    with pytest.raises(KeyError, match="miou"):
        R.per_corruption(table.drop(columns="miou"))


def test_reference_that_does_not_degrade_gives_nan(table: pd.DataFrame) -> None:
    flat = table.copy()
    is_dense_fog = (flat["method"] == "dense") & (flat["corruption"] == "fog")
    flat.loc[is_dense_fog, "miou"] = 0.50  # as good as clean: rCD's denominator is 0
    cd = R.corruption_degradation(flat)
    fog = cd[(cd["method"] == "tome") & (cd["corruption"] == "fog")].iloc[0]
    assert math.isnan(fog["rcd"]) and fog["cd"] == pytest.approx(1.40 / 1.00)
