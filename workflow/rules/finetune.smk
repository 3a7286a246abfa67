# Phase finetune: recover accuracy after compression. Pruned models (finetune.pruned) and, if
# finetune.token_methods, every token-compressed point with its method attached; the dense
# model is the distillation teacher. Writes models/.../<stem>-ft.safetensors (the bare model;
# the method is attached again at evaluation).


rule finetune:
    input:
        unpack(finetune_inputs),
    output:
        model="models/{ds}/{arch}/seed{seed}/{stem}-ft.safetensors",
        spec="models/{ds}/{arch}/seed{seed}/{stem}-ft.json",
    params:
        layout=lookup(dpath="datasets/{ds}/layout", within=config),
        root=input_dir("manifest"),
        crop=lookup(dpath="datasets/{ds}/crop", within=config),
        data=training_data,
        recipe=finetune_recipe,
        method=finetune_method_options,
    log:
        "logs/finetune/{ds}/{arch}/seed{seed}/{stem}-ft.log",
    benchmark:
        "results/jobs/finetune/{ds}/{arch}/seed{seed}/{stem}-ft.tsv"
    conda:
        CONDA_ENV
    threads: 4
    resources:
        gpu=1,
    shell:
        "segcompress finetune --model {input.model} {params.method} --teacher {input.teacher}"
        " --layout {params.layout} --root {params.root} --crop {params.crop}"
        " {params.data} --recipe {params.recipe:q} --seed {wildcards.seed}"
        " --threads {threads} --out {output.model} > {log} 2>&1"
