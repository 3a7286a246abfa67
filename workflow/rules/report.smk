# Phase report: results/benchmark.csv (long format: one row per variant and condition, with the
# analyse phase's throughput and effective rank joined on as columns), then the tables
# (md, tex, csv), the figures (Fig. 2 accuracy vs GFLOPs, Fig. 4 effective rank, the
# per-corruption heatmap) and results/report.html, derived from the CSV alone; the page links the
# qualitative panels of the analyse phase. Only the rows of the configured grid are read.


rule report:
    input:
        rows=evaluate_targets(),
        rank=rank_targets(),
        bench=bench_targets(),
        qualitative=qualitative_targets(),
    output:
        **REPORT_OUTPUTS,
    params:
        figures=output_dir("png"),
        tables=output_dir("summary"),
        options=report_options,
        config=report_config,
    log:
        "logs/report/report.log",
    benchmark:
        "results/jobs/report/report.tsv"
    conda:
        CONDA_ENV
    threads: 1
    shell:
        "segcompress report {input.rows} --rank {input.rank} --bench {input.bench}"
        " --qualitative {input.qualitative} --csv {output.csv} --figures {params.figures}"
        " --tables {params.tables} --html {output.html} --config-json {params.config:q}"
        " {params.options} > {log} 2>&1"
