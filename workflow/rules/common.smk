# Glue between the config and the rules: the plan of the study (segcompress.plan: variants, jobs,
# files, inputs and command-line options, tested as Python) bound to the names the rules use, the
# wildcard constraints, and the run's start and end hooks. Only functions and constants live here
# (no rules), as Snakemake's linter asks.
#
# Rerun policy (documented in README.md): every config value a job uses is one of its params, so
# editing a config key reruns exactly the jobs that read it (Snakemake's params trigger); the
# shell command text is tracked by the code trigger. The library under src/ is NOT declared as
# an input: editing segcompress's code does not rerun finished jobs (declaring it would rerun
# every training job on any edit). After a library change, force the rules it affects, e.g.
# `snakemake --cores all --forcerun evaluate`.

import os
import re
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError

from segcompress import methods as registry
from segcompress.corrupt import CATEGORY_OF  # corruption -> category, the corruption stage's table
from segcompress.forkserver import start as start_fork_server
from segcompress.plan import DENSE_CONTROL, Plan
from segcompress.plan.console import print_failed_logs, print_unreached
from segcompress.plan.options import adopt_option, corrupted_sets_dir, input_dir, output_dir
from segcompress.plan.paths import REPORT_CAPTIONS, REPORT_INPUTS, REPORT_OUTPUTS, policy_path

# Every segcompress job logs its own command line first (segcompress.cli), so the job's log keeps
# it even when the console omits the job blocks (`make run` passes --quiet rules).
os.environ.update(SEGCOMPRESS_LOG_COMMAND="1")


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

# Methods defined outside the package (config `plugins`: module names or .py paths) join the
# registry here and in every job (segcompress.methods reads SEGCOMPRESS_PLUGINS); a module name
# resolves from the project folder too, in every job.
if config.get("plugins"):
    registry.use_plugins(config["plugins"], workflow.basedir)

try:
    PLAN = Plan(config)
except ValueError as e:
    raise WorkflowError(str(e)) from None

# The names the rules use.
STUDY = config["study"]
THROUGHPUT = PLAN.throughput
conditions, rank_conditions = PLAN.conditions, PLAN.rank_conditions
condition_paths, job_name, config_json = PLAN.condition_paths, PLAN.job_name, PLAN.config_json
# files each phase produces
data_targets, corrupt_targets, train_targets = PLAN.data_targets, PLAN.corrupt_targets, PLAN.train_targets
prune_targets, match_targets, finetune_targets = PLAN.prune_targets, PLAN.match_targets, PLAN.finetune_targets
evaluate_targets, rank_targets, bench_targets = PLAN.evaluate_targets, PLAN.rank_targets, PLAN.bench_targets
qualitative_targets, analyse_targets, bench_outputs = PLAN.qualitative_targets, PLAN.analyse_targets, PLAN.bench_outputs
report_inputs = PLAN.report_inputs
# inputs of the jobs
train_inputs, match_inputs, finetune_inputs = PLAN.train_inputs, PLAN.match_inputs, PLAN.finetune_inputs
evaluate_inputs, rank_inputs, bench_inputs = PLAN.evaluate_inputs, PLAN.rank_inputs, PLAN.bench_inputs
qualitative_inputs = PLAN.qualitative_inputs
# params: the config as command-line options
data_options, training_data, finetune_recipe = PLAN.data_options, PLAN.training_data, PLAN.finetune_recipe
finetune_method_options, match_options, pruner_settings = (PLAN.finetune_method_options, PLAN.match_options,
                                                            PLAN.pruner_settings)
policy_settings = PLAN.policy_settings
eval_img_scale, eval_stride, eval_max_images = PLAN.eval_img_scale, PLAN.eval_stride, PLAN.eval_max_images
eval_conditions, eval_method_options, variant_tags = PLAN.eval_conditions, PLAN.eval_method_options, PLAN.variant_tags
rank_condition_options, rank_options = PLAN.rank_condition_options, PLAN.rank_options
bench_options, qualitative_options, report_options = PLAN.bench_options, PLAN.qualitative_options, PLAN.report_options


def _alternation(names):
    return "|".join(re.escape(str(n)) for n in names)


FRACTION_RE = r"[0-9]*\.?[0-9]+"
SEED_RE = r"[0-9]+"
_REFERENCES = _alternation(["dense", DENSE_CONTROL])
_COMPRESSED = _alternation([m for m in registry.names() if m != "dense"])
_MATCHED = _alternation(registry.names(matched=True))
_PRUNERS = _alternation(registry.names(family="structural"))
_POLICIES = _alternation(registry.names(needs_policy=True))


wildcard_constraints:
    ds=_alternation(config["datasets"]),
    arch=_alternation(config["backbones"]),
    seed=SEED_RE,
    fraction=FRACTION_RE,
    target=FRACTION_RE,
    method=_MATCHED,
    pruner=_PRUNERS,
    corruption=_alternation(["clean", *CATEGORY_OF]),
    severity="[0-5]",
    variant=rf"(?:{_REFERENCES})-seed{SEED_RE}|(?:{_COMPRESSED})-{FRACTION_RE}-seed{SEED_RE}",
    stem=rf"dense|(?:{_PRUNERS}|{_MATCHED})-{FRACTION_RE}",


# fine-tuned models: those of methods whose policy trains with the model come with that policy
_POLICY_TRAINS = _alternation(registry.names(policy_trains=True) or ["(?!)"])
FINETUNED_STEMS = rf"dense|(?:{_PRUNERS}|(?!(?:{_POLICY_TRAINS})-)(?:{_MATCHED}))-{FRACTION_RE}"
FINETUNED_POLICY_STEMS = rf"(?:{_POLICY_TRAINS})-{FRACTION_RE}"

def report_outputs():
    """REPORT_OUTPUTS with the figures and tables flagged for `snakemake --report` (same paths)."""
    outputs = dict(REPORT_OUTPUTS, metrics=directory(REPORT_OUTPUTS["metrics"]))
    for key, (caption, category) in REPORT_CAPTIONS.items():
        outputs[key] = report(outputs[key], caption=f"../report/{caption}", category=category)
    return outputs
