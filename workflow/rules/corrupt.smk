# Phase corrupt: one seeded corrupted copy of the val images per (corruption, severity),
# data/<ds>-c/<corruption>/<severity>/ (labels stay in the clean dataset).


rule corrupt:
    input:
        manifest="data/{ds}/manifest.json",
    output:
        manifest="data/{ds}-c/{corruption}/{severity}/manifest.json",
    params:
        layout=lookup(dpath="datasets/{ds}/layout", within=config),
        seed=lookup(dpath="corrupt/seed", within=config),
        root=input_dir("manifest"),
        out=corrupted_sets_dir,
    log:
        "logs/corrupt/{ds}/{corruption}-{severity}.log",
    benchmark:
        "results/jobs/corrupt/{ds}/{corruption}-{severity}.tsv"
    conda:
        CONDA_ENV
    threads: 1
    shell:
        "segcompress corrupt --layout {params.layout} --root {params.root} --out {params.out}"
        " --dataset-name {wildcards.ds} --corruption {wildcards.corruption}"
        " --severity {wildcards.severity} --seed {params.seed} --processes {threads}"
        " > {log} 2>&1"
