# Phase analyse: what the report needs beyond mIoU (config: analysis, report.qualitative).
#   rank         normalised effective rank of the restored encoder features, per variant, seed and
#                ranked condition (one job per variant): results/raw_rank/<ds>/<arch>/<variant>/<corruption>/<severity>.json
#   bench        images/s of every variant of a dataset, backbone and seed, timed in one job (one
#                process start, speed-ups from the same run): results/raw_bench/<ds>/<arch>/<variant>.json
#   qualitative  Fig. 3 panel per dataset and backbone: results/figures/qualitative/<ds>/<arch>.png
# Rank and bench rows are joined onto benchmark.csv as columns (erank_*, images_per_s, speedup);
# they never add rows to it. Rank uses the evaluation's windows (crop, stride, img_scale), so it
# reruns with them.


rule rank:
    input:
        unpack(rank_inputs),
    output:
        rows=condition_paths("results/raw_rank", rank_conditions()),
    params:
        method=eval_method_options,
        layout=lookup(dpath="datasets/{ds}/layout", within=config),
        root=input_dir("manifest"),
        conditions=rank_condition_options,
        crop=lookup(dpath="datasets/{ds}/crop", within=config),
        stride=eval_stride,
        img_scale=eval_img_scale,
        tags=variant_tags,
        options=rank_options,
    log:
        job_name("logs/rank", ".log"),
    benchmark:
        job_name("results/jobs/analyse/rank", ".tsv")
    conda:
        CONDA_ENV
    threads: 1
    resources:
        gpu=1,
    shell:
        "segcompress rank --model {input.model} {params.method} --layout {params.layout}"
        " --root {params.root} {params.conditions} --split val --crop {params.crop}"
        " {params.stride} --img-scale {params.img_scale} {params.options} --reference-model {input.reference}"
        " {params.tags} > {log} 2>&1"


rule bench:
    input:
        unpack(bench_inputs),
    output:
        bench_outputs(),
    params:
        options=bench_options,
        torch_threads=THROUGHPUT["threads"],
    log:
        "logs/bench/{ds}/{arch}/seed{seed}.log",
    benchmark:
        "results/jobs/analyse/bench/{ds}/{arch}/seed{seed}.tsv"
    conda:
        CONDA_ENV
    # Every core Snakemake was given (--cores), so that no other job runs beside the timing: a job
    # beside it shares the cores and the memory bandwidth and moves images/s by 2x. The timing itself
    # uses analysis.throughput.threads (--threads). On SLURM the profile asks for a node of its own.
    threads: workflow.cores
    resources:
        gpu=1,
    shell:
        "segcompress bench {params.options} --threads {params.torch_threads} > {log} 2>&1"


rule qualitative:
    input:
        unpack(qualitative_inputs),
    output:
        png=report(
            "results/figures/qualitative/{ds}/{arch}.png",
            caption="../report/qualitative.rst",
            category="3. Qualitative panels",
            subcategory="{ds}",
            labels={"dataset": "{ds}", "backbone": "{arch}"},
        ),
    params:
        options=qualitative_options,
        layout=lookup(dpath="datasets/{ds}/layout", within=config),
        root=input_dir("manifest"),
        stride=eval_stride,
        img_scale=eval_img_scale,
    log:
        "logs/qualitative/{ds}/{arch}.log",
    benchmark:
        "results/jobs/analyse/qualitative/{ds}/{arch}.tsv"
    conda:
        CONDA_ENV
    threads: 1
    resources:
        gpu=1,
    shell:
        "segcompress qualitative {params.options} --layout {params.layout} --root {params.root}"
        " {params.stride} --img-scale {params.img_scale} --title '{wildcards.ds} / {wildcards.arch}'"
        " --out {output.png} > {log} 2>&1"
