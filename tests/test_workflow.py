"""The Snakemake workflow: config schema, the planned DAG, lint, and incremental reruns.

The last test runs a tiny study end to end (about a minute on 2 cores); it is named
``test_slow_end_to_end_...`` and marked ``slow``, and `make test` runs it (CI must).
"""

from __future__ import annotations

import copy
import json
from csv import DictReader
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from snakemake.exceptions import WorkflowError

from project_copy import copy_paths

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).parent / "snakemake")
SCHEMA = ROOT / "workflow" / "schemas" / "config.schema.yaml"
WORKFLOW_FILES = ("Snakefile", "config.yaml", "workflow", "profiles", "envs", ".test")


def snakemake(*args: str, cwd: Path = ROOT, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SNAKEMAKE, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )


def job_counts(output: str) -> dict[str, int]:
    """The 'Job stats' table Snakemake prints: rule -> number of jobs."""
    counts: dict[str, int] = {}
    lines = output.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("Job stats")), None)
    assert start is not None, f"no job stats in:\n{output}"
    for line in lines[start + 3 :]:
        m = re.fullmatch(r"(\w+)\s+(\d+)", line.strip())
        if not m:
            break
        if m.group(1) != "total":
            counts[m.group(1)] = int(m.group(2))
    return counts


def default_config() -> dict:
    return yaml.safe_load((ROOT / "config.yaml").read_text())


# ------------------------------------------------------------------------------------ schema


def _validate(config: dict) -> dict:
    from snakemake.utils import validate

    config = copy.deepcopy(config)
    validate(config, str(SCHEMA))
    return config


def test_default_and_test_configs_are_valid() -> None:
    _validate(default_config())
    merged = default_config()
    for key, value in yaml.safe_load((ROOT / ".test" / "config.yaml").read_text()).items():
        merged[key] = value
    _validate(merged)


@pytest.mark.parametrize(
    "path, key",
    [
        ((), "methodz"),
        (("study",), "target"),
        (("datasets", "ade20k"), "stirde"),
        (("datasets", "ade20k", "eval"), "strid"),
        (("backbones", "vit_p8_d12"), "embed"),
        (("train", "recipe"), "iter"),
        (("methods", "tome"), "unmerge"),
        (("methods", "nvit_tome"), "ratio"),
        (("report",), "categories"),
        (("report", "qualitative"), "image"),
        (("analysis", "effective_rank"), "window"),
        (("analysis", "throughput"), "batches"),
    ],
)
def test_schema_rejects_unknown_keys_by_name(path: tuple[str, ...], key: str) -> None:
    config = default_config()
    node = config
    for p in path:
        node = node[p]
    node[key] = 1
    with pytest.raises(WorkflowError, match=rf"'{key}' was unexpected"):
        _validate(config)


def test_schema_rejects_bad_values_and_fills_defaults() -> None:
    config = default_config()
    config["study"]["targets"] = [1.5]
    with pytest.raises(WorkflowError, match="1.5"):
        _validate(config)
    config = default_config()
    del config["report"], config["methods"]["nvit_tome"]
    filled = _validate(config)
    assert filled["report"] == {"corrupted_categories": None, "corrupted_severities": None, "heatmap": "miou",
                                "qualitative": {"images": 2, "corruption": None, "severity": 3, "zoom": 0.35}}
    assert filled["methods"]["nvit_tome"] == {"prune_share": 0.5}


def test_snakemake_reports_unknown_key_and_undefined_names() -> None:
    result = snakemake("-n", "--config", "bogus_key=1")
    assert result.returncode != 0
    assert "bogus_key" in result.stdout + result.stderr
    result = snakemake("-n", "--config", "study={'datasets': ['pascal'], 'backbones': ['vit_p8_d12']}")
    assert result.returncode != 0
    assert "pascal" in result.stdout + result.stderr


@pytest.mark.parametrize("override, words", [
    ("datasets: {ade20k: {crop: 100}}", ["datasets.ade20k.crop 100", "patch_size 8", "96"]),
    ("datasets: {cityscapes: {eval: {stride: 200}}}", ["datasets.cityscapes.eval.stride 200", "128"]),
    ("analysis: {effective_rank: {datasets: [ade2k]}}", ["analysis.effective_rank.datasets", "ade2k"]),
    # method names come from the registry (plug-ins too), settings are checked by their dataclass
    ("study: {methods: [dense, tomee]}", ["study.methods", "tomee", "nvit_tome"]),
    ("methods: {algm: {window: [1, 1]}}", ["methods.algm", "window"]),
])
def test_impossible_windows_and_misspelt_rank_datasets_stop_the_plan(tmp_path, override, words) -> None:
    layer = tmp_path / "layer.yaml"
    layer.write_text(override + "\n")
    result = snakemake("-n", "--configfile", "config.yaml", str(layer))
    assert result.returncode != 0
    for w in words:
        assert w in result.stdout + result.stderr


# ----------------------------------------------------------------------------- DAG and lint


def test_schema_methods_are_the_registry_and_its_settings_dataclasses() -> None:
    """study.methods defaults to every built-in method, and each methods.<name> section of the
    schema has exactly its settings dataclass's keys, with the same defaults where it states one."""
    import dataclasses

    from segcompress import methods

    schema = yaml.safe_load(SCHEMA.read_text())
    assert sorted(schema["properties"]["study"]["properties"]["methods"]["default"]) == sorted(methods.names())
    sections = schema["properties"]["methods"]["properties"]
    for method in methods.all_methods():
        fields = {f.name: f for f in dataclasses.fields(method.settings)}
        props = sections.get(method.name, {}).get("properties", {})
        assert set(props) == set(fields), method.name
        defaults = method.settings().to_dict()
        for key, prop in props.items():
            if "default" in prop:
                assert prop["default"] == defaults[key], f"methods.{method.name}.{key}"


def test_dry_run_lists_the_study_grid() -> None:
    # --forceall: the whole DAG, also in a working tree where the study has already run
    result = snakemake("-n", "--forceall", "--quiet", "rules")
    assert result.returncode == 0, result.stderr
    counts = job_counts(result.stdout)
    study = default_config()["study"]
    ds, bb, seeds = len(study["datasets"]), len(study["backbones"]), len(study["seeds"])
    from segcompress.corrupt import CATEGORY_OF

    def severities(c: str) -> list[int]:  # a category's own severities, else study.severities
        return (study["category_severities"] or {}).get(CATEGORY_OF[c], study["severities"])

    conditions = 1 + sum(len(severities(c)) for c in study["corruptions"])
    finetune = default_config()["finetune"]
    assert finetune["dense_control"]
    variants = 2 + (len(study["methods"]) - 1) * len(study["targets"])  # dense, dense control, the grid
    from segcompress.methods import names

    compressed_token = sum(m in study["methods"] for m in names(matched=True))
    assert counts["data"] == ds
    assert counts["corrupt"] == ds * (conditions - 1)
    assert counts["train"] == ds * bb * seeds
    assert counts["train_policy"] == ds * bb * seeds
    assert counts["match"] == ds * bb * seeds * compressed_token * len(study["targets"])
    assert counts["measure"] == ds * bb * seeds  # the dense model's GFLOPs
    # the dense control, every pruned model (prune-then-merge's too when its ToMe is not fine-tuned)
    # and, with finetune.token_methods, every token-compressed point
    token_ft = ds * bb * seeds * compressed_token * len(study["targets"]) if finetune["token_methods"] else 0
    pruned_ft = counts["prune"] - (ds * bb * seeds * len(study["targets"]) if finetune["token_methods"] else 0)
    assert counts["finetune"] == ds * bb * seeds + pruned_ft + token_ft > 0
    assert conditions > 1
    assert counts["evaluate"] == ds * bb * seeds * variants  # one job per variant: every condition
    # analyse phase: rank on its datasets and conditions, one throughput job per seed, one panel per grid cell
    analysis = default_config()["analysis"]
    rank_ds = sum(d in (analysis["effective_rank"]["datasets"] or study["datasets"]) for d in study["datasets"])
    ranked = 1 + sum(len(set(analysis["effective_rank"]["severities"]) & set(severities(c)))
                     for c in analysis["effective_rank"]["corruptions"] if c in study["corruptions"])
    assert ranked > 1
    assert counts["rank"] == rank_ds * bb * seeds * variants  # one job per variant: every ranked condition
    assert counts["bench"] == ds * bb * seeds  # every variant of a seed timed in one job
    assert counts["qualitative"] == ds * bb
    assert counts["report"] == counts["all"] == 1


def test_every_training_stage_follows_the_datasets_photometric_switch() -> None:
    """datasets.<d>.photometric reaches train, the CTS policy, prune and fine-tune alike."""
    result = snakemake("-n", "--forceall", "-p")
    assert result.returncode == 0, result.stderr
    commands = [line for line in result.stdout.splitlines() if "segcompress " in line]
    for verb in ("train", "policy", "prune", "finetune"):
        verb_lines = [c for c in commands if f"segcompress {verb} " in c]
        assert verb_lines, verb
        for line in verb_lines:
            ds = re.search(r"--root data/(\w+)", line).group(1)
            off = not default_config()["datasets"][ds]["photometric"]
            assert ("--no-photometric" in line) == off, line


def test_every_phase_target_and_contract_path_resolves() -> None:
    phases = ["phase_data", "phase_corrupt", "phase_train", "phase_prune", "phase_match",
              "phase_finetune", "phase_evaluate", "phase_analyse", "phase_report"]
    result = snakemake("-n", "--forceall", *phases, "--quiet", "rules")
    assert result.returncode == 0, result.stderr
    # paths of docs/contracts.md, one per kind of output, for any grid point (not only the config's);
    # the conditions are the config's, since one job writes all of a variant's conditions
    paths = [
        "data/cityscapes/manifest.json",
        "data/ade20k-c/fog/3/manifest.json",
        "models/ade20k/vit_p8_d12/seed0/dense.safetensors",
        "models/ade20k/vit_p8_d12/seed1/nvit-0.6.safetensors",
        "matches/ade20k/vit_p8_d12/seed0/algm-0.3.json",
        "results/raw/ade20k/vit_p8_d12/dense-seed0/clean/0.json",
        "results/raw/cityscapes/vit_p8_d12/nvit_tome-0.3-seed0/fog/5.json",
        "results/raw_rank/cityscapes/vit_p8_d12/nvit-0.3-seed1/gaussian_noise/5.json",
        "results/raw_bench/ade20k/vit_p8_d12/cts-0.35-seed0.json",  # one job times the config's variants
        "results/figures/qualitative/cityscapes/vit_p8_d12.png",
    ]
    result = snakemake("-n", "--forceall", *paths, "--quiet", "rules")
    assert result.returncode == 0, result.stderr
    # prune-then-merge at 0.5 (prune_share 0.5) builds on the model pruned to sqrt(0.5)
    result = snakemake("-n", "--forceall", "matches/ade20k/vit_p8_d12/seed0/nvit_tome-0.5.json")
    merged = "nvit-0.7071.safetensors" if default_config()["finetune"]["token_methods"] else "nvit-0.7071-ft.safetensors"
    assert merged in result.stdout


def test_workflow_profile_loads() -> None:
    """A plain `snakemake` gets the local defaults (profiles/default, beside the Snakefile); a
    cluster's workflow profile replaces them instead of being merged with them."""
    result = snakemake("-n", "--quiet", "rules")
    assert result.returncode == 0, result.stderr
    assert "Using workflow specific profile profiles/default" in result.stdout + result.stderr
    result = snakemake("-n", "--workflow-profile", "profiles/slurm", "--quiet", "rules")
    assert result.returncode == 0, result.stderr
    assert "Using workflow specific profile profiles/slurm" in result.stdout + result.stderr
    assert "profiles/default" not in result.stdout + result.stderr


def test_lint_is_clean() -> None:
    for args in ((), ("--configfile", ".test/config.yaml")):
        result = snakemake("--lint", *args)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "Lints for" not in result.stdout + result.stderr


# ------------------------------------------------------------------------ end to end (slow)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A copy of the workflow (not of data or results) to run in."""
    copy_paths(WORKFLOW_FILES, ROOT, tmp_path)
    return tmp_path


@pytest.mark.slow
def test_slow_end_to_end_incremental_reruns(workdir: Path) -> None:
    """Run the tiny study; a second run does nothing; an evaluation-only edit reruns evaluation only;
    a new corruption severity reruns its corruption, evaluation and the report, never training."""
    run = ("--configfile", ".test/config.yaml", "--cores", "2")
    first = snakemake(*run, cwd=workdir, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    csv = workdir / "results" / "benchmark.csv"
    lines = csv.read_text().splitlines()
    assert len(lines) == 1 + 2  # clean + one corruption at one severity
    assert lines[0].startswith("dataset,backbone,method,knob,")
    assert (workdir / "results" / "figures" / "miou_vs_gflops.pdf").is_file()
    assert (workdir / "logs" / "train" / "ade20k" / "vit_micro" / "seed0" / "dense.log").is_file()
    assert (workdir / "results" / "jobs" / "evaluate" / "ade20k" / "vit_micro" / "dense-seed0.tsv").is_file()
    model = workdir / "models" / "ade20k" / "vit_micro" / "seed0" / "dense.safetensors"
    trained = model.stat().st_mtime_ns

    second = snakemake(*run, cwd=workdir)
    assert second.returncode == 0, second.stderr
    assert "Nothing to be done" in second.stdout + second.stderr

    # an evaluation-only key: the sliding-window stride
    cfg = workdir / ".test" / "config.yaml"
    config = yaml.safe_load(cfg.read_text())
    config["datasets"]["ade20k"]["eval"]["stride"] = 32
    cfg.write_text(yaml.safe_dump(config))
    planned = snakemake(*run, "-n", "--quiet", "rules", cwd=workdir)
    assert planned.returncode == 0, planned.stderr
    counts = job_counts(planned.stdout)
    # evaluation (one job: the variant on both conditions; and the analyses that slide the same
    # windows: rank, qualitative), then the report
    assert counts["evaluate"] == 1 and set(counts) <= {"evaluate", "rank", "qualitative", "report_inputs", "report",
                                                     "all"}, counts
    third = snakemake(*run, cwd=workdir)
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]
    assert model.stat().st_mtime_ns == trained
    with csv.open() as f:
        assert [row["stride"] for row in DictReader(f)] == ["32", "32"]
    fourth = snakemake(*run, cwd=workdir)
    assert "Nothing to be done" in fourth.stdout + fourth.stderr

    # a corruption severity: its corrupted set, its evaluation and the report; no training job
    config = yaml.safe_load(cfg.read_text())
    config["study"]["severities"] = [2]
    cfg.write_text(yaml.safe_dump(config))
    planned = snakemake(*run, "-n", "--quiet", "rules", cwd=workdir)
    assert planned.returncode == 0, planned.stderr
    counts = job_counts(planned.stdout)
    assert counts["corrupt"] == counts["evaluate"] == counts["report"] == 1, counts
    assert not set(counts) & {"data", "train", "train_policy", "prune", "finetune", "match", "measure"}, counts
    fifth = snakemake(*run, cwd=workdir)
    assert fifth.returncode == 0, fifth.stdout[-3000:] + fifth.stderr[-3000:]
    assert model.stat().st_mtime_ns == trained
    with csv.open() as f:
        assert [(row["corruption"], row["severity"]) for row in DictReader(f)] == [("clean", "0"), ("gaussian_noise", "2")]
    sixth = snakemake(*run, cwd=workdir)
    assert "Nothing to be done" in sixth.stdout + sixth.stderr


# A method defined outside the package: one module (declaration, settings, build, cost, solve),
# joined to a study by the config alone (`plugins` and `study.methods`).
PLUGIN = '''
"""ToMe in the first half of the blocks only: a plug-in method for the end-to-end test."""
from dataclasses import dataclass

from segcompress.methods import Method, Settings, tome


@dataclass(frozen=True)
class EarlySettings(Settings):
    prop_attn: bool = True
    decoder_on_merged: bool = True


METHOD = Method("tome_early", "ToMe (early blocks)", "token", settings=EarlySettings,
                knob_keys=frozenset({"r"}), matched=True)


def _schedule(r, depth):
    return [r] * (depth // 2) + [0] * (depth - depth // 2)


def build(model, knob):
    from segcompress.tokens.tome import ToMe

    settings, rest = METHOD.split_knob(knob)
    return ToMe(list(rest["r"]), model.spec.depth, **settings.to_dict())


def cost(spec, knob, model=None, images=None):
    from segcompress.tokens.cost import Cost
    from segcompress.tokens.tome import tome_gmacs

    return Cost(tome_gmacs(spec, knob))


def solve(problem):
    from segcompress.flops import analytic_gmacs
    from segcompress.tokens.match import finish
    from segcompress.tokens.tome import tome_gmacs

    spec, base = problem.spec, METHOD.parse_settings(problem.settings).to_dict()
    knobs = [{"r": _schedule(r, spec.depth), **base} for r in range(spec.grid[0] * spec.grid[1] // 2 + 1)]
    costs = [tome_gmacs(spec, k) for k in knobs]
    best = min(range(len(knobs)), key=lambda i: abs(costs[i] - problem.target))
    return finish(METHOD.name, knobs[best], problem, costs[best], analytic_gmacs(spec), (min(costs), max(costs)))
'''


@pytest.mark.slow
def test_slow_every_method_end_to_end(workdir: Path) -> None:
    """Every rule once (every built-in method and a plug-in at one target, clean images): the
    commands fit the rules, and a method defined in a module outside the package runs through
    match, evaluation and the report with no other edit than the config."""
    from segcompress.methods import names

    (workdir / "plugins").mkdir()
    (workdir / "plugins" / "tome_early.py").write_text(PLUGIN)
    methods = [*names(), "tome_early"]
    layer = workdir / "plugin.yaml"
    layer.write_text(yaml.safe_dump({"plugins": ["plugins/tome_early.py"], "study": {"methods": methods}}))
    result = snakemake("--configfile", ".test/config-all-methods.yaml", str(layer), "--cores", "2", cwd=workdir,
                       timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    with (workdir / "results" / "benchmark.csv").open() as f:
        rows = list(DictReader(f))
    assert sorted(r["method"] for r in rows) == sorted(["dense_control", *methods])
    for r in rows:
        assert r["miou"] and r["corruption"] == "clean" and r["dataset"] == "ade20k"
        assert float(r["miou_ci_low"]) <= float(r["miou"]) <= float(r["miou_ci_high"]), r
        assert r["segcompress_version"] and r["settings_hash"] and r["source_revision"], r
        if r["method"] not in ("dense", "dense_control"):
            assert float(r["target_fraction"]) == 0.9 and float(r["achieved_gflops"]) > 0, r
    # equal budgets: the dense control trained as long after the dense model as the pruned models
    # (pruning 2 x 1 iterations, then 2 of fine-tuning); token methods off the shelf (the default)
    budget = {r["method"]: int(r["post_train_iters"]) for r in rows}
    assert budget["dense_control"] == budget["nvit"] == budget["nvit_tome"] == 4
    assert budget["dense"] == budget["tome"] == budget["tofu"] == budget["algm"] == budget["cts"] == budget["dtop"] == 0
    assert budget["tome_early"] == 0
    early = next(r for r in rows if r["method"] == "tome_early")
    assert early["knob"] and abs(float(early["achieved_fraction"]) - 0.9) < 0.05, early
    assert "ToMe (early blocks)" in (workdir / "results" / "tables" / "summary.md").read_text()
    from segcompress.models.checkpoint import read_metadata

    models = workdir / "models" / "ade20k" / "vit_micro" / "seed0"
    assert int(read_metadata(models / "dense-ft.safetensors")["iters"]) == 4  # what really ran
    assert int(read_metadata(models / "nvit-0.9-ft.safetensors")["iters"]) == 2  # after 2 while pruning
    assert (workdir / "results" / "tables" / "verdict.md").is_file()
    # DToP cannot reach 0.9 of dense on the micro model (its heads cost more than the micro
    # encoder saves): the end of the run says so, in one line. CTS, with the config's narrower
    # policy net, reaches it
    assert "1 FLOPs target(s) not reached" in result.stdout
    assert "ade20k / vit_micro / DToP: target 0.9 of dense not reached" in result.stdout
    cts = next(r for r in rows if r["method"] == "cts")
    assert cts["target_reached"] == "true" and abs(float(cts["achieved_fraction"]) - 0.9) <= 0.009, cts


@pytest.mark.slow
def test_slow_dtop_heads_trained_then_fine_tuned_with_the_model(workdir: Path) -> None:
    """DToP with finetune.token_methods: its heads train once on the dense model (phase A), then
    each point fine-tunes model and heads with the exits on (phase B), and evaluation reads the
    fine-tuned heads through the knob that names them."""
    layer = workdir / "dtop.yaml"
    layer.write_text(yaml.safe_dump({"study": {"methods": ["dense", "dtop"]}, "finetune": {"token_methods": True},
                                     "analysis": {"throughput": {"enabled": False}}, "report": {"qualitative": {"images": 0}}}))
    result = snakemake("--configfile", ".test/config-all-methods.yaml", str(layer), "--cores", "2", cwd=workdir,
                       timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    models, matches = workdir / "models/ade20k/vit_micro/seed0", workdir / "matches/ade20k/vit_micro/seed0"
    assert (models / "dtop-policy.safetensors").is_file() and (matches / "dtop-0.9.json").is_file()
    tuned = json.loads((matches / "dtop-0.9-ft.json").read_text())
    assert tuned["knob"]["policy_file"] == "models/ade20k/vit_micro/seed0/dtop-0.9-ft.policy.safetensors"
    assert tuned["policy_finetuned"] and (models / "dtop-0.9-ft.policy.safetensors").is_file()
    with (workdir / "results" / "benchmark.csv").open() as f:
        rows = {r["method"]: r for r in DictReader(f)}
    assert sorted(rows) == ["dense", "dense_control", "dtop"]
    assert int(rows["dtop"]["post_train_iters"]) == int(rows["dense_control"]["post_train_iters"]) == 2
    assert "dtop-0.9-ft.policy.safetensors" in rows["dtop"]["knob"]
