# Phase prune: structural pruning of the dense model to a FLOPs fraction by each structural method
# of the study (pruner: nvit, depgraph), for its own targets, and by NViT for prune-then-merge's
# first step (target**methods.nvit_tome.prune_share). Writes the smaller model, its spec, and a
# report with its target and achieved GFLOPs.


rule prune:
    input:
        manifest="data/{ds}/manifest.json",
        model="models/{ds}/{arch}/seed{seed}/dense.safetensors",
    output:
        model="models/{ds}/{arch}/seed{seed}/{pruner}-{fraction}.safetensors",
        spec="models/{ds}/{arch}/seed{seed}/{pruner}-{fraction}.json",
        report="models/{ds}/{arch}/seed{seed}/{pruner}-{fraction}.report.json",
    params:
        layout=lookup(dpath="datasets/{ds}/layout", within=config),
        root=input_dir("manifest"),
        data=training_data,
        settings=pruner_settings,
    log:
        "logs/prune/{ds}/{arch}/seed{seed}/{pruner}-{fraction}.log",
    benchmark:
        "results/jobs/prune/{ds}/{arch}/seed{seed}/{pruner}-{fraction}.tsv"
    conda:
        CONDA_ENV
    threads: 4
    resources:
        gpu=1,
    shell:
        "segcompress prune --method {wildcards.pruner} --model {input.model} --target-fraction {wildcards.fraction}"
        " --layout {params.layout} --root {params.root} {params.data}"
        " --config-json {params.settings:q} --seed {wildcards.seed} --threads {threads}"
        " --out {output.model} --report {output.report} > {log} 2>&1"
