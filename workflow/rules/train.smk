# Phase train: the dense Segmenter of each (dataset, backbone, seed), and the policies of the token
# methods that decide with one (CTS's policy net, DToP's heads) trained on it. Training resumes
# from models/.../dense.safetensors.resume/ when rerun.
#
# Several GPUs: a train job given gpu=N > 1 (`set-resources: train: gpu: N` in a profile, as in
# profiles/slurm/) runs N processes, one per GPU, under
# `torchrun --standalone --nproc_per_node N -m segcompress train ...`; with gpu=1 (the default)
# it is the plain `segcompress train ...`. The recipe's batch_size is the world batch, split over
# the processes, so the GPU count changes the speed, not the recipe; and since resources are not
# params, moving to more GPUs does not rerun a finished training.
#
# Released weights: `train.dense_checkpoints: {<dataset>: {<backbone>: path}}` in the config makes
# this rule adopt that checkpoint (checked against the dataset's classes and crop and the backbone's
# widths, then copied) instead of training; every seed then starts from it (README.md).


rule train:
    input:
        unpack(train_inputs),
    output:
        model="models/{ds}/{arch}/seed{seed}/dense.safetensors",
        spec="models/{ds}/{arch}/seed{seed}/dense.json",
    params:
        layout=lookup(dpath="datasets/{ds}/layout", within=config),
        root=input_dir("manifest"),
        crop=lookup(dpath="datasets/{ds}/crop", within=config),
        data=training_data,
        arch=config_json("backbones/{arch}"),
        recipe=config_json("train/recipe"),
        adopt=adopt_option,
    log:
        "logs/train/{ds}/{arch}/seed{seed}/dense.log",
    benchmark:
        "results/jobs/train/{ds}/{arch}/seed{seed}/dense.tsv"
    conda:
        CONDA_ENV
    threads: 4
    resources:
        gpu=1,
    shell:
        "$([ {resources.gpu} -gt 1 ] && echo torchrun --standalone --nproc_per_node {resources.gpu} -m)"
        " segcompress train --layout {params.layout} --root {params.root} --crop {params.crop}"
        " {params.data} --arch {params.arch:q} --recipe {params.recipe:q}"
        " --seed {wildcards.seed} --threads {threads} --out {output.model}{params.adopt} > {log} 2>&1"


rule train_policy:
    input:
        manifest="data/{ds}/manifest.json",
        model="models/{ds}/{arch}/seed{seed}/dense.safetensors",
    output:
        policy=policy_path("{ds}", "{arch}", "{seed}", "{method}"),
    wildcard_constraints:
        method=_POLICIES,
    params:
        layout=lookup(dpath="datasets/{ds}/layout", within=config),
        root=input_dir("manifest"),
        data=training_data,
        settings=policy_settings,
    log:
        policy_path("{ds}", "{arch}", "{seed}", "{method}").replace("models/", "logs/train/").replace(".safetensors", ".log"),
    benchmark:
        policy_path("{ds}", "{arch}", "{seed}", "{method}").replace("models/", "results/jobs/train/").replace(".safetensors", ".tsv")
    conda:
        CONDA_ENV
    threads: 4
    resources:
        gpu=1,
    shell:
        "segcompress policy --method {wildcards.method} --model {input.model} --layout {params.layout}"
        " --root {params.root} {params.data} --settings {params.settings:q} --seed {wildcards.seed}"
        " --threads {threads} --out {output.policy} > {log} 2>&1"
