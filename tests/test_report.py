"""The report stage: raw rows -> benchmark.csv (long format), summary table and figure."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from segcompress.cli import VERBS, main
from segcompress.report import COLUMNS, aggregate, corrupted_miou, load_rows, write_report


def _row(ds="ade20k", method="dense", target=None, knob=None, corruption="clean", severity=0, seed=0, miou=0.5, gflops=1.0, **extra):
    row = {
        "dataset": ds,
        "backbone": "tiny",
        "method": method,
        "knob": knob or {},
        "target_fraction": target,
        "target_gflops": None if target is None else target * 2.0,
        "achieved_gflops": gflops,
        "gflops_std": 0.0,
        "params_m": 5.0,
        "corruption": corruption,
        "severity": severity,
        "seed": seed,
        "miou": miou,
        "aacc": 0.8,
        "macc": 0.6,
        "num_images": 4,
        "device": "cpu",
        "torch": "2.13.0",
        "timm": "1.0.31",
    }
    row.update(extra)
    return row


def _write(root: Path, row: dict) -> Path:
    variant = row["method"] if row["target_fraction"] is None else f"{row['method']}-{row['target_fraction']:g}"
    path = root / row["dataset"] / "tiny" / f"{variant}-seed{row['seed']}" / row["corruption"] / f"{row['severity']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(row))
    return path


@pytest.fixture
def raw(tmp_path: Path) -> Path:
    root = tmp_path / "results" / "raw"
    for ds in ("cityscapes", "ade20k"):
        for seed in (1, 0):
            _write(root, _row(ds, "dense", seed=seed, miou=0.50 + 0.01 * seed, gflops=2.0))
            _write(root, _row(ds, "dense", corruption="fog", severity=3, seed=seed, miou=0.40, gflops=2.0))
            _write(root, _row(ds, "dense", corruption="gaussian_noise", severity=1, seed=seed, miou=0.30, gflops=2.0))
            _write(root, _row(ds, "dense", corruption="gaussian_noise", severity=5, seed=seed, miou=0.10, gflops=2.0))
            for target, m in ((0.5, 0.45), (0.3, 0.2)):
                for method in ("tome", "nvit"):
                    knob = {"r": 3} if method == "tome" else {}
                    g = 2.0 * target
                    _write(root, _row(ds, method, target, knob, seed=seed, miou=m, gflops=g))
                    _write(root, _row(ds, method, target, knob, "fog", 3, seed, m - 0.1, g))
    return root


def test_csv_has_contract_columns_sorted_rows_and_is_stable(raw: Path, tmp_path: Path) -> None:
    out = tmp_path / "results"
    summary = write_report([raw], out / "benchmark.csv", out / "figures", out / "tables")
    assert summary["rows"] == 2 * 2 * (4 + 2 * 2 * 2)
    text = (out / "benchmark.csv").read_text()
    with (out / "benchmark.csv").open() as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames[: len(COLUMNS)]) == COLUMNS
        rows = list(reader)
    assert [r["dataset"] for r in rows[:1]] == ["ade20k"] and rows[-1]["dataset"] == "cityscapes"
    first = rows[0]
    assert (first["method"], first["corruption"], first["severity"], first["seed"]) == ("dense", "clean", "0", "0")
    assert first["knob"] == "" and first["category"] == "clean"
    tome = [r for r in rows if r["method"] == "tome"]
    assert tome[0]["knob"] == '{"r":3}' and tome[0]["target_fraction"] == "0.5"  # least compressed first
    fog = [r for r in rows if r["corruption"] == "fog"]
    assert {r["category"] for r in fog} == {"weather"}  # filled from the corruption name
    # a second build from the same rows is byte-identical (stable order, no timestamps)
    write_report([raw], out / "benchmark.csv", out / "figures", out / "tables")
    assert (out / "benchmark.csv").read_text() == text
    assert (out / "figures" / "miou_vs_gflops.png").stat().st_size > 1000
    assert (out / "figures" / "miou_vs_gflops.pdf").read_bytes().startswith(b"%PDF")
    md = (out / "tables" / "summary.md").read_text()
    assert "## ade20k / tiny" in md and "## cityscapes / tiny" in md
    assert "| Dense | – |" in md and "| ToMe | 0.5 |" in md
    assert not list(out.rglob("*.tmp"))  # atomic writes leave no temp files


def test_extra_columns_follow_contract_columns_alphabetically(tmp_path: Path) -> None:
    root = tmp_path / "raw"
    _write(root, _row(zeta=1, alpha="x", per_class_iou=[0.1, 0.2]))
    rows = load_rows([root])
    write_report([root], tmp_path / "b.csv", tmp_path / "f", tmp_path / "t")
    header = (tmp_path / "b.csv").read_text().splitlines()[0].split(",")
    assert header[len(COLUMNS):] == ["alpha", "per_class_iou", "zeta"]
    assert rows[0]["per_class_iou"] == "[0.1,0.2]"


def test_corrupted_miou_is_mean_over_corruptions_of_mean_over_severities(raw: Path) -> None:
    rows = [r for r in load_rows([raw]) if r["dataset"] == "ade20k" and r["method"] == "dense" and r["seed"] == 0]
    # gaussian_noise: (0.3 + 0.1) / 2 = 0.2; fog: 0.4 -> 0.3
    assert corrupted_miou(rows) == pytest.approx(0.3)
    assert corrupted_miou(rows, categories=["noise"]) == pytest.approx(0.2)
    assert corrupted_miou(rows, severities=[5]) == pytest.approx(0.1)
    assert math.isnan(corrupted_miou(rows, categories=["digital"]))


def test_aggregate_collects_seeds(raw: Path) -> None:
    points = aggregate(load_rows([raw]))
    dense = next(p for p in points if p.dataset == "ade20k" and p.method == "dense")
    assert sorted(dense.clean) == pytest.approx([0.50, 0.51])
    assert [p.method for p in points if p.dataset == "ade20k"] == ["dense", "nvit", "nvit", "tome", "tome"]


def test_bad_rows_are_named(tmp_path: Path) -> None:
    root = tmp_path / "raw"
    bad = root / "x.json"
    bad.parent.mkdir(parents=True)
    bad.write_text(json.dumps({"dataset": "ade20k", "miou": 0.1}))
    with pytest.raises(ValueError, match=r"x\.json: raw result row lacks backbone, method"):
        load_rows([root])
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=r"x\.json: invalid JSON"):
        load_rows([root])
    bad.unlink()
    a = _write(root, _row())
    dup = root / "copy.json"
    dup.write_text(a.read_text())
    with pytest.raises(ValueError, match="duplicates the result row"):
        load_rows([root])


def test_report_verb(raw: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert "report" in VERBS
    out = tmp_path / "out"
    rc = main(["report", str(raw), "--csv", str(out / "b.csv"), "--figures", str(out / "f"),
               "--tables", str(out / "t"), "--corrupted-categories", "weather"])
    assert rc == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"] == 48
    assert (out / "b.csv").exists() and (out / "f" / "miou_vs_gflops.png").exists()
    # no rows: one clear error line, exit status 2
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty"), "--csv", str(out / "c.csv")]) == 2
    assert "no raw result rows" in capsys.readouterr().err


def test_knob_has_one_spelling(tmp_path: Path) -> None:
    root = tmp_path / "raw"
    _write(root, _row(knob='{}'))
    _write(root, _row(method="tome", target=0.5, knob='{"r": 3, "a": [1, 2]}'))
    rows = load_rows([root])
    assert [r["knob"] for r in rows] == ["", '{"a":[1,2],"r":3}']
