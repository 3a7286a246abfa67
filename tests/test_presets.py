"""The paper-scale presets (workflow/presets/*.yaml) plan the full study.

Each preset is layered over config.yaml, validated, and dry-run in a copy of the workflow whose
data/<dataset>/ is a stand-in for the real dataset (its layout's folders and a manifest, as the
data stage leaves them), so no data job is planned and every other job of the study is: the
counts by rule are checked against the study's grid and, for the grid the presets ship, against
literal numbers (16 corruptions x 5 severities; 31 variants; 2,511 evaluations).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from project_copy import copy_paths, merge_config
from test_workflow import ROOT, WORKFLOW_FILES, default_config, job_counts, snakemake

PRESETS = ROOT / "workflow" / "presets"
LAYOUT_DIRS = {
    "ade20k": ["images/training", "images/validation", "annotations/training", "annotations/validation"],
    "cityscapes": ["leftImg8bit/train", "leftImg8bit/val", "gtFine/train", "gtFine/val"],
}


def merged(preset: str) -> dict:
    """config.yaml with the preset layered over it, as Snakemake merges a --configfile."""
    return merge_config(default_config(), yaml.safe_load((PRESETS / f"{preset}.yaml").read_text()))


@pytest.mark.parametrize("preset", ["ade20k", "cityscapes"])
def test_preset_is_paper_scale_and_valid(preset: str) -> None:
    from snakemake.utils import validate

    config = merged(preset)
    validate(copy.deepcopy(config), str(ROOT / "workflow" / "schemas" / "config.schema.yaml"))
    study = config["study"]
    (ds,) = study["datasets"]
    data = config["datasets"][ds]
    assert data["synthetic"] is None and data["layout"] == preset
    assert (data["crop"], data["img_scale"], data["eval"]["stride"]) == {
        "ade20k": (512, [2048, 512], 480), "cityscapes": (768, [2048, 1024], 736)}[preset]
    (bb,) = study["backbones"]
    assert config["backbones"][bb] == {"timm_name": "vit_small_patch16_384", "pretrained": "timm",
                                       "drop_path_rate": 0.1}
    for size in ("tiny", "base", "large"):  # the other sizes are listed
        assert any(b.get("timm_name") == f"vit_{size}_patch16_384" for b in config["backbones"].values())
    recipe = config["train"]["recipe"]
    assert (recipe["iters"], recipe["batch_size"], recipe["lr"]) == {
        "ade20k": (160000, 8, 1e-3), "cityscapes": (80000, 8, 1e-2)}[preset]
    assert (recipe["momentum"], recipe["weight_decay"], recipe["poly_power"], recipe["min_lr"]) == (0.9, 0, 0.9, 1e-5)
    assert (recipe["optimizer"], recipe["warmup_iters"], recipe["loss_stride"]) == ("sgd", 0, 1)  # Segmenter's
    assert data["photometric"] is True  # Segmenter's augmentation, not the synthetic study's switch
    assert study["methods"] == ["dense", "tome", "tofu", "algm", "cts", "dtop", "nvit", "depgraph", "nvit_tome"]
    assert config["methods"]["dtop"]["policy"]["iters"] == 40000  # the heads: the reference's pruning phase
    # CTS's policy as the reference's: ImageNet efficientnet_lite0 itself, not the default study's narrower net
    cts_policy = config["methods"]["cts"]["policy"]
    assert (cts_policy["pretrained"], cts_policy["channel_multiplier"], cts_policy["iters"]) == ("timm", 1.0, 50000)
    assert study["targets"] == [0.9, 0.75, 0.6, 0.5, 0.4, 0.3]
    assert len(study["corruptions"]) == 16 and study["severities"] == [1, 2, 3, 4, 5]


@pytest.fixture
def stand_in(tmp_path: Path) -> Path:
    """A copy of the workflow with data/<dataset>/ laid out as a prepared real dataset."""
    copy_paths(WORKFLOW_FILES, ROOT, tmp_path)
    for ds, dirs in LAYOUT_DIRS.items():
        for d in dirs:
            (tmp_path / "data" / ds / d).mkdir(parents=True)
        (tmp_path / "data" / ds / "manifest.json").write_text('{"stand_in": true}\n')
    return tmp_path


@pytest.mark.parametrize("preset", ["ade20k", "cityscapes"])
def test_preset_dry_run_lists_the_full_study(preset: str, stand_in: Path) -> None:
    result = snakemake("-n", "--quiet", "rules", "--configfile", f"workflow/presets/{preset}.yaml",
                       cwd=stand_in, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    counts = job_counts(result.stdout)
    config = merged(preset)
    study = config["study"]
    conditions = 1 + len(study["corruptions"]) * len(study["severities"])
    variants = 2 + (len(study["methods"]) - 1) * len(study["targets"])  # dense, dense control, the grid
    share = config["methods"]["nvit_tome"]["prune_share"]
    prunes = len({round(t, 4) for t in study["targets"]} | {round(t ** share, 4) for t in study["targets"]})
    expected = {
        "corrupt": 16 * 5,  # the full ADE20K-C / Cityscapes-C protocol
        "train": 1,
        "train_policy": 2,  # CTS's policy net, DToP's heads
        # NViT's targets and prune-then-merge's sqrt(target), DepGraph's targets
        "prune": prunes + len(study["targets"]),
        # equal budgets: the dense control, NViT's and DepGraph's pruned models, every
        # token-compressed point (prune-then-merge fine-tunes its raw pruned model with ToMe attached)
        "finetune": 1 + 2 * len(study["targets"]) + 5 * len(study["targets"]),
        "finetune_with_policy": len(study["targets"]),  # DToP: model and heads
        "measure": 1,
        "match": 6 * len(study["targets"]),  # tome, tofu, algm, cts, dtop, nvit_tome
        "evaluate": variants * conditions,  # study.jobs_per: condition in the presets
        "report": 1,
    }
    assert config["finetune"]["token_methods"] and config["finetune"]["dense_control"]
    assert expected["evaluate"] == 50 * 81 == 4050 and expected["prune"] == 18
    for rule, n in expected.items():
        assert counts.get(rule) == n, (rule, counts)
    assert "data" not in counts  # the stand-in is a prepared dataset
    # phase analyse: throughput of every variant (one job); effective rank (Fig. 4) on ADE20K's clean images
    assert counts.get("bench") == 1  # every variant timed in one job
    assert counts.get("rank", 0) == (variants if preset == "ade20k" else 0)


def test_category_severities_override_the_severities_of_a_category(tmp_path: Path) -> None:
    """SegFormer's protocol: noise at 3 severities, the other corruptions at 5."""
    layer = tmp_path / "segformer.yaml"
    layer.write_text(yaml.safe_dump({"study": {
        "datasets": ["ade20k"], "corruptions": ["gaussian_noise", "shot_noise", "fog"],
        "severities": [1, 2, 3, 4, 5], "category_severities": {"noise": [1, 2, 3]}}}))
    result = snakemake("phase_corrupt", "-n", "--forceall", "--quiet", "rules", "--configfile", str(layer))
    assert result.returncode == 0, result.stderr
    assert job_counts(result.stdout)["corrupt"] == 2 * 3 + 1 * 5
