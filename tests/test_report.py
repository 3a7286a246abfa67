"""The report stage: raw rows -> benchmark.csv (long format) -> tables, figures and the HTML page.

The numbers of the tables are recomputed here by hand from benchmark.csv (read with the csv
module, not with the report's own code) and must match.
"""

from __future__ import annotations

import csv
import json
import math
import re
import statistics
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from segcompress.cli import VERBS, main
from segcompress.report import COLUMNS, FIGURES, load_rows, stats, write_report
from segcompress.report.aggregate import (
    collapse_targets, per_corruption, per_seed, points, read_benchmark, unreached_points,
)
from segcompress.report.figures import curve_points
from segcompress.report.tables import format_value


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


def _variant(row: dict) -> str:
    return row["method"] if row["target_fraction"] is None else f"{row['method']}-{row['target_fraction']:g}"


def _write(root: Path, row: dict) -> Path:
    path = root / row["dataset"] / "tiny" / f"{_variant(row)}-seed{row['seed']}" / row["corruption"] / f"{row['severity']}.json"
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
                    _write(root, _row(ds, method, target, knob, seed=seed, miou=m + 0.02 * seed, gflops=g))
                    _write(root, _row(ds, method, target, knob, "fog", 3, seed, m - 0.1 + 0.01 * seed, g))
                    _write(root, _row(ds, method, target, knob, "gaussian_noise", 1, seed, m - 0.15, g))
                    _write(root, _row(ds, method, target, knob, "gaussian_noise", 5, seed, m - 0.2, g))
    return root


def _report(raw: Path, out: Path, **kwargs) -> dict:
    return write_report([raw], out / "benchmark.csv", out / "figures", out / "tables", **kwargs)


# ------------------------------------------------------------------------------ benchmark.csv


def test_csv_has_contract_columns_sorted_rows_and_is_stable(raw: Path, tmp_path: Path) -> None:
    out = tmp_path / "results"
    summary = _report(raw, out)
    assert summary["rows"] == 2 * 2 * (4 + 2 * 2 * 4)
    text = (out / "benchmark.csv").read_text()
    with (out / "benchmark.csv").open() as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames[: len(COLUMNS)]) == COLUMNS
        rows = list(reader)
    assert [r["dataset"] for r in rows[:1]] == ["ade20k"] and rows[-1]["dataset"] == "cityscapes"
    first = rows[0]
    assert (first["method"], first["corruption"], first["severity"], first["seed"]) == ("dense", "clean", "0", "0")
    assert first["knob"] == "" and first["category"] == "clean"
    assert first["images_per_s"] == "" and first["erank_mean"] == ""  # not measured: empty, not invented
    tome = [r for r in rows if r["method"] == "tome"]
    assert tome[0]["knob"] == '{"r":3}' and tome[0]["target_fraction"] == "0.5"  # least compressed first
    fog = [r for r in rows if r["corruption"] == "fog"]
    assert {r["category"] for r in fog} == {"weather"}  # filled from the corruption name
    # a second build from the same rows is byte-identical (stable order, no timestamps)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.suffix != ".pdf"}
    _report(raw, out)
    assert (out / "benchmark.csv").read_text() == text
    assert {p: p.read_bytes() for p in before} == before
    for stem in FIGURES.values():
        assert (out / "figures" / f"{stem}.png").stat().st_size > 1000
        assert (out / "figures" / f"{stem}.pdf").read_bytes().startswith(b"%PDF")
    md = (out / "tables" / "summary.md").read_text()
    assert "## ade20k / tiny" in md and "## cityscapes / tiny" in md
    assert "| Dense | – |" in md and "| ToMe | 0.5 |" in md
    assert (out / "tables" / "summary.tex").read_text().count(r"\begin{tabular}") == 2
    assert not list(out.rglob("*.tmp"))  # atomic writes leave no temp files


def test_extra_columns_follow_contract_columns_alphabetically(tmp_path: Path) -> None:
    root = tmp_path / "raw"
    _write(root, _row(zeta=1, alpha="x", per_class_iou=[0.1, 0.2]))
    rows = load_rows([root])
    write_report([root], tmp_path / "b.csv", tmp_path / "f", tmp_path / "t")
    header = (tmp_path / "b.csv").read_text().splitlines()[0].split(",")
    assert header[len(COLUMNS):] == ["alpha", "per_class_iou", "zeta"]
    assert rows[0]["per_class_iou"] == "[0.1,0.2]"


def test_knob_has_one_spelling(tmp_path: Path) -> None:
    root = tmp_path / "raw"
    _write(root, _row(knob='{}'))
    _write(root, _row(method="tome", target=0.5, knob='{"r": 3, "a": [1, 2]}'))
    rows = load_rows([root])
    assert [r["knob"] for r in rows] == ["", '{"a":[1,2],"r":3}']


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


# ------------------------------------------------------------------------------ aggregation


def test_corrupted_miou_is_mean_over_corruptions_of_mean_over_severities(raw: Path, tmp_path: Path) -> None:
    _report(raw, tmp_path)
    df = read_benchmark(tmp_path / "benchmark.csv")

    def dense0(**sel) -> dict:
        s = per_seed(df, **sel)
        return s[(s["dataset"] == "ade20k") & (s["method"] == "dense") & (s["seed"] == 0)].iloc[0].to_dict()

    # gaussian_noise: (0.3 + 0.1) / 2 = 0.2; fog: 0.4 -> 0.3
    assert dense0()["corrupted_miou"] == pytest.approx(0.3)
    assert dense0()["relative_robustness"] == pytest.approx(0.3 / 0.5)
    assert dense0(categories=["noise"])["corrupted_miou"] == pytest.approx(0.2)
    assert dense0(severities=[5])["corrupted_miou"] == pytest.approx(0.1)
    assert math.isnan(dense0(categories=["digital"])["corrupted_miou"])
    assert dense0()["miou_noise"] == pytest.approx(0.2) and dense0()["miou_weather"] == pytest.approx(0.4)


def test_several_seeds_give_mean_and_std(raw: Path, tmp_path: Path) -> None:
    _report(raw, tmp_path)
    pts = points(per_seed(read_benchmark(tmp_path / "benchmark.csv")))
    dense = pts[(pts["dataset"] == "ade20k") & (pts["method"] == "dense")].iloc[0]
    assert dense["n_seeds"] == 2
    assert dense["clean_miou_mean"] == pytest.approx(0.505)
    assert dense["clean_miou_std"] == pytest.approx(statistics.stdev([0.50, 0.51]))
    assert [m for m in pts[pts["dataset"] == "ade20k"]["method"]] == ["dense", "nvit", "nvit", "tome", "tome"]
    md = (tmp_path / "tables" / "summary.md").read_text()
    assert "| Dense | – | 2.000 ± 0.000 | 5.000 ± 0.000 | – | 50.5 ± 0.7 |" in md
    tex = (tmp_path / "tables" / "summary.tex").read_text()
    assert r"Dense & -- & 2.000 $\pm$ 0.000 & 5.000 $\pm$ 0.000 & -- & 50.5 $\pm$ 0.7" in tex
    # one seed: no spread shown
    one = tmp_path / "one"
    for f in raw.rglob("*.json"):
        if "-seed1" not in str(f):
            target = one / f.relative_to(raw)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(f.read_text())
    write_report([one], tmp_path / "o.csv", tmp_path / "of", tmp_path / "ot")
    assert "| Dense | – | 2.000 | 5.000 | – | 50.0 |" in (tmp_path / "ot" / "summary.md").read_text()


def _by_hand(csv_path: Path) -> dict[tuple, dict[str, list[float]]]:
    """Clean, corrupted and relative robustness per point, per seed, from the CSV with plain Python."""
    models: dict[tuple, list[dict]] = defaultdict(list)
    with csv_path.open() as f:
        for r in csv.DictReader(f):
            target = float(r["target_fraction"]) if r["target_fraction"] else 1.0
            models[(r["dataset"], r["backbone"], r["method"], target, r["seed"])].append(r)
    out: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for (ds, bb, method, target, _seed), rows in models.items():
        clean = statistics.fmean(float(r["miou"]) for r in rows if r["corruption"] == "clean")
        per_c: dict[str, list[float]] = defaultdict(list)
        for r in rows:
            if r["corruption"] != "clean":
                per_c[r["corruption"]].append(float(r["miou"]))
        corrupted = statistics.fmean(statistics.fmean(v) for v in per_c.values())
        point = out[(ds, bb, method, target)]
        point["clean"].append(clean)
        point["corrupted"].append(corrupted)
        point["relative"].append(corrupted / clean)
        point["gflops"].append(statistics.fmean(float(r["achieved_gflops"]) for r in rows))
    return out


def test_every_table_number_equals_the_csv(raw: Path, tmp_path: Path) -> None:
    _report(raw, tmp_path)
    expected = _by_hand(tmp_path / "benchmark.csv")
    with (tmp_path / "tables" / "summary.csv").open() as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(expected) == 2 * (1 + 2 * 2)
    md = (tmp_path / "tables" / "summary.md").read_text()
    for t in table:
        hand = expected[(t["dataset"], t["backbone"], t["method"], float(t["target"]))]
        for col, key in (("clean_miou", "clean"), ("corrupted_miou", "corrupted"),
                         ("relative_robustness", "relative"), ("gflops", "gflops")):
            assert float(t[f"{col}_mean"]) == pytest.approx(statistics.fmean(hand[key]), abs=1e-12), (t, col)
            assert float(t[f"{col}_std"]) == pytest.approx(statistics.stdev(hand[key]), abs=1e-12), (t, col)
        assert int(t["n_seeds"]) == 2
        # the markdown shows the same numbers, rounded
        cells = [format_value(statistics.fmean(hand["clean"]), statistics.stdev(hand["clean"]), 100),
                 format_value(statistics.fmean(hand["corrupted"]), statistics.stdev(hand["corrupted"]), 100),
                 format_value(statistics.fmean(hand["relative"]), statistics.stdev(hand["relative"]), digits=3)]
        assert " | ".join(cells) in md, cells


def test_per_corruption_table_and_heatmap_values(raw: Path, tmp_path: Path) -> None:
    _report(raw, tmp_path, heatmap="relative")
    with (tmp_path / "tables" / "per_corruption.csv").open() as f:
        table = [r for r in csv.DictReader(f) if r["dataset"] == "ade20k" and r["method"] == "tome"
                 and float(r["target"]) == 0.5]
    by = {r["corruption"]: r for r in table}
    # fog: seeds 0.35 and 0.36; gaussian_noise: mean over severities (0.30, 0.25) per seed
    assert float(by["fog"]["miou"]) == pytest.approx(0.355)
    assert float(by["gaussian_noise"]["miou"]) == pytest.approx(0.275)
    assert float(by["fog"]["relative"]) == pytest.approx((0.35 / 0.45 + 0.36 / 0.47) / 2)
    df = read_benchmark(tmp_path / "benchmark.csv")
    pc = per_corruption(df, severities=[5])
    row = pc[(pc["dataset"] == "ade20k") & (pc["method"] == "tome") & (pc["target"] == 0.5)]
    assert row.set_index("corruption")["miou"].to_dict() == pytest.approx({"gaussian_noise": 0.25})


# ------------------------------------------------------------------------------ joins


def _side(root: Path, name: str, **row) -> None:
    path = root / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(row))


def test_throughput_and_rank_are_joined_as_columns(raw: Path, tmp_path: Path, caplog) -> None:
    bench, rank = tmp_path / "raw_bench", tmp_path / "raw_rank"
    for seed, ips in ((0, 100.0), (1, 110.0)):
        _side(bench, f"tome{seed}", dataset="ade20k", backbone="tiny", method="tome", target_fraction=0.5, seed=seed,
              images_per_s=ips, batch=8, device="cpu x", threads=1, statistic="best")
        _side(rank, f"tome-clean{seed}", dataset="ade20k", backbone="tiny", method="tome", target_fraction=0.5,
              seed=seed, corruption="clean", severity=0, erank_mean=0.4 + 0.1 * seed, erank_std=0.1, num_images=3)
        _side(rank, f"dense-clean{seed}", dataset="ade20k", backbone="tiny", method="dense", target_fraction=None,
              seed=seed, corruption="clean", severity=0, erank_mean=0.6, erank_std=0.05, num_images=3)
    _side(rank, "tome-fog", dataset="ade20k", backbone="tiny", method="tome", target_fraction=0.5, seed=0,
          corruption="fog", severity=3, erank_mean=0.3, erank_std=0.02, num_images=3)
    _side(rank, "orphan", dataset="ade20k", backbone="tiny", method="tome", target_fraction=0.5, seed=0,
          corruption="snow", severity=3, erank_mean=0.3, erank_std=0.02, num_images=3)
    summary = _report(raw, tmp_path, rank=[rank], bench=[bench], html=tmp_path / "report.html")
    assert summary["rows"] == 2 * 2 * (4 + 2 * 2 * 4)  # no rows added: joined as columns
    assert "images/s of the fastest timed batch) at batch 8 on cpu x" in (tmp_path / "report.html").read_text()
    assert "1 effective-rank row(s) match no result row" in caplog.text
    with (tmp_path / "benchmark.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r["dataset"] == "ade20k"]
    tome05 = [r for r in rows if r["method"] == "tome" and r["target_fraction"] == "0.5"]
    assert {(r["seed"], r["images_per_s"]) for r in tome05} == {("0", "100.0"), ("1", "110.0")}
    assert {r["bench_batch"] for r in tome05} == {"8"} and {r["bench_statistic"] for r in tome05} == {"best"}
    ranked = {(r["seed"], r["corruption"], r["severity"]): r["erank_mean"] for r in tome05 if r["erank_mean"]}
    assert ranked == {("0", "clean", "0"): "0.4", ("1", "clean", "0"): "0.5", ("0", "fog", "3"): "0.3"}
    assert all(r["images_per_s"] == "" for r in rows if r["method"] == "nvit")
    pts = points(per_seed(read_benchmark(tmp_path / "benchmark.csv")))
    p = pts[(pts["dataset"] == "ade20k") & (pts["method"] == "tome") & (pts["target"] == 0.5)].iloc[0]
    assert p["images_per_s_mean"] == pytest.approx(105.0)
    assert p["erank_clean_mean"] == pytest.approx(0.45)
    # the spread over images pooled over seeds: all per-image values of both seeds
    assert p["erank_clean_img_std"] == pytest.approx(math.sqrt(0.1 ** 2 + 0.05 ** 2))
    md = (tmp_path / "tables" / "summary.md").read_text()
    assert "| erank clean |" in md and "0.450 ± 0.112" in md


# ------------------------------------------------------------------------------ the page and the verb


def test_html_page_references_figures_tables_and_choices(raw: Path, tmp_path: Path) -> None:
    out = tmp_path / "results"
    panel = out / "figures" / "qualitative" / "ade20k_tiny.png"
    panel.parent.mkdir(parents=True)
    panel.write_bytes(b"\x89PNG fake")
    config = {"finetune": {"pruned": True, "token_methods": False}, "report": {"corrupted_categories": None},
              "analysis": {"effective_rank": {"normalise": "min_tokens_width"}},
              "datasets": {"ade20k": {"eval": {"stride": 96, "max_images": None}}}}
    _report(raw, out, html=out / "report.html", qualitative=[panel], config=config, severities=[1, 3])
    page = (out / "report.html").read_text()
    srcs = re.findall(r"<img src='([^']+)'", page)
    assert sorted(srcs) == sorted([f"figures/{s}.png" for s in FIGURES.values()] + ["figures/qualitative/ade20k_tiny.png"])
    for src in srcs + re.findall(r"<a href='([^']+)'", page):
        assert (out / src).is_file(), src
    assert "summary.tex" in page and "benchmark.csv" in page
    assert "<td>Dense</td>" in page and "<td>50.5 ± 0.7</td>" in page  # the table, inline
    assert "gaussian_noise (noise)" in page and "fog (weather)" in page
    assert "severities: 1, 3" in page
    assert "finetune.pruned" in page and "analysis.effective_rank.normalise" in page
    assert "Throughput:</b> not measured" in page


def test_report_verb(raw: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert "report" in VERBS
    out = tmp_path / "out"
    rc = main(["report", str(raw), "--csv", str(out / "b.csv"), "--figures", str(out / "f"),
               "--tables", str(out / "t"), "--corrupted-categories", "weather", "--html", str(out / "r.html"),
               "--config-json", '{"flops": {"per": "crop"}}'])
    assert rc == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"] == 80
    assert (out / "b.csv").exists() and (out / "f" / "miou_vs_gflops.png").exists()
    assert "flops.per" in (out / "r.html").read_text()
    # no rows: one clear error line, exit status 2
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty"), "--csv", str(out / "c.csv")]) == 2
    assert "no raw result rows" in capsys.readouterr().err


def test_clean_only_study_still_writes_every_output(tmp_path: Path) -> None:
    root = tmp_path / "raw"
    _write(root, _row())
    _write(root, _row(method="tome", target=0.5, knob={"r": 2}, miou=0.4, gflops=1.0))
    _report(root, tmp_path, html=tmp_path / "report.html")
    for stem in FIGURES.values():
        assert (tmp_path / "figures" / f"{stem}.png").is_file()
    md = (tmp_path / "tables" / "summary.md").read_text()
    assert "| ToMe | 0.5 | 1.000 | 5.000 | – | 40.0 | – | – | 1 |" in md


# ------------------------------------------------------------------------------ uncertainty (item 5)

def _image(name: str, inter: list[int], union: list[int]) -> dict:
    """One per_image entry on classes 0..len-1 (classes with zero union left out, as evaluate does)."""
    classes = [c for c, u in enumerate(union) if u > 0]
    return {"name": name, "classes": classes, "intersect": [inter[c] for c in classes],
            "union": [union[c] for c in classes], "label": [union[c] for c in classes],
            "pred": [inter[c] for c in classes]}


def _replicates(images: list[dict], counts: np.ndarray) -> np.ndarray:
    inter, union = stats.dense_areas(images, 3)
    return stats.miou_replicates(counts, inter, union)


def test_bootstrap_of_identical_images_has_zero_width() -> None:
    images = [_image(f"i{k}", [30, 10, 0], [40, 20, 0]) for k in range(12)]
    reps = _replicates(images, stats.bootstrap_counts(12))
    low, high = stats.interval(reps)
    assert low == pytest.approx(high) == pytest.approx((30 / 40 + 10 / 20) / 2)
    # the replicate with every image once is the evaluation's own mIoU (class 2: no union, not counted)
    assert _replicates(images, np.ones((1, 12)))[0] == pytest.approx(0.625)


def test_bootstrap_known_two_image_case() -> None:
    # image a: IoU 1, image b: IoU 0 (same union); a replicate draws (2,0), (1,1) or (0,2)
    # with probabilities 1/4, 1/2, 1/4: mIoU 1, 0.5, 0
    images = [_image("a", [10, 0, 0], [10, 0, 0]), _image("b", [0, 0, 0], [10, 0, 0])]
    counts = stats.bootstrap_counts(2, 4000, seed=3)
    assert (counts.sum(axis=1) == 2).all()
    assert np.array_equal(counts, stats.bootstrap_counts(2, 4000, seed=3))  # seeded
    reps = _replicates(images, counts)
    assert set(np.round(reps, 9)) == {0.0, 0.5, 1.0}
    assert np.mean(reps == 0.5) == pytest.approx(0.5, abs=0.03)
    assert stats.interval(reps) == (0.0, 1.0)


def test_corrupted_replicates_average_severities_then_corruptions() -> None:
    ones = np.ones((1, 1))
    cond = {("fog", 1): ([[8.0]], [[10.0]]), ("fog", 3): ([[4.0]], [[10.0]]), ("snow", 3): ([[1.0]], [[10.0]])}
    got = stats.corrupted_replicates(ones, {k: (np.array(i), np.array(u)) for k, (i, u) in cond.items()})
    assert got[0] == pytest.approx(((0.8 + 0.4) / 2 + 0.1) / 2)


def test_paired_comparison_significant_and_not() -> None:
    counts = stats.bootstrap_counts(30)
    base = [_image(f"i{k}", [50 + k % 7, 20, 0], [100, 40, 0]) for k in range(30)]
    better = [_image(f"i{k}", [58 + k % 7, 20, 0], [100, 40, 0]) for k in range(30)]  # +8 on every image
    # + or - 6 alternately: the same total, the difference only noise
    swapped = [_image(f"i{k}", [50 + k % 7 + (6 if k % 2 else -6), 20, 0], [100, 40, 0]) for k in range(30)]
    a, b, c = (_replicates(x, counts) for x in (base, better, swapped))
    full = [_replicates(x, np.ones((1, 30)))[0] for x in (base, better, swapped)]
    win = stats.paired(b, a, full[1] - full[0])
    assert win.significant and win.low > 0 and win.diff == pytest.approx(0.04)
    assert win.p == pytest.approx(2 / (len(counts) + 1))  # no replicate at or below 0
    tie = stats.paired(c, a, full[2] - full[0])
    assert not tie.significant and tie.low < 0 < tie.high and tie.p > 0.5
    with pytest.raises(ValueError, match="same draws"):
        stats.paired(a, b[:10], 0.0)


# ------------------------------------------------------------------------------ honest points (items 4, 5, 7)


def _study(root: Path, n: int = 20) -> None:
    """A study with per-image areas (classes 0, 1 of 3): dense, dense control, NViT/ToMe tied at 0.75
    and 0.5, CTS 0.5 and 0.35 the same model (0.35 not reached), ALGM 0.35 not reached."""
    def rows(method, target, i0, gflops, knob=None, **extra):
        for corruption, severity, drop in (("clean", 0, 0), ("fog", 3, 10)):
            images = [_image(f"img{k:02d}", [i0(k) - drop, 40, 0], [100, 50, 0]) for k in range(n)]
            inter = sum(im["intersect"][0] for im in images)
            miou = (inter / (100 * n) + 40 / 50) / 2
            _write(root, _row(method=method, target=target, knob=knob, corruption=corruption, severity=severity,
                              miou=miou, gflops=gflops, num_images=n, per_image=images, **extra))

    prov = {"segcompress_version": "0.3.0", "source_revision": "r1", "source_dirty": False, "settings_hash": "aaaa"}
    rows("dense", None, lambda k: 90, 2.0, post_train_iters=0, **prov)
    rows("dense_control", None, lambda k: 89, 2.0, post_train_iters=24, **prov)
    for target, base in ((0.75, 70), (0.5, 60)):
        rows("tome", target, lambda k, b=base: b + 2 * (k % 2), 2.0 * target, {"r": int(10 * target)},
             post_train_iters=0, **prov)
        rows("nvit", target, lambda k, b=base: b + 2 * ((k + 1) % 2), 2.0 * target, post_train_iters=24,
             **{**prov, "source_revision": "r2", "source_dirty": True})
    for target in (0.5, 0.35):  # one knob, one model: 1.0 GFLOPs, i.e. 0.5 of dense
        rows("cts", target, lambda k: 80, 1.0, {"k": 4}, post_train_iters=0, policy_init="random",
             policy_channel_multiplier=0.2, policy_gflops=0.1, policy_net_counted=True, **prov)
    rows("algm", 0.35, lambda k: 75, 0.9, {"threshold": 0.9}, post_train_iters=0, **prov)


def test_unreached_target_is_flagged_end_to_end(tmp_path: Path, caplog) -> None:
    root = tmp_path / "raw"
    _study(root)
    out = tmp_path / "results"
    summary = _report(root, out, html=out / "report.html")
    # CSV: achieved fraction and the verdict on every row with a target; per-row intervals
    with (out / "benchmark.csv").open() as f:
        rows = list(csv.DictReader(f))
    flags = {(r["method"], r["target_fraction"]): (r["target_reached"], r["achieved_fraction"]) for r in rows}
    assert flags[("cts", "0.35")] == ("false", repr(1.0 / 2.0))
    assert flags[("cts", "0.5")] == ("true", repr(0.5))
    assert flags[("algm", "0.35")] == ("false", repr(0.9 / 2.0))
    assert flags[("dense", "")] == ("", "")
    dense = next(r for r in rows if r["method"] == "dense" and r["corruption"] == "clean")
    low, high = float(dense["miou_ci_low"]), float(dense["miou_ci_high"])
    assert low == pytest.approx(high) == pytest.approx(float(dense["miou"]))
    tome = next(r for r in rows if r["method"] == "tome" and r["corruption"] == "clean")
    assert float(tome["miou_ci_low"]) < float(tome["miou"]) < float(tome["miou_ci_high"])
    # one line per unreached target, logged and returned for the workflow to print
    lines = summary["unreached"]
    assert lines == unreached_points(read_benchmark(out / "benchmark.csv"))
    assert len(lines) == 2 and lines[0].startswith("ade20k / tiny / ALGM: target 0.35 of dense not reached, "
                                                   "achieved 0.450 of dense")
    assert "CTS: target 0.35" in lines[1] and "1% tolerance" in lines[1]
    assert "target not reached: ade20k / tiny / CTS" in caplog.text
    # tables: CTS once, labelled with both targets, the unreached one marked and footnoted
    md = (out / "tables" / "summary.md").read_text()
    assert md.count("| CTS |") == 1 and "| CTS | 0.5, 0.35† |" in md and "| ALGM | 0.35† |" in md
    assert "† CTS 0.35: target not reached, achieved 0.500 of dense (same model as target 0.5, reported once)." in md
    assert "† ALGM 0.35: target not reached, achieved 0.450 of dense." in md
    assert r"0.5, 0.35$^\dagger$" in (out / "tables" / "summary.tex").read_text()
    page = (out / "report.html").read_text()
    assert "0.5, 0.35†" in page and "FLOPs targets not reached" in page and lines[0] in page
    # figure data: ALGM 0.35 hollow and off its line; CTS 0.5 (reached) on it
    pts = points(per_seed(collapse_targets(read_benchmark(out / "benchmark.csv"))))
    curves = {c.method: c for c in curve_points(pts, "clean_miou_mean")}
    assert curves["algm"].hollow.tolist() == [True] and curves["algm"].joined.tolist() == [False]
    assert curves["cts"].hollow.tolist() == [False] and curves["cts"].joined.tolist() == [True]
    assert curves["tome"].joined.tolist() == [True, True]
    assert not curves["dense"].joined.any() and not curves["dense_control"].joined.any()
    with (out / "tables" / "summary.csv").open() as f:
        table = list(csv.DictReader(f))
    cts = [t for t in table if t["method"] == "cts"]
    assert [(t["target"], t["targets"], t["target_reached"]) for t in cts] == [("0.5", "0.5, 0.35", "True")]


def test_intervals_verdict_and_classes(tmp_path: Path) -> None:
    root = tmp_path / "raw"
    _study(root)
    out = tmp_path / "results"
    _report(root, out, html=out / "report.html")
    md = (out / "tables" / "summary.md").read_text()
    # dense: identical images -> a zero-width interval; the dense control beside it; post-train iterations shown
    assert "| Dense | – | 2.000 | 5.000 | – | 0 | 85.0 [85.0, 85.0] | 80.0 [80.0, 80.0] |" in md
    assert "| Dense control | – | 2.000 | 5.000 | – | 24 |" in md
    with (out / "tables" / "verdict.csv").open() as f:
        verdict = {(r["target"], r["metric"]): r for r in csv.DictReader(f)}
    assert set(verdict) == {(t, m) for t in ("0.75", "0.5", "0.35") for m in ("clean", "corrupted")}
    # 0.75: NViT and ToMe have the same total on alternating images: not significantly different
    tie = verdict[("0.75", "clean")]
    assert {tie["best"], tie["runner_up"]} == {"NViT", "ToMe"} and tie["vs_runner_up_significant"] == "False"
    assert float(tie["vs_runner_up_ci_low"]) < 0 < float(tie["vs_runner_up_ci_high"])
    assert "not significantly different from" in tie["verdict"] and "better than" not in tie["verdict"]
    # it is worse than the dense control on every image: significant, and said so
    assert tie["vs_dense_control_significant"] == "True" and float(tie["vs_dense_control_diff"]) < 0
    assert "worse than Dense control" in tie["verdict"]
    # 0.5: CTS (reached at 0.5) beats the runner-up on every image
    win = verdict[("0.5", "clean")]
    assert win["best"] == "CTS" and win["vs_runner_up_significant"] == "True"
    assert float(win["vs_runner_up_diff"]) == pytest.approx((0.80 - 0.61) / 2)
    assert float(win["vs_runner_up_p"]) < 0.01 and "better than" in win["verdict"]
    # 0.35: nothing reached it
    none = verdict[("0.35", "clean")]
    assert none["best"] == "" and none["excluded"] == "ALGM, CTS"
    vmd = (out / "tables" / "verdict.md").read_text()
    assert "| 0.5 | clean | CTS 80.0 [80.0, 80.0] |" in vmd
    # the dense model's per-class IoU, from the per-image areas
    with (out / "tables" / "dense_classes.csv").open() as f:
        classes = list(csv.DictReader(f))
    assert [(c["class"], c["kind"], float(c["iou"])) for c in classes] == [("0", "largest", 0.9), ("1", "largest", 0.8)]
    page = (out / "report.html").read_text()
    assert "Verdict per FLOPs target" in page and "per-class IoU" in page and "<td>80.0 [80.0, 80.0]</td>" in page


def test_provenance_is_kept_and_shown(tmp_path: Path) -> None:
    root = tmp_path / "raw"
    _study(root, n=4)
    fog = root / "ade20k" / "tiny" / "dense-seed0" / "fog" / "3.json"  # one condition of one model rerun
    fog.write_text(json.dumps({**json.loads(fog.read_text()), "settings_hash": "bbbb"}))
    out = tmp_path / "results"
    _report(root, out, html=out / "report.html")
    header = (out / "benchmark.csv").read_text().splitlines()[0].split(",")
    assert {"segcompress_version", "source_revision", "source_dirty", "settings_hash"} <= set(header)
    # the per-image areas sit beside the table, one line per row, not in it
    assert "per_image" not in header
    sidecar = (out / "benchmark.per_image.jsonl").read_text().splitlines()
    assert len(sidecar) == len((out / "benchmark.csv").read_text().splitlines()) - 1
    assert all(json.loads(line)[0]["classes"] for line in sidecar)
    md = (out / "tables" / "summary.md").read_text()
    assert "- segcompress version: 0.3.0" in md and "- settings hash: aaaa, bbbb" in md
    assert "- source revision: r1, r2+dirty" in md
    assert "WARNING: the rows come from 2 different source revisions" in md
    assert "WARNING: rows of one model carry different settings hashes (mixed runs): ade20k / tiny / Dense seed 0" in md
    page = (out / "report.html").read_text()
    assert "source revision: r1, r2+dirty" in page and "<li class='warn'>WARNING" in page
    # old rows (no per_image, no provenance): empty intervals, "not recorded", no error
    old = tmp_path / "old"
    _write(old, _row())
    _report(old, tmp_path / "o")
    assert "- source revision: not recorded" in (tmp_path / "o" / "tables" / "summary.md").read_text()
    with (tmp_path / "o" / "benchmark.csv").open() as f:
        row = next(csv.DictReader(f))
    assert row["miou_ci_low"] == row["miou_ci_high"] == ""


def test_the_report_says_how_the_policy_net_was_initialised(tmp_path: Path) -> None:
    root = tmp_path / "raw"
    _study(root, n=4)
    out = tmp_path / "results"
    _report(root, out, html=out / "report.html")
    page = (out / "report.html").read_text()
    assert ("<b>CTS policy net:</b> random init (no ImageNet weights: methods.cts.policy.pretrained; the "
            "reference starts from ImageNet weights); channels ×0.2; ade20k 0.1 GFLOPs (5.0% of dense), counted in "
            "CTS&#x27;s GFLOPs") in page
    assert "ToMe policy net" not in page


def test_qualitative_title_flags_an_unreached_target() -> None:
    from segcompress.commands.qualitative import _gflops_text

    missed = {"achieved_gflops": 0.214, "within_tolerance": False, "achieved_fraction": 0.6}
    assert _gflops_text(missed) == "\n0.214 GFLOPs\ntarget not reached (0.60 of dense)"
    assert _gflops_text({"achieved_gflops": 0.2, "within_tolerance": True}) == "\n0.2 GFLOPs"


def test_target_verdict_uses_the_match_and_the_calibration_cost() -> None:
    from segcompress.report.rows import mark_targets

    dense = {"dataset": "d", "backbone": "b", "method": "dense", "target_fraction": None, "achieved_gflops": 2.0}
    algm_noise = {"dataset": "d", "backbone": "b", "method": "algm", "target_fraction": 0.5, "target_gflops": 1.0,
                  "achieved_gflops": 1.3, "calibration_gflops": 1.004}  # its own cost on noisy images
    tome = {"dataset": "d", "backbone": "b", "method": "tome", "target_fraction": 0.5, "target_gflops": 1.0,
            "achieved_gflops": 1.0, "within_tolerance": False}  # the match file's word wins
    nvit = {"dataset": "d", "backbone": "b", "method": "nvit", "target_fraction": 0.25, "achieved_gflops": 0.6}
    rows = [dense, algm_noise, tome, nvit]
    assert mark_targets(rows, tolerance=0.01) == 2
    assert algm_noise["target_reached"] is True and algm_noise["achieved_fraction"] == pytest.approx(0.65)
    assert tome["target_reached"] is False and "tolerance" not in tome
    # no target_gflops: the dense row's cost is the reference
    assert nvit["target_reached"] is False and nvit["achieved_fraction"] == pytest.approx(0.3)
    assert nvit["tolerance"] == 0.01 and "target_reached" not in dense


def test_paired_comparison_needs_interval_and_p_to_agree() -> None:
    """25 of 1,000 paired differences at or below 0: the 95 % percentile interval just excludes 0,
    but the two-sided p is 2·26/1001 > 0.05; at the edge the difference is not called significant."""
    d = np.r_[np.full(25, -0.1), np.full(975, 1.0)]
    edge = stats.paired(d, np.zeros_like(d), 1.0)
    assert edge.low > 0 and edge.p > 0.05 and not edge.significant
    clear = stats.paired(np.r_[np.full(20, -0.1), np.full(980, 1.0)], np.zeros(1000), 1.0)
    assert clear.low > 0 and clear.p < 0.05 and clear.significant
