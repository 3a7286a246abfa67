# Phase report: results/benchmark.csv (long format: one row per variant and condition, with the
# analyse phase's throughput and effective rank joined on as columns), then the tables
# (md, tex, csv; the verdict per FLOPs target; the dense model's per-class IoU), the figures
# (Fig. 2 accuracy vs GFLOPs, Fig. 4 effective rank, the per-corruption heatmap) and
# results/report.html, derived from the CSV alone; the page links the qualitative panels of the
# analyse phase. Only the rows of the configured grid are read: their paths and the config go to
# the report in one file (report_inputs), so the printed command stays one short line.


rule report_inputs:
    output:
        REPORT_INPUTS,
    params:
        inputs=report_inputs(),
    log:
        "logs/report/report_inputs.log",
    # ready at the start but needed only at the end: after the data jobs, not beside them (a run:
    # job holds a core for ~8 s, which would delay the dense trainings that every stage waits for)
    priority: -1
    run:
        from segcompress.io import write_json

        write_json(output[0], params.inputs)


# `snakemake --report report.html` (after a run): the workflow's description, then the figures and
# tables of REPORT_CAPTIONS (segcompress.plan.paths) with their captions from workflow/report/, and the
# qualitative panels (analyse.smk).
report: "../report/workflow.rst"


rule report:
    input:
        inputs=REPORT_INPUTS,
        rows=evaluate_targets(),
        rank=rank_targets(),
        bench=bench_targets(),
        qualitative=qualitative_targets(),
    output:
        **report_outputs(),
    params:
        figures=output_dir("png"),
        tables=output_dir("summary"),
        options=report_options,
    log:
        "logs/report/report.log",
    benchmark:
        "results/jobs/report/report.tsv"
    conda:
        CONDA_ENV
    threads: 1
    shell:
        "segcompress report --inputs {input.inputs} --csv {output.csv} --figures {params.figures}"
        " --tables {params.tables} --html {output.html} {params.options} > {log} 2>&1"
