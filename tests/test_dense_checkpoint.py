"""Starting a study from an existing dense checkpoint: `segcompress train --from-checkpoint` and the
config key `train.dense_checkpoints` that makes the train rule use it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from project_copy import copy_paths, merge_config
from segcompress.cli import main as cli
from segcompress.models import SegmenterSpec, build_segmenter
from segcompress.models.checkpoint import save_model, spec_path

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
ARCH = {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}


def released(tmp_path: Path, num_classes: int = 150, crop: int = 64, name: str = "released.safetensors") -> Path:
    """A dense checkpoint as `segcompress convert` or a training of this project writes it."""
    spec = SegmenterSpec(num_classes=num_classes, img_size=crop, **ARCH)
    path = tmp_path / name
    save_model(build_segmenter(spec), path)
    return path


def train_argv(source: Path, out: Path, layout: str = "ade20k", crop: str = "64") -> list[str]:
    return ["train", "--layout", layout, "--root", str(out.parent / "no-data-needed"), "--crop", crop,
            "--img-scale", "256", "64", "--arch", json.dumps(ARCH), "--out", str(out), "--from-checkpoint", str(source)]


def test_adopted_checkpoint_is_copied_unchanged(tmp_path: Path) -> None:
    source = released(tmp_path)
    out = tmp_path / "models" / "dense.safetensors"
    assert cli(train_argv(source, out)) == 0
    assert out.read_bytes() == source.read_bytes()
    assert spec_path(out).read_bytes() == spec_path(source).read_bytes()


@pytest.mark.parametrize(("layout", "crop", "field"), [("cityscapes", "64", "num_classes 150 (config: 19)"),
                                                      ("ade20k", "96", "img_size 64 (config: 96)")])
def test_a_checkpoint_that_does_not_fit_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   layout: str, crop: str, field: str) -> None:
    source = released(tmp_path)
    out = tmp_path / "models" / "dense.safetensors"
    assert cli(train_argv(source, out, layout, crop)) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and field in err and f"--from-checkpoint {source}" in err, err
    assert not out.exists() and not spec_path(out).exists()


def test_other_widths_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = SegmenterSpec(num_classes=150, img_size=64, patch_size=8, embed_dim=32, depth=3, num_heads=2)
    source = tmp_path / "deeper.safetensors"
    save_model(build_segmenter(spec), source)
    assert cli(train_argv(source, tmp_path / "out.safetensors")) == 2
    assert "depth 3 (config: 2)" in capsys.readouterr().err


def snakemake(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SNAKEMAKE, *args], cwd=cwd, capture_output=True, text=True, timeout=300, check=False)


def study_copy(tmp_path: Path, checkpoints: dict) -> Path:
    """The tiny study (.test/config.yaml) in a copy of the workflow, with train.dense_checkpoints set."""
    tmp_path.mkdir()
    copy_paths(("Snakefile", "config.yaml", "workflow", "profiles", "envs", ".test"), ROOT, tmp_path)
    cfg = tmp_path / ".test" / "config.yaml"
    config = merge_config(yaml.safe_load(cfg.read_text()), {"train": {"dense_checkpoints": checkpoints}})
    cfg.write_text(yaml.safe_dump(config))
    return tmp_path


def test_workflow_adopts_the_configured_checkpoint(tmp_path: Path) -> None:
    work = study_copy(tmp_path / "study", {"ade20k": {"vit_micro": "released/ade20k.safetensors"}})
    (work / "released").mkdir()
    released(work / "released", name="ade20k.safetensors")
    result = snakemake("-n", "-p", "--configfile", ".test/config.yaml", "--cores", "1",
                       "models/ade20k/vit_micro/seed0/dense.safetensors", cwd=work)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "--from-checkpoint released/ade20k.safetensors > logs/train/" in result.stdout


def test_a_typo_in_the_key_is_an_error(tmp_path: Path) -> None:
    work = study_copy(tmp_path / "study", {"ade20k": {"vit_mikro": "released/ade20k.safetensors"}})
    result = snakemake("-n", "--configfile", ".test/config.yaml", "--cores", "1", cwd=work)
    assert result.returncode != 0
    assert "train.dense_checkpoints.ade20k names vit_mikro" in result.stdout + result.stderr
