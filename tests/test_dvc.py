"""DVC: dvc.yaml runs the Snakemake pipeline phase by phase, and reruns only what a change touches.

* The stages call Snakemake's phase targets (every phase once, in order), depend on the workflow,
  the library and the environment, read their params from config.yaml itself, and keep their
  outputs between runs (persist); metrics and plot data are uncached.
* Slow: in a temporary Git repository holding a copy of the project with a tiny study as its
  config.yaml, ``dvc repro`` runs the pipeline; a second ``dvc repro`` is up to date;
  ``dvc metrics show`` and ``dvc plots show`` work; changing a corruption severity regenerates
  that corrupted set and reruns evaluation and the report, while no training job runs again.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from project_copy import copy_paths, merge_config
from test_workflow import ROOT, job_counts

BIN = Path(sys.executable).parent
DVC = str(BIN / "dvc")
PROJECT_FILES = ("Snakefile", "config.yaml", "workflow", "profiles", "envs", "src", ".test", "dvc.yaml", ".dvcignore", ".gitignore")
WORK_RULES = {"train", "train_policy", "prune", "finetune", "match", "measure"}


def dvc_yaml() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())


def phases() -> list[str]:
    """The Snakefile's phase targets, in its order."""
    return re.findall(r"^rule (phase_\w+):", (ROOT / "Snakefile").read_text(), flags=re.M)


def dvc(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run dvc with the project's environment first on PATH; stderr is merged into stdout, in order
    (a stage's command writes to stderr, DVC's own lines to stdout)."""
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run([DVC, *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=timeout, check=False)


# ------------------------------------------------------------------------------ dvc.yaml itself


def test_stages_run_every_snakemake_phase_once_in_order() -> None:
    stages = dvc_yaml()["stages"]
    called = []
    for name, stage in stages.items():
        cmd = " ".join(stage["cmd"].split())
        head = "snakemake --cores all "
        assert cmd.startswith(head), (name, cmd)
        targets = cmd.removeprefix(head).split()
        assert targets and all(t.startswith("phase_") for t in targets), (name, cmd)
        called += targets
    assert called == phases()


def test_stages_track_code_params_and_keep_outputs() -> None:
    config = yaml.safe_load((ROOT / "config.yaml").read_text())
    spec = dvc_yaml()
    for name, stage in spec["stages"].items():
        assert {"Snakefile", "workflow"} <= set(stage["deps"]), name
        # the library is no job's input: an edit there reruns nothing, so dvc.lock must not claim it
        assert not {"src", "envs"} & set(stage["deps"]), name
        (params,) = stage["params"]
        for key in params["config.yaml"]:  # DVC fails on a key config.yaml lacks
            node = config
            for part in key.split("."):
                assert isinstance(node, dict) and part in node, (name, key)
                node = node[part]
        outs = [(path, props) for out in stage["outs"] for path, props in out.items()]
        assert outs and all(props["persist"] for _, props in outs), name  # Snakemake decides what to redo
    report = spec["stages"]["report"]
    assert report["metrics"] == [{"results/metrics": {"cache": False, "persist": True}}]
    plotted = {f for plot in spec["plots"] for props in plot.values() for f in props["y"]}
    assert plotted == {"results/curves.csv"}
    assert {"results/curves.csv": {"cache": False, "persist": True}} in report["outs"]
    # the stages' outputs do not overlap and the data flows forward
    produced: list[str] = []
    for stage in spec["stages"].values():
        for dep in stage["deps"]:
            if dep not in {"Snakefile", "workflow"}:
                assert dep in produced, dep
        produced += [p for out in stage["outs"] for p in out]
    assert len(produced) == len(set(produced))


def test_dvc_is_initialised_without_analytics() -> None:
    assert "analytics = false" in (ROOT / ".dvc" / "config").read_text()
    ignored = (ROOT / ".dvcignore").read_text().split()
    assert "__pycache__/" in ignored and "*.egg-info/" in ignored  # keeps the workflow/ dependency stable
    assert (ROOT / ".dvc" / "plots" / "miou_vs_gflops.json").is_file()


# -------------------------------------------------------------------------- dvc repro (slow)


@pytest.fixture
def dvc_repo(tmp_path: Path) -> Path:
    """A Git repository holding the project, with the tiny test study as its config.yaml."""
    copy_paths(PROJECT_FILES, ROOT, tmp_path, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    (tmp_path / ".dvc").mkdir()
    copy_paths(("config", "plots"), ROOT / ".dvc", tmp_path / ".dvc")
    config = merge_config(yaml.safe_load((ROOT / "config.yaml").read_text()),
                          yaml.safe_load((ROOT / ".test" / "config.yaml").read_text()))
    # accuracy only: the analyses have tests of their own
    merge_config(config, {"analysis": {"effective_rank": {"datasets": []}, "throughput": {"enabled": False}},
                          "report": {"qualitative": {"images": 0}}})
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    return tmp_path


def stage_outputs(output: str) -> dict[str, str]:
    """The part of `dvc repro`'s output each stage printed."""
    parts = re.split(r"^Running stage '(\w+)':$", output, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


@pytest.mark.slow
def test_slow_dvc_repro_reruns_only_what_a_change_touches(dvc_repo: Path) -> None:
    first = dvc("repro", cwd=dvc_repo)
    assert first.returncode == 0, first.stdout[-6000:]
    ran = stage_outputs(first.stdout)
    assert list(ran) == ["data", "models", "evaluate", "report"]
    assert job_counts(ran["models"])["train"] == 1
    assert (dvc_repo / "dvc.lock").is_file()
    model = dvc_repo / "models" / "ade20k" / "vit_micro" / "seed0" / "dense.safetensors"
    trained = model.stat().st_mtime_ns

    metrics = dvc("metrics", "show", "--json", cwd=dvc_repo)
    assert metrics.returncode == 0, metrics.stdout
    shown = json.loads(metrics.stdout)[""]["data"]  # one file per point, nothing else
    assert list(shown) == ["results/metrics/ade20k/vit_micro/dense.json"], list(shown)
    assert set(shown["results/metrics/ade20k/vit_micro/dense.json"]["data"]) == {"gflops", "miou_clean",
                                                                                "miou_corrupted", "seeds"}
    point = json.loads((dvc_repo / "results" / "metrics" / "ade20k" / "vit_micro" / "dense.json").read_text())
    assert 0 <= point["miou_clean"] <= 1 and point["gflops"] > 0
    plots = dvc("plots", "show", cwd=dvc_repo)
    assert plots.returncode == 0, plots.stdout
    page = (dvc_repo / "dvc_plots" / "index.html").read_text()
    assert "miou_clean" in page and "miou_corrupted" in page

    second = dvc("repro", cwd=dvc_repo)
    assert second.returncode == 0, second.stdout
    assert "Data and pipelines are up to date." in second.stdout
    assert not stage_outputs(second.stdout)

    # a corruption severity: a new corrupted set, its evaluation and the report; no training
    cfg = dvc_repo / "config.yaml"
    config = yaml.safe_load(cfg.read_text())
    config["study"]["severities"] = [2]
    cfg.write_text(yaml.safe_dump(config, sort_keys=False))
    third = dvc("repro", cwd=dvc_repo)
    assert third.returncode == 0, third.stdout[-6000:]
    ran = stage_outputs(third.stdout)
    assert job_counts(ran["data"]).get("corrupt") == 1
    # the models stage is rerun by DVC (data/ changed) but Snakemake inside runs no job of it
    models_jobs = job_counts(ran["models"]) if "Job stats" in ran.get("models", "") else {}
    assert not set(models_jobs) & WORK_RULES, models_jobs
    assert job_counts(ran["evaluate"]).get("evaluate") == 1
    assert job_counts(ran["report"]).get("report") == 1
    assert model.stat().st_mtime_ns == trained
    assert (dvc_repo / "data" / "ade20k-c" / "gaussian_noise" / "2" / "manifest.json").is_file()
    assert "Data and pipelines are up to date." in dvc("repro", cwd=dvc_repo).stdout
