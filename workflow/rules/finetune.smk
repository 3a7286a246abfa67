# Phase finetune: recover accuracy after compression. Pruned models (finetune.pruned) and, if
# finetune.token_methods, every token-compressed point with its method attached; the dense
# model is the distillation teacher. Writes models/.../<stem>-ft.safetensors (the bare model;
# the method is attached again at evaluation). A method whose policy trains with the model (DToP's
# heads) also writes the fine-tuned policy and the match file whose knob names it
# (finetune_with_policy).


rule finetune:
    input:
        unpack(finetune_inputs),
    output:
        model="models/{ds}/{arch}/seed{seed}/{stem}-ft.safetensors",
        spec="models/{ds}/{arch}/seed{seed}/{stem}-ft.json",
    wildcard_constraints:
        stem=FINETUNED_STEMS,
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


rule finetune_with_policy:
    input:
        unpack(finetune_inputs),
    output:
        model="models/{ds}/{arch}/seed{seed}/{stem}-ft.safetensors",
        spec="models/{ds}/{arch}/seed{seed}/{stem}-ft.json",
        policy="models/{ds}/{arch}/seed{seed}/{stem}-ft.policy.safetensors",
        match="matches/{ds}/{arch}/seed{seed}/{stem}-ft.json",
    wildcard_constraints:
        stem=FINETUNED_POLICY_STEMS,
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
        " --threads {threads} --policy-out {output.policy} --match-out {output.match}"
        " --out {output.model} > {log} 2>&1"
