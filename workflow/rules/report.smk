# Phase report: results/benchmark.csv (long format), the summary table and the first figure,
# derived from the raw rows of the configured grid only.


rule report:
    input:
        rows=evaluate_targets(),
    output:
        **REPORT_OUTPUTS,
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
        "segcompress report {input.rows} --csv {output.csv} --figures {params.figures}"
        " --tables {params.tables} {params.options} > {log} 2>&1"
