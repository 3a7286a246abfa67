"""Cluster execution: the SLURM profile and multi-GPU training jobs, as far as a machine without
SLURM or GPUs allows.

* The profile parses, and a dry run through it (``snakemake -n --workflow-profile profiles/slurm``)
  plans every rule with the profile's resources: GPU, GPU model, CPUs per GPU, runtime and memory
  on the GPU rules, none of them on the CPU-only rules.
* The SLURM plugin's own submit-string builder turns those resources into the expected ``sbatch``
  flags (``--gpus=<model>:N``, ``--cpus-per-gpu``, ``-t``, ``--mem``).
* A train job given ``gpu=N > 1`` runs ``torchrun --nproc_per_node N -m segcompress train``; the
  slow test runs one for real with 2 CPU processes (gloo).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from test_workflow import ROOT, WORKFLOW_FILES, snakemake

PROFILE = ROOT / "profiles" / "slurm"
CPU_RULES = ("data", "corrupt", "measure", "report")


def profile() -> dict:
    return yaml.safe_load((PROFILE / "config.yaml").read_text())


def planned_jobs(output: str) -> list[dict]:
    """The job blocks of a (non-quiet) dry run: rule, threads, resources and command of each job."""
    jobs: list[dict] = []
    for line in output.splitlines():
        m = re.fullmatch(r"(?:local)?rule (\w+):", line.strip())
        if m:
            jobs.append({"rule": m.group(1), "threads": 1, "resources": {}, "shell": ""})
            continue
        if not jobs:
            continue
        key, _, value = line.strip().partition(": ")
        if key == "threads":
            jobs[-1]["threads"] = int(value)
        elif key == "resources":
            for item in value.split(", "):
                k, _, v = item.partition("=")
                jobs[-1]["resources"][k] = int(v) if v.isdigit() else v
        elif line.startswith("Shell command: "):
            jobs[-1]["shell"] = line.removeprefix("Shell command: ")
    return jobs


def plan(*args: str) -> list[dict]:
    """Dry run of the default study (every rule), forced, with extra arguments."""
    result = snakemake("-n", "--forceall", *args)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return planned_jobs(result.stdout)


@pytest.fixture(scope="module")
def gpu_rules() -> set[str]:
    """The rules that ask for a GPU themselves (`resources: gpu=1` in workflow/rules/)."""
    return {j["rule"] for j in plan("--workflow-profile", "none") if "gpu" in j["resources"]}


@pytest.fixture(scope="module")
def slurm_plan() -> list[dict]:
    """Dry run of the default study through the SLURM profile.

    ``--cores 64``: a dry run caps threads at the local cores (1 by default); a real SLURM run
    does not cap them.
    """
    jobs = plan("--cores", "64", "--workflow-profile", str(PROFILE.relative_to(ROOT)))
    assert {j["rule"] for j in jobs} >= set(CPU_RULES) | {"train", "evaluate"}
    return jobs


def test_slurm_profile_is_commented_and_covers_every_gpu_rule(gpu_rules: set[str]) -> None:
    text = (PROFILE / "config.yaml").read_text()
    cfg = profile()
    assert cfg["executor"] == "slurm"
    assert sum(line.lstrip().startswith("#") for line in text.splitlines()) >= 20
    assert gpu_rules >= {"train", "train_policy", "prune", "finetune", "match", "evaluate"}
    profiled = {rule for rule, res in cfg["set-resources"].items() if "gpu" in res}
    assert profiled == gpu_rules
    for rule in gpu_rules:
        assert {"gpu", "gpu_model", "cpus_per_gpu", "runtime", "mem_mb"} <= set(cfg["set-resources"][rule]), rule
    for rule in CPU_RULES:
        assert "gpu" not in cfg["set-resources"].get(rule, {}), rule


def test_slurm_dry_run_jobs_carry_the_profile_resources(slurm_plan: list[dict], gpu_rules: set[str]) -> None:
    cfg = profile()
    for job in slurm_plan:
        rule, res = job["rule"], job["resources"]
        if rule == "all" or rule.startswith("phase_"):
            continue
        expected = {**cfg["default-resources"], **cfg["set-resources"].get(rule, {})}
        for key, value in expected.items():
            assert res.get(key) == value, (rule, key, res)
        if rule in gpu_rules:
            assert res["gpu"] == 1 and res["gpu_model"] == cfg["set-resources"][rule]["gpu_model"], rule
        else:
            assert "gpu" not in res and "gpu_model" not in res, (rule, res)
        if rule in cfg["set-threads"]:
            assert job["threads"] == cfg["set-threads"][rule], rule


class _Resources(dict):
    """Job resources as the SLURM plugin reads them (``.get`` and attribute access)."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def sbatch_call(job: dict) -> str:
    """The sbatch command the SLURM plugin would build for a planned job."""
    from snakemake_executor_plugin_slurm.submit_string import get_submit_command
    from snakemake_executor_plugin_slurm.utils import set_gres_string

    fake = SimpleNamespace(resources=_Resources(job["resources"]), threads=job["threads"])
    params = {"run_uuid": "uuid", "slurm_logfile": "logs/slurm/%j.log", "comment_str": f"rule_{job['rule']}",
              "account": "", "partition": "", "workdir": "."}
    return get_submit_command(fake, params) + set_gres_string(fake)


def test_slurm_submissions_request_gpus_cpus_time_and_memory(slurm_plan: list[dict], gpu_rules: set[str]) -> None:
    cfg = profile()
    seen = set()
    for job in slurm_plan:
        rule = job["rule"]
        if rule == "all" or rule.startswith("phase_") or rule in seen:
            continue
        seen.add(rule)
        call = sbatch_call(job)
        res = {**cfg["default-resources"], **cfg["set-resources"].get(rule, {})}
        assert f"-t {res['runtime']}" in call and f"--mem {res['mem_mb']}" in call, (rule, call)
        if rule in gpu_rules:
            assert f"--gpus={res['gpu_model']}:{res['gpu']}" in call, (rule, call)
            assert f"--cpus-per-gpu={res['cpus_per_gpu']}" in call, (rule, call)
        else:
            assert "--gpus" not in call and f"--cpus-per-task={job['threads']}" in call, (rule, call)
    assert seen >= set(CPU_RULES) | gpu_rules


def launcher(shell: str) -> str:
    """What the ``$(...)`` in front of ``segcompress train`` in a planned train command expands to."""
    m = re.match(r"\$\((.*?)\) segcompress train ", shell)
    assert m, shell
    return subprocess.run(["bash", "-c", m.group(1)], capture_output=True, text=True).stdout.strip()


def test_train_job_with_several_gpus_is_launched_by_torchrun(slurm_plan: list[dict], tmp_path: Path) -> None:
    one_gpu = next(j for j in slurm_plan if j["rule"] == "train")
    assert launcher(one_gpu["shell"]) == ""  # gpu=1: plain `segcompress train`
    # 4 GPUs per training job: the profile's `gpu:` of train (a command-line --set-resources
    # would replace the profile's whole set-resources list, so the copy is edited instead)
    cfg = profile()
    cfg["set-resources"]["train"]["gpu"] = 4
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    result = snakemake("-n", "--forceall", "--cores", "64", "--workflow-profile", str(tmp_path),
                       "--configfile", ".test/config-all-methods.yaml",
                       "--", "models/ade20k/vit_micro/seed0/dense.safetensors")
    assert result.returncode == 0, result.stderr
    (job,) = [j for j in planned_jobs(result.stdout) if j["rule"] == "train"]
    assert job["resources"]["gpu"] == 4
    call = sbatch_call(job)
    assert "--gpus=a100:4" in call and "--cpus-per-gpu=8" in call, call
    assert launcher(job["shell"]) == "torchrun --standalone --nproc_per_node 4 -m"


@pytest.mark.slow
def test_slow_train_job_with_two_gpus_runs_two_processes(tmp_path: Path) -> None:
    """gpu=2 on a CPU-only machine: torchrun starts 2 processes that train over gloo (~25 s)."""
    for name in WORKFLOW_FILES:
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, tmp_path / name)
    result = snakemake("--configfile", ".test/config.yaml", "--cores", "2", "--set-resources", "train:gpu=2",
                       "--", "models/ade20k/vit_micro/seed0/dense.safetensors", cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log = (tmp_path / "logs" / "train" / "ade20k" / "vit_micro" / "seed0" / "dense.log").read_text()
    assert "over 2 process(es)" in log, log[-2000:]
    assert (tmp_path / "models" / "ade20k" / "vit_micro" / "seed0" / "dense.safetensors").is_file()
