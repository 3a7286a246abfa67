# Phase match: solve each token method's knob for each FLOPs target (a fraction of the dense
# model's GFLOPs): ToMe r, ALGM threshold, CTS shared superpatches; for prune-then-merge, ToMe's r
# on the pruned model. Writes matches/<ds>/<arch>/seed<S>/<method>-<target>.json, which also
# carries the method's settings in the knob and the target and achieved GFLOPs.


rule match:
    input:
        unpack(match_inputs),
    output:
        match="matches/{ds}/{arch}/seed{seed}/{method}-{target}.json",
    params:
        options=match_options,
    log:
        "logs/match/{ds}/{arch}/seed{seed}/{method}-{target}.log",
    benchmark:
        "results/jobs/match/{ds}/{arch}/seed{seed}/{method}-{target}.tsv"
    conda:
        CONDA_ENV
    threads: 1
    resources:
        gpu=1,
    shell:
        "segcompress match --target-fraction {wildcards.target} --model {input.model} {params.options}"
        " --seed {wildcards.seed} --threads {threads} --out {output.match} > {log} 2>&1"


# GFLOPs and parameters of the dense model, by the same counter.
rule measure:
    input:
        model="models/{ds}/{arch}/seed{seed}/dense.safetensors",
    output:
        flops="matches/{ds}/{arch}/seed{seed}/dense.json",
    log:
        "logs/match/{ds}/{arch}/seed{seed}/dense.log",
    benchmark:
        "results/jobs/match/{ds}/{arch}/seed{seed}/dense.tsv"
    conda:
        CONDA_ENV
    threads: 1
    shell:
        "segcompress flops --model {input.model} --out {output.flops} > {log} 2>&1"
