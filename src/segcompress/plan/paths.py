"""Where the study's files live (docs/contracts.md): a model and everything derived from it sits
under its training seed. Pure functions of the identity; no config."""

from __future__ import annotations

MODEL_DIR = "models/{ds}/{arch}/seed{seed}"
MATCH_DIR = "matches/{ds}/{arch}/seed{seed}"
REPORT_INPUTS = "results/report-inputs.json"

#: What the report rule writes.
REPORT_OUTPUTS = {
    "csv": "results/benchmark.csv",
    "per_image": "results/benchmark.per_image.jsonl",  # each row's per-image class areas (intervals)
    "png": "results/figures/miou_vs_gflops.png",
    "pdf": "results/figures/miou_vs_gflops.pdf",
    "erank_png": "results/figures/erank_vs_gflops.png",
    "erank_pdf": "results/figures/erank_vs_gflops.pdf",
    "heatmap_png": "results/figures/corruption_heatmap.png",
    "heatmap_pdf": "results/figures/corruption_heatmap.pdf",
    "summary": "results/tables/summary.md",
    "tex": "results/tables/summary.tex",
    "table_csv": "results/tables/summary.csv",
    "per_corruption": "results/tables/per_corruption.csv",
    "verdict": "results/tables/verdict.md",
    "verdict_csv": "results/tables/verdict.csv",
    "dense_classes": "results/tables/dense_classes.md",
    "dense_classes_csv": "results/tables/dense_classes.csv",
    "html": "results/report.html",
    # written beside the CSV by the report verb (segcompress.summary): DVC's metrics and plots
    "metrics": "results/metrics",  # one JSON file per point (a folder: see report_outputs)
    "curves": "results/curves.csv",
}

#: output key of the report rule -> (caption file in workflow/report/, category of `snakemake --report`)
REPORT_CAPTIONS = {
    "png": ("miou_vs_gflops.rst", "1. Figures"),
    "erank_png": ("erank_vs_gflops.rst", "1. Figures"),
    "heatmap_png": ("corruption_heatmap.rst", "1. Figures"),
    "table_csv": ("summary.rst", "2. Tables"),
    "verdict_csv": ("verdict.rst", "2. Tables"),
    "per_corruption": ("per_corruption.rst", "2. Tables"),
    "dense_classes_csv": ("dense_classes.rst", "2. Tables"),
    "csv": ("benchmark.rst", "2. Tables"),
    "html": ("report_page.rst", "4. Report page"),
}


def fraction_text(x: float | str) -> str:
    """A FLOPs fraction as it appears in paths and on command lines: 0.5 -> "0.5"."""
    return f"{round(float(x), 4):g}"


def dataset_manifest(ds: str) -> str:
    return f"data/{ds}/manifest.json"


def corrupt_manifest(ds: str, corruption: str, severity: int | str) -> str:
    return f"data/{ds}-c/{corruption}/{severity}/manifest.json"


def model_path(ds: str, arch: str, seed: str | int, name: str) -> str:
    return f"{MODEL_DIR.format(ds=ds, arch=arch, seed=seed)}/{name}.safetensors"


def match_path(ds: str, arch: str, seed: str | int, method: str, target: float | str) -> str:
    return f"{MATCH_DIR.format(ds=ds, arch=arch, seed=seed)}/{method}-{fraction_text(target)}.json"


def dense_flops_path(ds: str, arch: str, seed: str | int) -> str:
    """GFLOPs and parameters of the dense model (`segcompress flops`)."""
    return f"{MATCH_DIR.format(ds=ds, arch=arch, seed=seed)}/dense.json"


def prune_report_path(ds: str, arch: str, seed: str | int, fraction: float | str, pruner: str = "nvit") -> str:
    """What `segcompress prune` reports beside a pruned model: target and achieved GFLOPs."""
    return f"{MODEL_DIR.format(ds=ds, arch=arch, seed=seed)}/{pruner}-{fraction_text(fraction)}.report.json"


def policy_path(ds: str, arch: str, seed: str | int, method: str) -> str:
    """The policy of token method ``method`` (CTS's policy net, DToP's heads) trained on a dense model."""
    return model_path(ds, arch, seed, f"{method}-policy")


def finetuned_policy_paths(ds: str, arch: str, seed: str | int, stem: str) -> tuple[str, str]:
    """(policy, match file) that fine-tuning ``stem`` with a method whose policy trains with the
    model writes beside the fine-tuned model (``segcompress finetune --policy-out/--match-out``)."""
    return (model_path(ds, arch, seed, f"{stem}-ft.policy"),
            f"{MATCH_DIR.format(ds=ds, arch=arch, seed=seed)}/{stem}-ft.json")


def row_path(ds: str, arch: str, variant: str, corruption: str, severity: int | str) -> str:
    return f"results/raw/{ds}/{arch}/{variant}/{corruption}/{severity}.json"


def rank_row_path(ds: str, arch: str, variant: str, corruption: str, severity: int | str) -> str:
    return f"results/raw_rank/{ds}/{arch}/{variant}/{corruption}/{severity}.json"


def bench_row_path(ds: str, arch: str, variant: str) -> str:
    return f"results/raw_bench/{ds}/{arch}/{variant}.json"


def qualitative_path(ds: str, arch: str) -> str:
    return f"results/figures/qualitative/{ds}/{arch}.png"
