"""results/metrics/ and results/curves.csv (segcompress.summary), the files DVC's metrics and
plots read, computed from benchmark.csv by the report's own aggregation."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from segcompress.report import COLUMNS
from segcompress.summary import write_summary


def benchmark(path: Path) -> Path:
    """Dense and ToMe at 0.5, two seeds, clean and one corruption at two severities."""
    rows = []
    for seed, bump in ((0, 0.0), (1, 0.02)):
        for method, target, gflops, clean in (("dense", "", 10.0, 0.50), ("tome", "0.5", 5.0, 0.40)):
            for corruption, severity, drop in (("clean", 0, 0.0), ("fog", 1, 0.1), ("fog", 3, 0.2)):
                rows.append({"dataset": "ade20k", "backbone": "vit", "method": method, "knob": "",
                             "target_fraction": target, "achieved_gflops": gflops, "corruption": corruption,
                             "category": "clean" if corruption == "clean" else "weather", "severity": severity,
                             "seed": seed, "miou": clean + bump - drop})
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(COLUMNS))
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_metrics_and_curves_hold_one_point_per_method_and_target(tmp_path: Path) -> None:
    (tmp_path / "metrics" / "ade20k" / "vit").mkdir(parents=True)
    (tmp_path / "metrics" / "ade20k" / "vit" / "algm-0.3.json").write_text("{}")  # a point gone from the study
    metrics = write_summary(benchmark(tmp_path / "benchmark.csv"))
    files = sorted((tmp_path / "metrics").rglob("*.json"))  # one file per point: one row each in dvc metrics show
    assert [f.relative_to(tmp_path).as_posix() for f in files] == ["metrics/ade20k/vit/dense.json",
                                                                   "metrics/ade20k/vit/tome-0.5.json"]
    assert {f.stem: json.loads(f.read_text()) for f in files} == metrics["ade20k"]["vit"]
    points = metrics["ade20k"]["vit"]
    assert set(points) == {"dense", "tome-0.5"}
    assert points["dense"] == {"gflops": 10.0, "miou_clean": 0.51, "miou_corrupted": pytest.approx(0.36),
                               "seeds": 2}
    assert points["tome-0.5"]["miou_clean"] == pytest.approx(0.41)
    with (tmp_path / "curves.csv").open() as f:
        curves = list(csv.DictReader(f))
    assert [(r["method"], r["target_fraction"], r["gflops"]) for r in curves] == [("dense", "1", "10.0"),
                                                                                  ("tome", "0.5", "5.0")]
    assert float(curves[1]["miou_corrupted"]) == pytest.approx(0.26)
    assert float(curves[0]["miou_clean_std"]) == pytest.approx(0.0141421, rel=1e-4)


def test_corrupted_miou_follows_the_report_selection(tmp_path: Path) -> None:
    metrics = write_summary(benchmark(tmp_path / "benchmark.csv"), severities=[3])
    assert metrics["ade20k"]["vit"]["dense"]["miou_corrupted"] == pytest.approx(0.31)
