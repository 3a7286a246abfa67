# segcompress: token compression vs structural pruning for ViT segmentation at matched FLOPs.
#
#   make run                              the whole study of config.yaml, with the local defaults
#   snakemake --cores all phase_evaluate
#                                         up to one phase (phase_data ... phase_analyse, phase_report)
#   snakemake --configfile .test/config.yaml --cores 2
#
# Rules live in workflow/rules/<phase>.smk, the plan they call in src/segcompress/plan/ (bound in
# workflow/rules/common.smk), the config schema in workflow/schemas/config.schema.yaml, local
# defaults in profiles/default/ (Snakemake loads them by itself); on a cluster
# `--workflow-profile profiles/slurm` replaces them.
# After a crash or a kill, Snakemake keeps the folder locked: `snakemake --unlock`, then rerun.

from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config.yaml"


validate(config, "workflow/schemas/config.schema.yaml")


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/corrupt.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/prune.smk"
include: "workflow/rules/match.smk"
include: "workflow/rules/finetune.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/analyse.smk"
include: "workflow/rules/report.smk"


localrules:
    all,
    report_inputs,
    phase_data,
    phase_corrupt,
    phase_train,
    phase_prune,
    phase_match,
    phase_finetune,
    phase_evaluate,
    phase_analyse,
    phase_report,


rule all:
    default_target: True
    input:
        REPORT_OUTPUTS.values(),
        analyse_targets(),


rule phase_data:
    input:
        data_targets(),


rule phase_corrupt:
    input:
        corrupt_targets(),


rule phase_train:
    input:
        train_targets(),


rule phase_prune:
    input:
        prune_targets(),


rule phase_match:
    input:
        match_targets(),


rule phase_finetune:
    input:
        finetune_targets(),


rule phase_evaluate:
    input:
        evaluate_targets(),


rule phase_analyse:
    input:
        analyse_targets(),


rule phase_report:
    input:
        REPORT_OUTPUTS.values(),


# The end of a run names every FLOPs target a method could not reach (also flagged in the tables
# and figures), one line each.
onsuccess:
    print_unreached(REPORT_OUTPUTS["csv"])
