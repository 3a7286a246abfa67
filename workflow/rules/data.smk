# Phase data: generate (synthetic) or verify each dataset and write data/<ds>/manifest.json,
# the stage's one output (written last by `segcompress data`).


rule data:
    output:
        manifest="data/{ds}/manifest.json",
    params:
        layout=lookup(dpath="datasets/{ds}/layout", within=config),
        options=data_options,
        root=output_dir("manifest"),
    log:
        "logs/data/{ds}.log",
    benchmark:
        "results/jobs/data/{ds}.tsv"
    conda:
        CONDA_ENV
    threads: 1
    shell:
        "segcompress data --layout {params.layout} --root {params.root} {params.options}"
        " > {log} 2>&1"
