"""Throughput measurement: runs, returns positive numbers and records the setting (no timing claims)."""

import json
import platform
import subprocess
import sys

import pytest
import torch

from segcompress.bench import measure_throughput, measure_throughputs, resolve_device
from segcompress.cli import main as cli
from segcompress.models import build_segmenter
from segcompress.models.checkpoint import save_model
from tiny_segmenter import SEGMENTER_DROPOUT, tiny_spec

torch.set_num_threads(1)

SPEC = tiny_spec(num_classes=3, **SEGMENTER_DROPOUT)  # 32 px, 8 px patches, width 32, 2 blocks

FIELDS = {"images_per_s", "images_per_s_median", "images_per_s_min", "images_per_s_max", "batch_time_s",
          "batch_time_s_median", "batch_time_s_min", "batch_time_s_max", "batch_times_s", "batch", "crop", "warmup",
          "repeats", "statistic", "dtype", "device", "device_type", "threads", "torch", "timm"}


def test_measure_throughput_fields_and_positive_numbers():
    model = build_segmenter(SPEC).train()
    out = measure_throughput(model, batch=2, crop=32, warmup=1, repeats=3, device="cpu")
    assert FIELDS <= set(out)
    assert out["images_per_s_min"] <= out["images_per_s"] <= out["images_per_s_max"]
    assert out["images_per_s_min"] > 0 and out["batch_time_s_min"] > 0
    assert out["batch"] == 2 and out["crop"] == [32, 32] and out["repeats"] == 3 and out["device_type"] == "cpu"
    assert out["threads"] >= 1 and out["device"]
    assert model.training  # mode restored
    json.dumps(out)


def test_measure_throughput_given_inputs_and_checks():
    model = build_segmenter(SPEC)
    out = measure_throughput(model, 3, (32, 32), warmup=0, repeats=1, inputs=torch.zeros(3, 3, 32, 32))
    assert out["images_per_s"] > 0
    with pytest.raises(ValueError, match="do not match"):
        measure_throughput(model, 2, 32, inputs=torch.zeros(3, 3, 32, 32))
    with pytest.raises(ValueError):
        measure_throughput(model, 0, 32)
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_several_models_are_timed_in_interleaved_rounds():
    """Warm-up per model, then each round times one batch of every model in turn."""
    calls: list[str] = []

    class Recorder(torch.nn.Module):
        def __init__(self, name: str) -> None:
            super().__init__()
            self.name = name

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            calls.append(self.name)
            return x

    rows = measure_throughputs([(Recorder("a"), None), (Recorder("b"), None)], 2, 8, warmup=1, repeats=3)
    assert calls == ["a", "b"] + ["a", "b", "b", "a", "a", "b"]
    assert len(rows) == 2 and all(r["repeats"] == 3 and r["images_per_s"] > 0 for r in rows)
    assert rows[0]["timed_at"] == rows[1]["timed_at"]  # one set of rounds: their batch times pair up


@pytest.mark.parametrize("statistic", ["best", "median"])
def test_the_headline_is_the_fastest_or_the_median_batch(monkeypatch, statistic):
    """images/s comes from the statistic's batch time; the others and every batch's time are kept."""
    import segcompress.bench as bench

    clock = iter([0.4, 0.1, 0.2, 0.8, 0.3])  # seconds of the five timed batches, in order
    monkeypatch.setattr(bench, "timed_call", lambda fn, device: (fn(), next(clock))[1])
    out = measure_throughput(torch.nn.Identity(), 2, 8, warmup=0, repeats=5, statistic=statistic)
    assert out["batch_times_s"] == [0.4, 0.1, 0.2, 0.8, 0.3] and out["statistic"] == statistic and out["timed_at"]
    assert out["batch_time_s"] == (0.1 if statistic == "best" else 0.3)
    assert out["images_per_s"] == pytest.approx(2 / out["batch_time_s"])
    assert (out["images_per_s_max"], out["images_per_s_median"], out["images_per_s_min"]) == pytest.approx((20, 2 / 0.3, 2.5))
    with pytest.raises(ValueError, match="statistic must be one of best, median"):
        measure_throughput(torch.nn.Identity(), 2, 8, statistic="mean")


def test_cli_bench_saved_model(tmp_path, capsys):
    path = tmp_path / "dense.safetensors"
    save_model(build_segmenter(SPEC), path)
    argv = ["bench", "--model", str(path), "--batch", "2", "--warmup", "1", "--repeats", "2", "--device", "cpu",
            "--threads", "1", "--allocator", "default", "--out", str(tmp_path / "bench.json")]
    assert cli(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert FIELDS <= set(out) and out["images_per_s"] > 0 and out["threads"] == 1
    assert out["method"] == "dense" and out["weights"] == str(path) and out["num_classes"] == 3
    assert out["allocator"] == "default" and out["statistic"] == "best"
    assert out["images_per_s"] == out["images_per_s_max"]
    assert json.loads((tmp_path / "bench.json").read_text())["batch"] == 2
    assert cli([*argv[:-2], "--statistic", "median"]) == 0
    median = json.loads(capsys.readouterr().out)
    assert median["statistic"] == "median" and median["images_per_s"] == median["images_per_s_median"]
    assert median["settings_hash"] != out["settings_hash"]


def test_cli_bench_variants_in_one_process(tmp_path, capsys):
    """--variant times several saved variants in one run; each row gets its own knob and tags."""
    path = tmp_path / "dense.safetensors"
    save_model(build_segmenter(SPEC), path)
    match = tmp_path / "tome.json"
    match.write_text(json.dumps({"method": "tome", "knob": {"r": 2}}))
    common = ["--batch", "2", "--warmup", "0", "--repeats", "1", "--device", "cpu", "--threads", "1",
              "--allocator", "default", "--tag", "dataset=ade20k"]
    argv = ["bench", "--variant", str(tmp_path / "a.json"), str(path), "dense", "-", "method=dense,seed=0",
            "--variant", str(tmp_path / "b.json"), str(path), "tome", str(match), "method=tome,target_fraction=0.5",
            *common]
    assert cli(argv) == 0
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in "ab")
    assert a["method"] == "dense" and a["knob"] == {} and a["seed"] == 0 and a["dataset"] == "ade20k"
    assert b["method"] == "tome" and b["knob"] == {"r": 2} and b["target_fraction"] == 0.5 and b["dataset"] == "ade20k"
    assert "seed" not in b and a["images_per_s"] > 0 and b["images_per_s"] > 0
    # the two forms do not mix, and a measured column cannot be a tag
    assert cli(["bench", "--model", str(path), "--variant", str(tmp_path / "c.json"), str(path), "dense", "-", "-",
                *common]) == 2
    assert cli(["bench", "--variant", str(tmp_path / "c.json"), str(path), "dense", "-", "images_per_s=1",
                *common]) == 2
    assert not (tmp_path / "c.json").exists()
    capsys.readouterr()
    assert cli(["bench", *common]) == 2
    assert "--model, --arch or --backbone" in capsys.readouterr().err


@pytest.mark.skipif(platform.system() != "Linux", reason="glibc's mallopt")
def test_keep_freed_memory_applies_on_glibc():
    """The bench process's allocator setting takes (run apart: it lasts for the whole process)."""
    code = "from segcompress.bench import keep_freed_memory; import sys; sys.exit(0 if keep_freed_memory() else 1)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_timed_call_times_one_call_on_cpu():
    from segcompress.bench import timed_call

    calls = []
    seconds = timed_call(lambda: calls.append(sum(range(10000))), torch.device("cpu"))
    assert calls == [sum(range(10000))] and 0 < seconds < 60


def test_autocast_option():
    from segcompress.bench import autocast

    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with autocast(torch.device("cpu"), "float32"):
        assert (a @ b).dtype == torch.float32
    with autocast(torch.device("cpu"), "bfloat16"):
        assert (a @ b).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype must be one of float32, bfloat16"):
        autocast(torch.device("cpu"), "float16")


def test_bench_rule_takes_every_core_and_times_with_the_configured_threads():
    """Dry run: a bench job holds all of --cores (no job runs beside it); torch gets analysis.throughput.threads,
    and images/s is taken by analysis.throughput.statistic."""
    import re
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parents[1]
    snakemake = str(Path(sys.executable).parent / "snakemake")
    run = subprocess.run([snakemake, "-n", "-p", "--cores", "3", "--forceall", "--until", "bench"], cwd=root,
                         capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    blocks = [b for b in re.split(r"\n(?=rule \w+:)", run.stdout) if b.startswith("rule bench:")]
    assert blocks
    throughput = yaml.safe_load((root / "config.yaml").read_text())["analysis"]["throughput"]
    for block in blocks:
        assert re.search(r"^\s+threads: 3$", block, flags=re.M), block[:500]
        assert f"--threads {throughput['threads']} >" in block
        assert f"--repeats {throughput['repeats']} --statistic {throughput['statistic']} " in block


def test_report_joins_the_spread_of_a_bench_row():
    from segcompress.report.rows import join_throughput, variant_key

    row = {"dataset": "ade20k", "backbone": "tiny", "method": "tome", "target_fraction": 0.5, "seed": 0}
    bench = {variant_key(row): {"images_per_s": 12.0, "images_per_s_min": 9.0, "images_per_s_median": 10.0,
                                "images_per_s_max": 12.0, "statistic": "best", "batch": 8, "device": "cpu", "threads": 1}}
    rows = [dict(row), {**row, "seed": 1}]
    assert join_throughput(rows, bench) == 0
    spread = ("images_per_s_min", "images_per_s_median", "images_per_s", "images_per_s_max", "bench_statistic")
    assert tuple(rows[0][k] for k in spread) == (9.0, 10.0, 12.0, 12.0, "best")
    assert "images_per_s_min" not in rows[1]


def test_report_gives_the_speedup_over_the_dense_model_of_the_same_seed():
    from segcompress.report.rows import join_throughput, variant_key

    dense = {"dataset": "ade20k", "backbone": "tiny", "method": "dense", "target_fraction": None, "seed": 0}
    tome = {**dense, "method": "tome", "target_fraction": 0.5}
    bench = {variant_key(dense): {"images_per_s": 40.0}, variant_key(tome): {"images_per_s": 70.0},
             variant_key({**tome, "seed": 1}): {"images_per_s": 60.0}}
    rows = [dict(dense), dict(tome), {**tome, "seed": 1}]
    assert join_throughput(rows, bench) == 0
    assert rows[0]["speedup"] == 1.0 and rows[1]["speedup"] == 70.0 / 40.0
    assert rows[2]["speedup"] is None  # seed 1 has no dense model timed: no ratio across jobs


def test_the_speedup_pairs_the_batches_of_each_round():
    """With batch times, the speed-up is the median of dense ÷ variant round by round: a slow spell
    that hits one round of both stays out of it, where a ratio of the two medians would not."""
    from segcompress.report.rows import speedup_over

    job = {"timed_at": "2026-12-01T16:00:00.000000+00:00"}
    dense = {**job, "images_per_s": 8.0, "batch_times_s": [1.0, 3.0, 1.0, 3.0, 3.0]}  # slow rounds 2, 4 and 5
    tome = {**job, "images_per_s": 20.0, "batch_times_s": [0.5, 1.5, 0.5, 1.5, 0.5]}  # slow rounds 2 and 4
    assert speedup_over(tome, dense) == 2.0  # per round 2, 2, 2, 2, 6; the medians' ratio would be 3.0 / 0.5 = 6
    # rows of other rounds (another job), or without batch times (older rows): the images/s ratio
    assert speedup_over({**tome, "timed_at": "2026-12-01T17:00:00.000000+00:00"}, dense) == 2.5
    assert speedup_over({**tome, "batch_times_s": [0.5, 1.5]}, dense) == 2.5
    assert speedup_over({"images_per_s": 12.0}, {"images_per_s": 8.0}) == 1.5
    assert speedup_over(tome, {}) is None
