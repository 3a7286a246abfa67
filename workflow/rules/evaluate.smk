# Phase evaluate: sliding-window mIoU of every variant on clean and corrupted val images, one
# raw row each: results/raw/<ds>/<arch>/<variant>/<corruption>/<severity>.json (clean/0.json).
# Variants: dense-seed<S>, <method>-<target>-seed<S>.


rule evaluate:
    input:
        unpack(evaluate_inputs),
    output:
        row="results/raw/{ds}/{arch}/{variant}/{corruption}/{severity}.json",
    params:
        method=eval_method_options,
        layout=lookup(dpath="datasets/{ds}/layout", within=config),
        root=input_dir("manifest"),
        img_root=eval_img_root,
        crop=lookup(dpath="datasets/{ds}/crop", within=config),
        stride=eval_stride,
        img_scale=eval_img_scale,
        max_images=eval_max_images,
        tags=eval_tags,
    log:
        "logs/evaluate/{ds}/{arch}/{variant}/{corruption}-{severity}.log",
    benchmark:
        "results/jobs/evaluate/{ds}/{arch}/{variant}/{corruption}-{severity}.tsv"
    conda:
        CONDA_ENV
    threads: 1
    resources:
        gpu=1,
    shell:
        "segcompress evaluate --model {input.model} {params.method} --layout {params.layout}"
        " --root {params.root} {params.img_root} --split val --crop {params.crop}"
        " {params.stride} --img-scale {params.img_scale} {params.max_images}"
        " {params.tags} --no-progress --out {output.row} > {log} 2>&1"
