"""The benchmark scripts run (tiny sizes, CPU): numbers are printed, never asserted as speed."""

import json
import re
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

torch.set_num_threads(1)


def test_eval_overhead_measures_evaluation_and_forward_in_one_run(tmp_path):
    import eval_overhead

    out = tmp_path / "overhead.json"
    assert eval_overhead.main(["--num-val", "2", "--crop", "64", "--stride", "48", "--img-scale", "256", "64",
                               "--repeats", "1", "--threads", "1", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["images"] == 2 and r["windows"] >= 2
    assert r["eval_s"] > 0 and r["forward_s"] > 0
    assert r["ratio"] == pytest.approx(r["forward_s"] / r["eval_s"])
    assert r["eval_windows_per_s"] == pytest.approx(r["windows"] / r["eval_s"])
    assert {"load_s", "slide_s", "resize_s", "argmax_s", "metric_s", "stitch_s"} <= set(r) and r["ratio_cpu"] > 0
    assert all(r[k] > 0 for k in ("load_s", "slide_s", "resize_s", "argmax_s", "metric_s"))


def test_gpu_check_smoke_runs_every_step_on_the_fallback_device(tmp_path):
    import gpu_check

    out = tmp_path / "gpu_check.md"
    assert gpu_check.main(["--smoke", "--device", "cpu", "--out", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("# GPU check (smoke)")
    for batch in (1, 2):
        for dtype in ("float32", "bfloat16"):
            assert f"## Token methods, batch {batch}, {dtype}" in text
            assert f"## NViT pruning, batch {batch}, {dtype}" in text
            assert f"batch {batch} threads 1 dense" in text
    assert text.count(f"{'bfloat16'} on cpu") == 4 and text.count("float32 on cpu") == 4
    for method in ("tome", "algm", "cts"):
        for target in ("0.50", "0.35"):
            assert len(re.findall(rf"^{method} +{target} ", text, flags=re.M)) == 4, (method, target)
    assert len(re.findall(r"^ +50% ", text, flags=re.M)) == 4 and len(re.findall(r"^ +35% ", text, flags=re.M)) == 4
    assert "## Study .test/config-all-methods.yaml (dry run)" in text
    assert re.search(r"^evaluate +\d+", text, flags=re.M)  # the study's plan lists its evaluation jobs
    assert "0 step(s) failed" in text


def test_gpu_check_keeps_what_ran_when_a_step_fails(tmp_path, monkeypatch):
    """A failed step is written with what it printed and its traceback, the later steps still run,
    the status is 1."""
    import gpu_check

    def prints_then_breaks(argv: list[str]) -> None:
        print("dense 12.3 images/s")
        raise RuntimeError("out of memory, say")

    def bad_arguments() -> str:
        raise SystemExit(2)  # as argparse exits on a bad option

    monkeypatch.setattr(gpu_check, "speed_sections", lambda device, smoke: [
        ("first", lambda: gpu_check.captured(prints_then_breaks, [])), ("second", bad_arguments),
        ("third", lambda: "42\n")])
    out = tmp_path / "gpu_check.md"
    assert gpu_check.main(["--smoke", "--device", "cpu", "--skip-study", "--out", str(out)]) == 1
    text = out.read_text()
    first, second, third = text.split("## first")[1].split("## second")[0], *text.split("## second")[1].split("## third")
    assert "FAILED" in first and "RuntimeError: out of memory, say" in first and "dense 12.3 images/s" in first
    assert "FAILED" in second and "SystemExit: 2" in second
    assert "42" in third and "2 step(s) failed" in text


def test_gpu_check_stops_without_a_gpu_unless_smoke(tmp_path):
    import gpu_check

    with pytest.raises(SystemExit, match="no CUDA device"):
        gpu_check.main(["--device", "cpu", "--out", str(tmp_path / "gpu_check.md")])
    assert not (tmp_path / "gpu_check.md").exists()
