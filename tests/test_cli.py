"""The command line: --version, and one clear line (exit 2, no traceback, nothing half-written)
for bad input that no verb anticipates: unreadable weights, an output where no file can go."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from segcompress import __version__
from segcompress.models import build_segmenter
from segcompress.models.checkpoint import save_model
from tiny_segmenter import SEGMENTER_DROPOUT, tiny_spec

ARCH = '{"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}'


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "segcompress", *args], capture_output=True, text=True, timeout=120)


def one_line_error(result: subprocess.CompletedProcess, verb: str) -> str:
    assert result.returncode == 2, result.stderr
    err = result.stderr.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in result.stderr, result.stderr
    assert err[0].startswith(f"segcompress {verb}: error:")
    return err[0]


def test_version():
    result = run("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"segcompress {__version__}"


def test_verbose_before_or_after_the_verb(tmp_path):
    """`segcompress -v VERB` is `segcompress VERB -v` (a traceback instead of the one line);
    an unknown global option is an error, not dropped."""
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage")
    for args in (("-v", "flops", "--model", str(bad)), ("flops", "--model", str(bad), "-v")):
        result = run(*args)
        assert result.returncode != 0 and "Traceback" in result.stderr, result.stderr
    result = run("-x", "flops", "--model", str(bad))
    assert result.returncode == 2 and "unrecognized arguments: -x" in result.stderr


@pytest.mark.parametrize("cut", [0, 40, -64])
def test_truncated_or_garbage_weights_are_one_line_naming_the_file(tmp_path, cut):
    path = tmp_path / "dense.safetensors"
    save_model(build_segmenter(tiny_spec(depth=1, **SEGMENTER_DROPOUT)), path)
    path.write_bytes(b"not a checkpoint at all" if cut == 0 else path.read_bytes()[:cut])
    line = one_line_error(run("flops", "--model", str(path)), "flops")
    assert str(path) in line and "safetensors" in line


def test_unwritable_output_is_one_line_naming_the_path(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    out = blocker / "sub" / "flops.json"
    line = one_line_error(run("flops", "--arch", ARCH, "--num-classes", "5", "--crop", "32", "--out", str(out)),
                          "flops")
    assert str(blocker) in line
    assert blocker.read_text() == "a file where a folder should be" and not list(tmp_path.glob(".*tmp"))


def test_report_never_overwrites_the_pipelines_table_unless_told(tmp_path):
    """`segcompress report` needs --csv: run bare, it stops before writing anything."""
    result = run("report", str(tmp_path))
    assert result.returncode == 2 and "--csv" in result.stderr
    assert not list(tmp_path.iterdir())


def test_tampered_spec_is_one_line_naming_the_key(tmp_path):
    """A spec edited after saving so that every shape still fits (norm_eps) would silently change
    the model: the verb stops with one line naming the spec and the changed key."""
    path = tmp_path / "dense.safetensors"
    save_model(build_segmenter(tiny_spec(depth=1, **SEGMENTER_DROPOUT)), path)
    spec = path.with_suffix(".json")
    spec.write_text(spec.read_text().replace('"norm_eps": 1e-06', '"norm_eps": 0.001'))
    line = one_line_error(run("flops", "--model", str(path)), "flops")
    assert str(spec) in line and "norm_eps" in line
