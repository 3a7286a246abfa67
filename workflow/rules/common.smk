# Helpers shared by the rule modules. The grid of the study, output paths, wildcard constraints,
# and the functions that turn config entries into command-line options.
#
# Only functions and constants live here (no rules), as Snakemake's linter asks.
#
# Rerun policy (documented in README.md): every config value a job uses is one of its params, so
# editing a config key reruns exactly the jobs that read it (Snakemake's params trigger); the
# shell command text is tracked by the code trigger. The library under src/ is NOT declared as
# an input: editing segcompress's code does not rerun finished jobs (declaring it would rerun
# every training job on any edit). After a library change, force the rules it affects, e.g.
# `snakemake --cores all --forcerun evaluate`.

import json
import os
import re
import shlex
import sys
from pathlib import Path
from types import SimpleNamespace

from snakemake.exceptions import WorkflowError

from segcompress.forkserver import start as start_fork_server
from segcompress.corrupt import CATEGORY_OF  # corruption -> category, the corruption stage's table
from segcompress import methods as registry

# Every segcompress job logs its own command line first (segcompress.cli), so the job's log keeps
# it even when the console omits the job blocks (`make run` passes --quiet rules).
os.environ.update(SEGCOMPRESS_LOG_COMMAND="1")


def print_failed_logs(snakemake_logs, out=sys.stderr):
    """Print the log of every job that failed, found in Snakemake's own logs `snakemake_logs` by the
    `> {log} 2>&1` of its command. Under `--quiet rules` (make run) Snakemake prints neither the
    failed job's block nor its log (show-failed-logs); without it, the logs already printed are skipped."""
    paths = [snakemake_logs] if isinstance(snakemake_logs, (str, Path)) else list(snakemake_logs or [])
    text = "".join(Path(p).read_text(errors="replace") for p in paths if Path(p).is_file())
    for job_log in dict.fromkeys(re.findall(r"> (\S+) 2>&1' returned non-zero exit status", text)):
        if f"Logfile {job_log}:" in text or not Path(job_log).is_file():
            continue
        lines = Path(job_log).read_text(errors="replace").splitlines()
        head = f"Log of the failed job, {job_log} (last {min(len(lines), 40)} lines):"
        print(head, *lines[-40:], sep="\n  ", file=out)


onerror:
    print_failed_logs(log)


# A local run forks its jobs from one process that imported torch, mmseg and the rest once
# (segcompress.forkserver: ~4 s less per job, the same results); a job started before it is
# ready, or on a cluster node, runs in its own process. SEGCOMPRESS_FORK_SERVER=0 turns it off.
onstart:
    if workflow.local_exec:
        _server = start_fork_server()
        if _server:
            os.environ.update(SEGCOMPRESS_FORK_SERVER=_server)

# Rules call the `segcompress` command. Make the one installed beside this Snakemake (the
# project's .venv) callable without activating the venv; under --sdm conda the rule's own
# environment comes first on PATH.
_bin = str(Path(sys.executable).parent)
if _bin not in os.environ.get("PATH", "").split(os.pathsep):
    os.environ.update(PATH=os.pathsep.join([_bin, os.environ.get("PATH", "")]))

# The conda environment of every rule (--sdm conda), relative to the rule files.
CONDA_ENV = "../../envs/segcompress.yaml"

STUDY = config["study"]
FINETUNE = config["finetune"]

# Methods defined outside the package (config `plugins`: module names or .py paths) join the
# registry here and in every job (segcompress.methods reads SEGCOMPRESS_PLUGINS).
if config.get("plugins"):
    os.environ[registry.PLUGINS_ENV] = ",".join(str(p) for p in config["plugins"])
    registry.reload()
# The methods a study can name (segcompress.methods, dense first): token methods act on the dense
# model, matched ones get their knob from `segcompress match`, pruned ones train while pruning.
STUDY_METHODS = registry.names()
MATCHED_METHODS = registry.names(matched=True)
PRUNED_METHODS = registry.names(pruned=True)
# The dense model trained for the same post-compression budget as the compressed variants
# (finetune.dense_control): a reference beside the dense model, not a compression method.
DENSE_CONTROL = "dense_control"
REFERENCES = ("dense", DENSE_CONTROL)


def _check_names(kind, names, defined, key=None):
    unknown = [n for n in names if n not in defined]
    if unknown:
        raise WorkflowError(
            f"config: {key or f'study.{kind}'} names {', '.join(unknown)}, not defined under `{kind}:` "
            f"(defined: {', '.join(defined) or 'none'})"
        )


_check_names("methods", STUDY["methods"], STUDY_METHODS)
_check_names("methods", config["methods"], STUDY_METHODS, key="methods")


def method_settings(name):
    """methods.<name> of the config, checked by the method's settings dataclass, as a dict (its
    defaults filled in): what `segcompress match` gets with --settings."""
    try:
        return registry.get(name).parse_settings(config["methods"].get(name)).to_dict()
    except ValueError as e:
        raise WorkflowError(f"config: {e}") from None


for _name in STUDY["methods"]:
    method_settings(_name)
_check_names("datasets", STUDY["datasets"], config["datasets"])
_check_names("backbones", STUDY["backbones"], config["backbones"])
if config["analysis"]["effective_rank"]["datasets"]:
    _check_names("datasets", config["analysis"]["effective_rank"]["datasets"], config["datasets"],
                 key="analysis.effective_rank.datasets")
_DENSE_CHECKPOINTS = config["train"].get("dense_checkpoints") or {}
_check_names("datasets", _DENSE_CHECKPOINTS, config["datasets"], key="train.dense_checkpoints")
for _ds, _paths in _DENSE_CHECKPOINTS.items():
    _check_names("backbones", _paths, config["backbones"], key=f"train.dense_checkpoints.{_ds}")


def _check_windows():
    """Crops, strides and patches that cannot work, refused when the config is read (not after
    training): a crop not a multiple of a backbone's patch, a stride outside 1..crop."""
    for ds in STUDY["datasets"]:
        d = config["datasets"][ds]
        crop, stride = d["crop"], d["eval"]["stride"]
        for arch in STUDY["backbones"]:
            patch = config["backbones"][arch].get("patch_size")
            if patch and crop % patch:
                raise WorkflowError(
                    f"config: datasets.{ds}.crop {crop} is not a multiple of backbones.{arch}.patch_size "
                    f"{patch}; use a crop of {max(patch, crop // patch * patch)}"
                )
        if stride is not None and not 1 <= stride <= crop:
            raise WorkflowError(
                f"config: datasets.{ds}.eval.stride {stride} must be between 1 and the crop ({crop}); "
                "windows would skip pixels (null: crop - 32)"
            )


_check_windows()
if config["flops"]["per"] != "crop":
    raise WorkflowError("config: flops.per: image is not implemented yet; use crop (the anchors' convention)")


def _alternation(names):
    return "|".join(re.escape(str(n)) for n in names)


FRACTION_RE = r"[0-9]*\.?[0-9]+"
SEED_RE = r"[0-9]+"
VARIANT_RE = rf"(?:{_alternation(REFERENCES)})-seed{SEED_RE}|(?:{_alternation(STUDY_METHODS[1:])})-{FRACTION_RE}-seed{SEED_RE}"

STEM_RE = rf"dense|nvit-{FRACTION_RE}|(?:{_alternation(MATCHED_METHODS)})-{FRACTION_RE}"


wildcard_constraints:
    ds=_alternation(config["datasets"]),
    arch=_alternation(config["backbones"]),
    seed=SEED_RE,
    fraction=FRACTION_RE,
    target=FRACTION_RE,
    method=_alternation(MATCHED_METHODS),
    corruption=_alternation(["clean", *CATEGORY_OF]),
    severity="[0-5]",
    variant=VARIANT_RE,
    stem=STEM_RE,


# ----------------------------------------------------------------------------------- numbers


def fraction_text(x):
    """A FLOPs fraction as it appears in paths and on command lines: 0.5 -> "0.5"."""
    return f"{round(float(x), 4):g}"


def prune_fraction(target):
    """Pruning target of prune-then-merge at FLOPs `target`: target**prune_share of dense."""
    return fraction_text(registry.get("nvit_tome").parse_settings(config["methods"].get("nvit_tome")).prune_fraction(target))


def parse_variant(variant):
    """`tome-0.5-seed0` -> ("tome", "0.5", "0"); `dense-seed0` -> ("dense", None, "0")."""
    stem, seed = variant.rsplit("-seed", 1)
    if stem in REFERENCES:
        return stem, None, seed
    method, target = stem.rsplit("-", 1)
    return method, target, seed


def variant_name(method, target, seed):
    if method in REFERENCES:
        return f"{method}-seed{seed}"
    return f"{method}-{fraction_text(target)}-seed{seed}"


# ------------------------------------------------------------------------------------- paths
# docs/contracts.md; a model and everything derived from it sits under its training seed.

MODEL_DIR = "models/{ds}/{arch}/seed{seed}"
MATCH_DIR = "matches/{ds}/{arch}/seed{seed}"


def dataset_manifest(ds):
    return f"data/{ds}/manifest.json"


def corrupt_manifest(ds, corruption, severity):
    return f"data/{ds}-c/{corruption}/{severity}/manifest.json"


def model_path(ds, arch, seed, name):
    return f"{MODEL_DIR.format(ds=ds, arch=arch, seed=seed)}/{name}.safetensors"


def match_path(ds, arch, seed, method, target):
    return f"{MATCH_DIR.format(ds=ds, arch=arch, seed=seed)}/{method}-{fraction_text(target)}.json"


def dense_flops_path(ds, arch, seed):
    """GFLOPs and parameters of the dense model (`segcompress flops`)."""
    return f"{MATCH_DIR.format(ds=ds, arch=arch, seed=seed)}/dense.json"


def prune_report_path(ds, arch, seed, fraction):
    """What `segcompress prune` reports beside a pruned model: target and achieved GFLOPs."""
    return f"{MODEL_DIR.format(ds=ds, arch=arch, seed=seed)}/nvit-{fraction_text(fraction)}.report.json"


def row_path(ds, arch, variant, corruption, severity):
    return f"results/raw/{ds}/{arch}/{variant}/{corruption}/{severity}.json"


def pruned_model(ds, arch, seed, fraction):
    """The pruned model at `fraction` as later stages use it (fine-tuned unless finetune.pruned is false)."""
    name = f"nvit-{fraction_text(fraction)}"
    return model_path(ds, arch, seed, f"{name}-ft" if FINETUNE["pruned"] else name)


def merge_base(ds, arch, seed, target):
    """The pruned model prune-then-merge attaches ToMe to at `target`: the raw pruned model when it
    is fine-tuned with ToMe attached (finetune.token_methods), else the pruned model as NViT uses it."""
    fraction = prune_fraction(target)
    if FINETUNE["token_methods"]:
        return model_path(ds, arch, seed, f"nvit-{fraction}")
    return pruned_model(ds, arch, seed, fraction)


# -------------------------------------------------------------------------------- the grid


def _grid():
    for ds in STUDY["datasets"]:
        for arch in STUDY["backbones"]:
            for seed in STUDY["seeds"]:
                yield ds, arch, seed


def _compressed(methods):
    """(method, target) pairs of the study for the given methods."""
    return [(m, t) for m in STUDY["methods"] if m in methods for t in STUDY["targets"]]


# ------------------------------------------------------------- post-compression training budget
# Every variant trained after compression gets the same number of training iterations on top of
# the dense model: NViT trains while it prunes (methods.nvit steps x interval) and is then
# fine-tuned for finetune.recipe.iters; the dense control and every fine-tuned token method get
# those two numbers together, in one fine-tuning run with the same recipe and distillation.
# Prune-then-merge fine-tunes its raw pruned model with ToMe attached (finetune.token_methods) or
# merges the fine-tuned pruned model off the shelf: the same total either way.


def pruning_iters():
    """Training iterations of one NViT pruning run (0 when the study prunes nothing)."""
    if not _compressed(PRUNED_METHODS):
        return 0
    nvit = config["methods"]["nvit"]
    return int(nvit["steps"]) * int(nvit["interval"])


def post_train_iters(method):
    """Training iterations a variant of `method` gets after the dense model (0: off the shelf)."""
    tuned = FINETUNE["recipe"]["iters"]
    if method == "dense":
        return 0
    if method == DENSE_CONTROL:
        return pruning_iters() + tuned
    if method == "nvit":
        return pruning_iters() + (tuned if FINETUNE["pruned"] else 0)
    if method == "nvit_tome":
        return pruning_iters() + (tuned if FINETUNE["pruned"] or FINETUNE["token_methods"] else 0)
    return pruning_iters() + tuned if FINETUNE["token_methods"] else 0


def finetune_recipe(wildcards):
    """Params function: finetune.recipe as JSON, its iterations topped up so that the model ends
    with its method's post-compression budget (a pruned model has already trained while pruning)."""
    method = wildcards.stem.rsplit("-", 1)[0]
    method = DENSE_CONTROL if method == "dense" else method
    already = pruning_iters() if method in PRUNED_METHODS else 0
    recipe = {**FINETUNE["recipe"], "iters": post_train_iters(method) - already}
    return json.dumps(recipe, sort_keys=True, separators=(",", ":"))


def severities_of(corruption):
    """Severities of `corruption`: its category's study.category_severities entry, else study.severities."""
    by_category = STUDY.get("category_severities") or {}
    return by_category.get(CATEGORY_OF[corruption], STUDY["severities"])


def conditions():
    """(corruption, severity) pairs evaluated for every variant; clean first."""
    return [("clean", 0)] + [(c, s) for c in STUDY["corruptions"] for s in severities_of(c)]


def variants(seed):
    out = [variant_name("dense", None, seed)] if "dense" in STUDY["methods"] else []
    if FINETUNE["dense_control"]:
        out.append(variant_name(DENSE_CONTROL, None, seed))
    return out + [variant_name(m, t, seed) for m, t in _compressed(STUDY_METHODS[1:])]


def data_targets():
    return [dataset_manifest(ds) for ds in STUDY["datasets"]]


def corrupt_targets():
    return [
        corrupt_manifest(ds, c, s)
        for ds in STUDY["datasets"]
        for c, s in conditions()
        if c != "clean"
    ]


def train_targets():
    out = []
    for ds, arch, seed in _grid():
        out.append(model_path(ds, arch, seed, "dense"))
        if any(registry.get(m).needs_policy for m in STUDY["methods"]):
            out.append(model_path(ds, arch, seed, "cts-policy"))
    return out


def prune_fractions():
    """Every pruning target the study needs: NViT's own, and prune-then-merge's first step."""
    fractions = {fraction_text(t) for m, t in _compressed(("nvit",))}
    fractions |= {prune_fraction(t) for m, t in _compressed(("nvit_tome",))}
    return sorted(fractions, key=float, reverse=True)


def prune_targets():
    return [
        model_path(ds, arch, seed, f"nvit-{f}")
        for ds, arch, seed in _grid()
        for f in prune_fractions()
    ]


def match_targets():
    out = []
    for ds, arch, seed in _grid():
        if "dense" in STUDY["methods"]:
            out.append(dense_flops_path(ds, arch, seed))
        out += [match_path(ds, arch, seed, m, t) for m, t in _compressed(MATCHED_METHODS)]
    return out


def finetune_targets():
    out = []
    for ds, arch, seed in _grid():
        if FINETUNE["dense_control"]:
            out.append(model_path(ds, arch, seed, "dense-ft"))
        if FINETUNE["pruned"]:  # prune-then-merge fine-tunes its own pruned models with ToMe attached
            fractions = [fraction_text(t) for m, t in _compressed(("nvit",))]
            if not FINETUNE["token_methods"]:
                fractions += [prune_fraction(t) for m, t in _compressed(("nvit_tome",))]
            out += [pruned_model(ds, arch, seed, f) for f in sorted(set(fractions), key=float, reverse=True)]
        if FINETUNE["token_methods"]:
            out += [
                model_path(ds, arch, seed, f"{m}-{fraction_text(t)}-ft")
                for m, t in _compressed(MATCHED_METHODS)
            ]
    return out


def evaluate_targets():
    return [
        row_path(ds, arch, v, c, s)
        for ds, arch, seed in _grid()
        for v in variants(seed)
        for c, s in conditions()
    ]


# ---------------------------------------------------------------------------- analyse phase
# Effective rank (one row per variant, seed and ranked condition), throughput (one row per
# variant) and the qualitative panels (one per dataset and backbone). Rank and throughput rows are
# joined onto benchmark.csv as columns by the report; they never add rows to it.

RANK = config["analysis"]["effective_rank"]
THROUGHPUT = config["analysis"]["throughput"]
QUALITATIVE = config["report"]["qualitative"]


def rank_datasets():
    """Study datasets the effective rank is taken on: analysis.effective_rank.datasets (null: all)
    that the study has; others are skipped, so one setting fits every study."""
    names = RANK["datasets"]
    return list(STUDY["datasets"]) if names is None else [d for d in STUDY["datasets"] if d in names]


def rank_conditions():
    """(corruption, severity) pairs ranked: clean, then the configured corruptions and severities
    among the evaluated ones (a rank row is joined onto the evaluated row of its condition)."""
    wanted = RANK["corruptions"]
    out = [("clean", 0)]
    for c in STUDY["corruptions"]:
        if wanted is None or c in wanted:
            out += [(c, s) for s in severities_of(c) if RANK["severities"] is None or s in RANK["severities"]]
    return out


def rank_row_path(ds, arch, variant, corruption, severity):
    return f"results/raw_rank/{ds}/{arch}/{variant}/{corruption}/{severity}.json"


def rank_targets():
    return [
        rank_row_path(ds, arch, v, c, s)
        for ds, arch, seed in _grid()
        if ds in rank_datasets()
        for v in variants(seed)
        for c, s in rank_conditions()
    ]


def bench_row_path(ds, arch, variant):
    return f"results/raw_bench/{ds}/{arch}/{variant}.json"


def bench_targets():
    if not THROUGHPUT["enabled"]:
        return []
    return [bench_row_path(ds, arch, v) for ds, arch, seed in _grid() for v in variants(seed)]


def bench_outputs():
    """Output patterns of a bench job: the row of every variant of one dataset, backbone and seed
    (they are timed one after another in one process)."""
    return [bench_row_path("{ds}", "{arch}", v) for v in variants("{seed}")]


def qualitative_path(ds, arch):
    return f"results/figures/qualitative/{ds}/{arch}.png"


def qualitative_targets():
    if QUALITATIVE["images"] == 0:
        return []
    return [qualitative_path(ds, arch) for ds in STUDY["datasets"] for arch in STUDY["backbones"]]


def analyse_targets():
    return rank_targets() + bench_targets() + qualitative_targets()


REPORT_OUTPUTS = {
    "csv": "results/benchmark.csv",
    "per_image": "results/benchmark.per_image.jsonl",  # each row's per-image class areas (intervals)
    "png": "results/figures/miou_vs_gflops.png",
    "pdf": "results/figures/miou_vs_gflops.pdf",
    "erank_png": "results/figures/erank_vs_gflops.png",
    "erank_pdf": "results/figures/erank_vs_gflops.pdf",
    "heatmap_png": "results/figures/corruption_heatmap.png",
    "heatmap_pdf": "results/figures/corruption_heatmap.pdf",
    "summary": "results/tables/summary.md",
    "tex": "results/tables/summary.tex",
    "table_csv": "results/tables/summary.csv",
    "per_corruption": "results/tables/per_corruption.csv",
    "verdict": "results/tables/verdict.md",
    "verdict_csv": "results/tables/verdict.csv",
    "dense_classes": "results/tables/dense_classes.md",
    "dense_classes_csv": "results/tables/dense_classes.csv",
    "html": "results/report.html",
    # written beside the CSV by the report verb (segcompress.summary): DVC's metrics and plots
    "metrics": "results/metrics",  # one JSON file per point (a folder: see report_outputs)
    "curves": "results/curves.csv",
}

# output key of the report rule -> (caption file in workflow/report/, category of `snakemake --report`)
REPORT_CAPTIONS = {
    "png": ("miou_vs_gflops.rst", "1. Figures"),
    "erank_png": ("erank_vs_gflops.rst", "1. Figures"),
    "heatmap_png": ("corruption_heatmap.rst", "1. Figures"),
    "table_csv": ("summary.rst", "2. Tables"),
    "verdict_csv": ("verdict.rst", "2. Tables"),
    "per_corruption": ("per_corruption.rst", "2. Tables"),
    "dense_classes_csv": ("dense_classes.rst", "2. Tables"),
    "csv": ("benchmark.rst", "2. Tables"),
    "html": ("report_page.rst", "4. Report page"),
}


def report_outputs():
    """REPORT_OUTPUTS with the figures and tables flagged for `snakemake --report` (same paths)."""
    outputs = dict(REPORT_OUTPUTS, metrics=directory(REPORT_OUTPUTS["metrics"]))
    for key, (caption, category) in REPORT_CAPTIONS.items():
        outputs[key] = report(outputs[key], caption=f"../report/{caption}", category=category)
    return outputs


# ------------------------------------------------------------------- inputs of the rules


def dense_checkpoint(wildcards):
    """The configured dense checkpoint of (dataset, backbone) that replaces training, or None."""
    return _DENSE_CHECKPOINTS.get(wildcards.ds, {}).get(wildcards.arch)


def train_inputs(wildcards):
    """The dataset manifest, and the dense checkpoint (with its spec) when one is configured."""
    inputs = {"manifest": f"data/{wildcards.ds}/manifest.json"}
    adopted = dense_checkpoint(wildcards)
    if adopted is not None:
        inputs.update(adopted=adopted, adopted_spec=str(Path(adopted).with_suffix(".json")))
    return inputs


def adopt_option(wildcards, input):
    """` --from-checkpoint CKPT` when a dense checkpoint replaces training, else nothing."""
    return f" --from-checkpoint {input.adopted}" if "adopted" in input.keys() else ""


def policy_of(wildcards):
    return model_path(wildcards.ds, wildcards.arch, wildcards.seed, "cts-policy")


def match_inputs(wildcards):
    """What solving `method` at `target` reads: the model it acts on, the dense reference, data."""
    ds, arch, seed = wildcards.ds, wildcards.arch, wildcards.seed
    dense = model_path(ds, arch, seed, "dense")
    inputs = {"dense": dense, "manifest": dataset_manifest(ds), "model": dense}
    method = registry.get(wildcards.method)
    if method.pruned:
        inputs["model"] = merge_base(ds, arch, seed, wildcards.target)
    if method.needs_policy:
        inputs["policy"] = policy_of(wildcards)
    return inputs


def finetune_inputs(wildcards):
    """What fine-tuning `stem` (dense: the dense control; nvit-F; or <token method>-T) reads."""
    ds, arch, seed = wildcards.ds, wildcards.arch, wildcards.seed
    dense = model_path(ds, arch, seed, "dense")
    inputs = {"teacher": dense, "manifest": dataset_manifest(ds)}
    if wildcards.stem == "dense":
        inputs["model"] = dense
        return inputs
    method, target = wildcards.stem.rsplit("-", 1)
    if method == "nvit":
        inputs["model"] = model_path(ds, arch, seed, wildcards.stem)
        return inputs
    inputs["match"] = match_path(ds, arch, seed, method, target)
    if method == "nvit_tome":
        inputs["model"] = merge_base(ds, arch, seed, target)
    else:
        inputs["model"] = dense
    if registry.get(method).needs_policy:
        inputs["policy"] = policy_of(wildcards)
    return inputs


def variant_model(ds, arch, variant):
    """The checkpoint a variant is evaluated with."""
    method, target, seed = parse_variant(variant)
    if method == "dense":
        return model_path(ds, arch, seed, "dense")
    if method == DENSE_CONTROL:
        return model_path(ds, arch, seed, "dense-ft")
    if method == "nvit":
        return pruned_model(ds, arch, seed, target)
    if FINETUNE["token_methods"]:
        return model_path(ds, arch, seed, f"{method}-{fraction_text(target)}-ft")
    if method == "nvit_tome":
        return merge_base(ds, arch, seed, target)
    return model_path(ds, arch, seed, "dense")


def variant_inputs(wildcards):
    """A variant's checkpoint, its match (or GFLOPs) file, the CTS policy, the dataset manifest."""
    ds, arch = wildcards.ds, wildcards.arch
    method, target, seed = parse_variant(wildcards.variant)
    inputs = {"model": variant_model(ds, arch, wildcards.variant), "manifest": dataset_manifest(ds)}
    if method in REFERENCES:
        inputs["match"] = dense_flops_path(ds, arch, seed)
    elif method == "nvit":
        inputs["match"] = prune_report_path(ds, arch, seed, target)
    else:
        inputs["match"] = match_path(ds, arch, seed, method, target)
    if method not in REFERENCES and registry.get(method).needs_policy:
        inputs["policy"] = model_path(ds, arch, seed, "cts-policy")
    return inputs


# Evaluation and rank jobs: one per variant (every condition in one process) or, with
# study.jobs_per: condition, one per variant and condition (wildcards corruption and severity).
PER_CONDITION = STUDY["jobs_per"] == "condition"


def _job_conditions(wildcards, conds):
    """The (corruption, severity) pairs one job runs: its own, or all of `conds`."""
    if PER_CONDITION:
        if wildcards.corruption == "clean" and wildcards.severity != "0":
            raise WorkflowError(f"clean images have severity 0, not {wildcards.severity}")
        return [(wildcards.corruption, int(wildcards.severity))]
    return conds


def _corrupted_manifests(wildcards, conds):
    return [corrupt_manifest(wildcards.ds, c, s) for c, s in _job_conditions(wildcards, conds) if c != "clean"]


def evaluate_inputs(wildcards):
    """A variant's inputs and the corrupted sets of the job's evaluated conditions."""
    return {**variant_inputs(wildcards), "images": _corrupted_manifests(wildcards, conditions())}


def rank_inputs(wildcards):
    """A variant's inputs, the corrupted sets of the job's ranked conditions, and the dense model
    (its width normalises every variant's effective rank alike)."""
    return {**variant_inputs(wildcards), "images": _corrupted_manifests(wildcards, rank_conditions()),
            "reference": model_path(wildcards.ds, wildcards.arch, parse_variant(wildcards.variant)[2], "dense")}


def _condition_options(wildcards, conds, paths):
    """--condition options: one per (corruption, severity), with its image folder and output."""
    out = []
    for (c, s), path in zip(_job_conditions(wildcards, conds), paths):
        img_root = "-" if c == "clean" else str(Path(corrupt_manifest(wildcards.ds, c, s)).parent)
        out.append(f"--condition {c} {s} {shlex.quote(img_root)} {shlex.quote(str(path))}")
    return " ".join(out)


def eval_conditions(wildcards, output):
    """Params function: `segcompress evaluate` --condition options for the job's conditions."""
    return _condition_options(wildcards, conditions(), output.rows)


def rank_condition_options(wildcards, output):
    """Params function: `segcompress rank` --condition options for the job's conditions."""
    return _condition_options(wildcards, rank_conditions(), output.rows)


def condition_paths(folder, conds):
    """Output patterns of one job's rows under `folder`: one per condition of `conds`, or the
    pattern of a single condition when jobs are cut per condition."""
    if PER_CONDITION:
        return [f"{folder}/{{ds}}/{{arch}}/{{variant}}/{{corruption}}/{{severity}}.json"]
    return [f"{folder}/{{ds}}/{{arch}}/{{variant}}/{c}/{s}.json" for c, s in conds]


def job_name(prefix, suffix):
    """Log or benchmark path of an evaluate or rank job (per variant, or per condition)."""
    if PER_CONDITION:
        return f"{prefix}/{{ds}}/{{arch}}/{{variant}}/{{corruption}}-{{severity}}{suffix}"
    return f"{prefix}/{{ds}}/{{arch}}/{{variant}}{suffix}"


def indexed_variant_inputs(ds, arch, names):
    """Inputs of a job running several variants: model<i> and match<i> of the i-th of `names`, the
    CTS policy, the dataset manifest."""
    inputs = {"manifest": dataset_manifest(ds)}
    for i, variant in enumerate(names):
        for key, path in variant_inputs(SimpleNamespace(ds=ds, arch=arch, variant=variant)).items():
            if key in ("model", "match"):
                inputs[f"{key}{i}"] = path
            elif key == "policy":
                inputs["policy"] = path
    return inputs


def bench_inputs(wildcards):
    """What timing every variant of a seed reads: each checkpoint and match file (as evaluate), the
    CTS policy, a val image."""
    return indexed_variant_inputs(wildcards.ds, wildcards.arch, variants(wildcards.seed))


def qualitative_variants():
    """(column title, variant) of a panel: dense and every method at its most aggressive target,
    first seed."""
    seed, low = STUDY["seeds"][0], min(STUDY["targets"])
    return [
        (m if m == "dense" else f"{m} {fraction_text(low)}", variant_name(m, low, seed))
        for m in STUDY["methods"]
    ]


def qualitative_inputs(wildcards):
    """Every panel column's checkpoint, match file (and CTS policy), the dataset, the image set."""
    inputs = indexed_variant_inputs(wildcards.ds, wildcards.arch, [v for _title, v in qualitative_variants()])
    if QUALITATIVE["corruption"] is not None:
        inputs["images"] = corrupt_manifest(wildcards.ds, QUALITATIVE["corruption"], QUALITATIVE["severity"])
    return inputs


# ------------------------------------------------------ params: config -> command-line text


def input_dir(name):
    """Params function: the folder holding input file `name` (e.g. a dataset root)."""

    def folder(wildcards, input):
        return str(Path(input[name]).parent)

    return folder


def output_dir(name):
    """Params function: the folder holding output file `name`."""

    def folder(wildcards, output):
        return str(Path(output[name]).parent)

    return folder


def corrupted_sets_dir(wildcards, output):
    """Params function: data/<ds>-c, the root of a dataset's corrupted sets."""
    return str(Path(output.manifest).parents[2])


def config_json(dpath):
    """Params function: the config entry at `dpath` (may hold wildcards) as compact JSON."""

    def as_json(wildcards):
        value = lookup(dpath=dpath.format(**wildcards), within=config)
        return json.dumps(value, sort_keys=True, separators=(",", ":"))

    return as_json


def data_options(wildcards):
    """Generate the synthetic dataset; or, for a real one, prepare it (Cityscapes trainIds) and verify."""
    syn = config["datasets"][wildcards.ds].get("synthetic")
    if syn is None:
        return "--prepare"
    return f"--synthetic --num-train {syn['num_train']} --num-val {syn['num_val']} --seed {syn['seed']}"


def _dataset(wildcards):
    return config["datasets"][wildcards.ds]


def training_data(wildcards):
    """Params function: the training verbs' data options (resize scale, colour augmentation)."""
    ds = _dataset(wildcards)
    scale = " ".join(map(str, ds["img_scale"]))
    return f"--img-scale {scale}" + ("" if ds["photometric"] else " --no-photometric")


def eval_img_scale(wildcards):
    scale = _dataset(wildcards)["eval"]["img_scale"] or _dataset(wildcards)["img_scale"]
    return " ".join(map(str, scale))


def eval_stride(wildcards):
    stride = _dataset(wildcards)["eval"]["stride"]
    return "" if stride is None else f"--stride {stride}"


def eval_max_images(wildcards):
    n = _dataset(wildcards)["eval"]["max_images"]
    return "" if n is None else f"--max-images {n}"


def report_options(wildcards):
    opts = config["report"]
    out = []
    if opts["corrupted_categories"]:
        out.append("--corrupted-categories " + " ".join(opts["corrupted_categories"]))
    if opts["corrupted_severities"]:
        out.append("--corrupted-severities " + " ".join(map(str, opts["corrupted_severities"])))
    out.append(f"--heatmap {opts['heatmap']}")
    return " ".join(out)


def report_config():
    """The config the report page describes (its header and open-question choices)."""
    sub = {k: config[k] for k in ("study", "finetune", "flops", "matching", "methods", "report", "analysis")}
    sub["datasets"] = {ds: {"eval": config["datasets"][ds]["eval"]} for ds in STUDY["datasets"]}
    return sub


def print_unreached(csv):
    """One line per FLOPs target not reached in the table `csv` (nothing when it does not exist)."""
    if not Path(csv).is_file():
        return
    from segcompress.report.aggregate import read_benchmark, unreached_points

    lines = unreached_points(read_benchmark(csv))
    if lines:
        print(f"{len(lines)} FLOPs target(s) not reached (flagged in the tables and figures):")
        for line in lines:
            print(f"  {line}")


REPORT_INPUTS = "results/report-inputs.json"


def report_inputs():
    """What `segcompress report --inputs` reads: the rows of the configured grid and the config (a
    file, so that no command line runs to kilobytes)."""
    return {"rows": evaluate_targets(), "rank": rank_targets(), "bench": bench_targets(),
            "qualitative": qualitative_targets(), "config": report_config()}


def applied_method(variant):
    """The token method a variant's checkpoint runs with: a pruned model runs as it is (dense),
    prune-then-merge is ToMe on the pruned model."""
    method = parse_variant(variant)[0]
    return "dense" if method in REFERENCES else registry.get(method).applied


def _variant_tags(ds, arch, variant):
    """Identity columns of a variant (no condition): what rank and bench rows are joined on."""
    method, target, seed = parse_variant(variant)
    tags = {"dataset": ds, "backbone": arch, "variant": variant, "method": method, "seed": seed,
            "post_train_iters": post_train_iters(method)}
    if target is not None:
        tags["target_fraction"] = target
    return tags


def variant_tags(wildcards):
    """--tag options naming a variant (no condition)."""
    tags = _variant_tags(wildcards.ds, wildcards.arch, wildcards.variant)
    return " ".join(f"--tag {k}={v}" for k, v in tags.items())


def rank_options(wildcards):
    """`segcompress rank` settings from analysis.effective_rank; the images: its max_images, else
    the dataset's eval.max_images."""
    opts = [
        f"--feature {RANK['feature']}",
        "--centre" if RANK["centre"] else "--no-centre",
        f"--normalise {RANK['normalise']}",
        f"--windows {RANK['windows']}",
    ]
    n = RANK["max_images"] if RANK["max_images"] is not None else _dataset(wildcards)["eval"]["max_images"]
    if n is not None:
        opts.append(f"--max-images {n}")
    return " ".join(opts)


def bench_options(wildcards, input, output):
    """`segcompress bench` settings: one --variant per variant of the seed (row, checkpoint,
    applied method, match file, identity tags), analysis.throughput, and the first val image as the
    input (input-dependent methods, ALGM and CTS, need a real image; every variant gets the same one)."""
    t = THROUGHPUT
    opts = []
    for i, v in enumerate(variants(wildcards.seed)):
        tags = ",".join(f"{k}={x}" for k, x in _variant_tags(wildcards.ds, wildcards.arch, v).items())
        opts.append(f"--variant {output[i]} {input[f'model{i}']} {applied_method(v)} {input[f'match{i}']} {tags}")
    opts.append(
        f"--batch {t['batch']} --warmup {t['warmup']} --repeats {t['repeats']}"
        f" --calib-root {Path(input.manifest).parent} --calib-layout {_dataset(wildcards)['layout']}"
        " --calib-images 1"
    )
    return " ".join(opts)


def qualitative_options(wildcards, input):
    """The --variant columns (title, checkpoint, applied method, match file) and the image set."""
    opts = [
        f"--variant {shlex.quote(title)} {input[f'model{i}']} {applied_method(variant)} {input[f'match{i}']}"
        for i, (title, variant) in enumerate(qualitative_variants())
    ]
    if QUALITATIVE["corruption"] is not None:
        opts.append(f"--img-root {Path(input.images).parent}")
    q = QUALITATIVE
    opts += [f"--images {q['images']}", f"--zoom {q['zoom']}"]
    return " ".join(opts)


def eval_method_options(wildcards, input):
    """--method/--match of a variant for `segcompress evaluate`.

    The match file holds the knob (with the method's settings, and CTS's policy network) and the
    GFLOPs columns of the row: a `match` result, the `prune` report of a pruned model, or the
    `flops` result of the dense model.
    A pruned model is evaluated as it is (`--method dense`); its row is tagged method=nvit.
    """
    return f"--method {applied_method(wildcards.variant)} --match {input.match}"


# ---------------------------------------------------------------------------------------------
# Method settings as command-line options: the one place to adjust when a verb's flags change.


def finetune_method_options(wildcards, input):
    """--method/--knob of the model being fine-tuned (finetune.token_methods): the method its
    variant is evaluated with, and the knob of its match file."""
    method = wildcards.stem.rsplit("-", 1)[0]
    applied = "dense" if method in REFERENCES else registry.get(method).applied
    return "--method dense" if applied == "dense" else f"--method {applied} --knob {input.match}"


def match_options(wildcards, input):
    """`segcompress match` options beyond --target-fraction/--model/--out: the method it solves
    (prune-then-merge: ToMe on the pruned model) with its settings (methods.<name>) as JSON."""
    method = registry.get(registry.get(wildcards.method).applied)
    settings = json.dumps(method_settings(method.name), sort_keys=True, separators=(",", ":"))
    opts = [
        f"--method {method.name}",
        f"--settings {shlex.quote(settings)}",
        f"--reference-model {input.dense}",
        f"--calib-root {Path(input.manifest).parent}",
        f"--calib-layout {_dataset(wildcards)['layout']}",
        f"--calib-images {config['matching']['calibration_images']}",
        f"--tolerance {config['matching']['tolerance']}",
        f"--flops-per {config['flops']['per']}",
    ]
    if method.needs_policy:
        opts.append(f"--policy {input.policy}")
    return " ".join(opts)
