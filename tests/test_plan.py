"""The study's plan (segcompress.plan): variants and their identity, equal training budgets, the
files and inputs of each stage, the config checks. In-process, without Snakemake."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from segcompress import methods as registry
from segcompress.plan import Plan, Variant

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ROOT / "workflow" / "schemas" / "config.schema.yaml"


def config(**changes) -> dict:
    """The default config validated by the schema (its defaults filled in), with ``changes``
    (``section=dict``) merged one level deep."""
    from snakemake.utils import validate

    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    for section, values in changes.items():
        cfg[section] = {**cfg.get(section, {}), **values} if isinstance(values, dict) else values
    validate(cfg, str(SCHEMA))
    return copy.deepcopy(cfg)


def w(**kw) -> SimpleNamespace:
    return SimpleNamespace(**kw)


def test_variants_carry_their_identity_and_are_looked_up_not_parsed() -> None:
    plan = Plan(config())
    variants = plan.variants("ade20k", "vit_p8_d12", 0)
    methods = config()["study"]["methods"]
    targets = config()["study"]["targets"]
    assert len(variants) == 2 + (len(methods) - 1) * len(targets)  # dense, dense control, the grid
    v = plan.variant("ade20k", "vit_p8_d12", "nvit_tome-0.35-seed0")
    assert v == Variant("ade20k", "vit_p8_d12", "nvit_tome", "0.35", "0") and v.applied == "tome"
    assert plan.variant("ade20k", "vit_p8_d12", "nvit-0.75-seed0").applied == "dense"
    assert "tome-0.5-seed0" not in [v.name for v in variants]  # 0.5 is not a target of the default,
    # but its files can be asked for by path: the name then gives the identity
    assert plan.variant("ade20k", "vit_p8_d12", "tome-0.5-seed1") == Variant("ade20k", "vit_p8_d12", "tome", "0.5", "1")
    with pytest.raises(ValueError, match="unknown method 'tomee'"):
        plan.variant("ade20k", "vit_p8_d12", "tomee-0.5-seed0")


@pytest.mark.parametrize("token_methods", [False, True])
def test_every_variant_trained_after_compression_gets_the_same_budget(token_methods: bool) -> None:
    plan = Plan(config(finetune={"token_methods": token_methods}))
    nvit = config()["methods"]["nvit"]
    budget = nvit["steps"] * nvit["interval"] + config()["finetune"]["recipe"]["iters"]
    assert plan.post_train_iters("dense") == 0
    for method in ("dense_control", "nvit", "nvit_tome"):
        assert plan.post_train_iters(method) == budget, method
    for method in registry.names(family="token"):
        assert plan.post_train_iters(method) == (budget if token_methods else 0), method
    # what each fine-tuning job runs: the rest of its budget (a pruned model trained while pruning)
    iters = {stem: json.loads(plan.finetune_recipe(w(stem=stem)))["iters"] for stem in ("dense", "nvit-0.75")}
    assert iters == {"dense": budget, "nvit-0.75": budget - nvit["steps"] * nvit["interval"]}


def test_a_second_structural_method_gets_its_own_models_and_the_same_budget() -> None:
    methods = [*config()["study"]["methods"], "depgraph"]
    plan = Plan(config(study={"methods": methods}))
    nvit = config()["methods"]["nvit"]
    budget = nvit["steps"] * nvit["interval"] + config()["finetune"]["recipe"]["iters"]
    assert plan.post_train_iters("depgraph") == plan.post_train_iters("nvit") == budget
    # DepGraph prunes without training: its fine-tuning runs the whole budget
    assert json.loads(plan.finetune_recipe(w(stem="depgraph-0.35")))["iters"] == budget
    assert "models/ade20k/vit_p8_d12/seed0/depgraph-0.35.safetensors" in plan.prune_targets()
    assert "models/ade20k/vit_p8_d12/seed0/depgraph-0.5916.safetensors" not in plan.prune_targets()  # NViT's job
    inputs = plan.evaluate_inputs(w(ds="ade20k", arch="vit_p8_d12", variant="depgraph-0.35-seed0"))
    assert inputs["model"] == "models/ade20k/vit_p8_d12/seed0/depgraph-0.35-ft.safetensors"
    assert inputs["match"] == "models/ade20k/vit_p8_d12/seed0/depgraph-0.35.report.json"
    assert plan.finetune_inputs(w(ds="ade20k", arch="vit_p8_d12", seed="0", stem="depgraph-0.35"))["model"] == (
        "models/ade20k/vit_p8_d12/seed0/depgraph-0.35.safetensors")


def test_inputs_follow_the_registry() -> None:
    plan = Plan(config())
    ptm = plan.match_inputs(w(ds="ade20k", arch="vit_p8_d12", seed="0", method="nvit_tome", target="0.35"))
    assert ptm["model"] == "models/ade20k/vit_p8_d12/seed0/nvit-0.5916-ft.safetensors"  # 0.35 ** 0.5
    assert "policy" not in ptm
    cts = plan.match_inputs(w(ds="ade20k", arch="vit_p8_d12", seed="0", method="cts", target="0.35"))
    assert cts["policy"] == "models/ade20k/vit_p8_d12/seed0/cts-policy.safetensors"
    assert cts["model"] == "models/ade20k/vit_p8_d12/seed0/dense.safetensors"
    nvit = plan.evaluate_inputs(w(ds="ade20k", arch="vit_p8_d12", variant="nvit-0.35-seed0"))
    assert nvit["match"].endswith("nvit-0.35.report.json") and nvit["model"].endswith("nvit-0.35-ft.safetensors")
    tofu = plan.evaluate_inputs(w(ds="ade20k", arch="vit_p8_d12", variant="tofu-0.75-seed0"))
    assert tofu["match"] == "matches/ade20k/vit_p8_d12/seed0/tofu-0.75.json"
    assert len(tofu["images"]) == len(plan.conditions()) - 1
    options = plan.match_options(w(ds="ade20k", method="nvit_tome"), w(dense="D", manifest="data/ade20k/manifest.json"))
    assert "--method tome --settings '{\"decoder_on_merged\":true,\"prop_attn\":true}'" in options


def test_stages_produce_the_grid() -> None:
    cfg = config()
    plan = Plan(cfg)
    n_ds, targets = len(cfg["study"]["datasets"]), len(cfg["study"]["targets"])
    matched = [m for m in cfg["study"]["methods"] if registry.get(m).matched]
    assert len(plan.match_targets()) == n_ds * (1 + len(matched) * targets)
    assert plan.prune_fractions() == ["0.866", "0.75", "0.5916", "0.35"]  # NViT's and sqrt(target)
    assert len(plan.evaluate_targets()) == n_ds * len(plan.variants("x", "y", 0)) * len(plan.conditions())
    assert sum(p.endswith("cts-policy.safetensors") for p in plan.train_targets()) == n_ds
    no_cts = Plan(config(study={"methods": ["dense", "tome"]}))
    assert not any(p.endswith("cts-policy.safetensors") for p in no_cts.train_targets())
    assert no_cts.prune_targets() == [] and no_cts.pruning_iters() == 0


@pytest.mark.parametrize("changes, message", [
    ({"study": {"methods": ["dense", "tomee"]}}, "study.methods names tomee"),
    ({"methods": {"algm": {"window": 1}}}, "methods.algm: window must hold at least 2 patches"),
    ({"datasets": {"ade20k": {**yaml.safe_load((ROOT / "config.yaml").read_text())["datasets"]["ade20k"],
                              "crop": 100}}}, "datasets.ade20k.crop 100 is not a multiple"),
])
def test_config_checks_name_the_key(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Plan(config(**changes))


def test_dtop_heads_are_a_policy_trained_once_and_fine_tuned_with_the_model() -> None:
    """DToP's heads train once per dense model (its policy); fine-tuned with DToP attached, each
    point's heads and the knob naming them come from its fine-tuning job."""
    methods = [*config()["study"]["methods"], "dtop"]
    off = Plan(config(study={"methods": methods}))
    seed0 = "models/ade20k/vit_p8_d12/seed0"
    assert f"{seed0}/dtop-policy.safetensors" in off.train_targets()
    assert f"{seed0}/cts-policy.safetensors" in off.train_targets()
    shelf = off.evaluate_inputs(w(ds="ade20k", arch="vit_p8_d12", variant="dtop-0.75-seed0"))
    assert shelf["policy_dtop"] == f"{seed0}/dtop-policy.safetensors" and "policy_cts" not in shelf
    assert shelf["match"] == "matches/ade20k/vit_p8_d12/seed0/dtop-0.75.json"
    assert off.match_inputs(w(ds="ade20k", arch="vit_p8_d12", seed="0", method="dtop", target="0.75"))["policy"] == (
        f"{seed0}/dtop-policy.safetensors")
    bench = off.bench_inputs(w(ds="ade20k", arch="vit_p8_d12", seed="0"))
    assert {v for k, v in bench.items() if k.startswith("policy")} == {
        f"{seed0}/cts-policy.safetensors", f"{seed0}/dtop-policy.safetensors"}
    settings = json.loads(off.policy_settings(w(method="dtop")))
    assert set(settings) == {"policy", "split", "head_dim", "head_layers", "head_dropout"}
    assert json.loads(off.policy_settings(w(method="cts"))) == {"policy": config()["methods"]["cts"]["policy"]}

    tuned = Plan(config(study={"methods": methods}, finetune={"token_methods": True}))
    ft = tuned.evaluate_inputs(w(ds="ade20k", arch="vit_p8_d12", variant="dtop-0.75-seed0"))
    assert ft["model"] == f"{seed0}/dtop-0.75-ft.safetensors"
    assert ft["policy_dtop"] == f"{seed0}/dtop-0.75-ft.policy.safetensors"
    assert ft["match"] == "matches/ade20k/vit_p8_d12/seed0/dtop-0.75-ft.json"
    assert tuned.evaluate_inputs(w(ds="ade20k", arch="vit_p8_d12", variant="cts-0.75-seed0"))["policy_cts"] == (
        f"{seed0}/cts-policy.safetensors")  # CTS's policy stays frozen while fine-tuning
    job = tuned.finetune_inputs(w(ds="ade20k", arch="vit_p8_d12", seed="0", stem="dtop-0.75"))
    assert job["policy"] == f"{seed0}/dtop-policy.safetensors" and job["model"] == f"{seed0}/dense.safetensors"
    assert f"{seed0}/dtop-0.75-ft.safetensors" in tuned.finetune_targets()
    bench = tuned.bench_inputs(w(ds="ade20k", arch="vit_p8_d12", seed="0"))  # every point's own heads
    assert {f"{seed0}/dtop-{t}-ft.policy.safetensors" for t in ("0.75", "0.35")} <= set(bench.values())


HYBRID = '''
from segcompress.methods import Method
from segcompress.methods.nvit_tome import NViTToMeSettings

METHOD = Method("depgraph_tome", "DepGraph+ToMe", "hybrid", settings=NViTToMeSettings, matched=True, pruned=True,
                applies="tome", pruner="depgraph")
'''


def test_a_second_hybrid_merges_its_own_pruners_models(tmp_path, monkeypatch) -> None:
    """Prune-then-merge is not tied to NViT: a hybrid names its pruner, and the plan prunes,
    fine-tunes and merges that pruner's models (one module, one config entry)."""
    (tmp_path / "depgraph_tome.py").write_text(HYBRID)
    monkeypatch.setenv(registry.PLUGINS_ENV, str(tmp_path / "depgraph_tome.py"))
    try:
        plan = Plan(config(study={"methods": ["dense", "depgraph_tome"]}))
        seed0 = "models/ade20k/vit_p8_d12/seed0"
        assert plan.pruners() == ["depgraph"] and plan.prune_fractions("depgraph") == ["0.866", "0.5916"]
        assert plan.prune_targets()[:2] == [f"{seed0}/depgraph-0.866.safetensors", f"{seed0}/depgraph-0.5916.safetensors"]
        assert plan.match_inputs(w(ds="ade20k", arch="vit_p8_d12", seed="0", method="depgraph_tome", target="0.35"))[
            "model"] == f"{seed0}/depgraph-0.5916-ft.safetensors"
        assert f"{seed0}/depgraph-0.5916-ft.safetensors" in plan.finetune_targets()
        assert plan.iters_while_pruning("depgraph_tome") == 0  # DepGraph trains nothing while pruning
        options = plan.match_options(w(ds="ade20k", method="depgraph_tome"), w(dense="D", manifest="data/ade20k/m.json"))
        assert "--method tome" in options
    finally:
        monkeypatch.delenv(registry.PLUGINS_ENV)
        registry.reload()
