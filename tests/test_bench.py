"""Throughput measurement: runs, returns positive numbers and records the setting (no timing claims)."""

import json

import pytest
import torch

from segcompress.bench import measure_throughput, resolve_device
from segcompress.cli import main as cli
from segcompress.models import SegmenterSpec, build_segmenter
from segcompress.models.checkpoint import save_model

torch.set_num_threads(1)

SPEC = SegmenterSpec(num_classes=3, img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)

FIELDS = {"images_per_s", "images_per_s_min", "images_per_s_max", "batch_time_s", "batch_time_s_min",
          "batch_time_s_max", "batch", "crop", "warmup", "repeats", "dtype", "device", "device_type", "threads",
          "torch", "timm"}


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


def test_cli_bench_saved_model(tmp_path, capsys):
    path = tmp_path / "dense.safetensors"
    save_model(build_segmenter(SPEC), path)
    argv = ["bench", "--model", str(path), "--batch", "2", "--warmup", "1", "--repeats", "2", "--device", "cpu",
            "--threads", "1", "--out", str(tmp_path / "bench.json")]
    assert cli(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert FIELDS <= set(out) and out["images_per_s"] > 0 and out["threads"] == 1
    assert out["method"] == "dense" and out["weights"] == str(path) and out["num_classes"] == 3
    assert json.loads((tmp_path / "bench.json").read_text())["batch"] == 2
