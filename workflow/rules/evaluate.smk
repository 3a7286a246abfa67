# Phase evaluate: sliding-window mIoU of every variant on clean and corrupted val images, one
# raw row each: results/raw/<ds>/<arch>/<variant>/<corruption>/<severity>.json (clean/0.json).
# Variants: dense-seed<S>, <method>-<target>-seed<S>. One job per variant evaluates every
# condition, loading the model once (process start-up costs more than a small evaluation);
# changing the corruption list or severities reruns the variants' evaluations, never training.


rule evaluate:
    input:
        unpack(evaluate_inputs),
    output:
        rows=condition_paths("results/raw", conditions()),
    params:
        method=eval_method_options,
        layout=lookup(dpath="datasets/{ds}/layout", within=config),
        root=input_dir("manifest"),
        conditions=eval_conditions,
        crop=lookup(dpath="datasets/{ds}/crop", within=config),
        stride=eval_stride,
        img_scale=eval_img_scale,
        max_images=eval_max_images,
        tags=variant_tags,
    log:
        job_name("logs/evaluate", ".log"),
    benchmark:
        job_name("results/jobs/evaluate", ".tsv")
    conda:
        CONDA_ENV
    threads: 1
    resources:
        gpu=1,
    shell:
        "segcompress evaluate --model {input.model} {params.method} --layout {params.layout}"
        " --root {params.root} {params.conditions} --split val --crop {params.crop}"
        " {params.stride} --img-scale {params.img_scale} {params.max_images}"
        " {params.tags} > {log} 2>&1"
