"""NViT-style structural pruning (segcompress.prune): targets, physical removal, ranking, FLOPs."""

from __future__ import annotations

import json
import subprocess
import sys
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from segcompress.flops import analytic_gmacs, count_gmacs
from segcompress.models.checkpoint import load_model, save_model
from segcompress.models.segmenter import Segmenter
from segcompress.prune import Key, NViTPruner, PruneConfig, prune, prune_target_gmacs
from tiny_segmenter import tiny_model
from tiny_segmenter import tiny_spec as _tiny_spec

NUM_CLASSES = 4


tiny_spec = partial(_tiny_spec, num_classes=NUM_CLASSES, decoder_dim=24, decoder_heads=1)  # 32 px, 2 blocks


class Scenes(torch.utils.data.Dataset):
    """Random images with blocky labels (items are fixed; no augmentation)."""

    def __init__(self, n: int = 8, size: int = 32) -> None:
        g = torch.Generator().manual_seed(7)
        self.images = torch.randn(n, 3, size, size, generator=g)
        cells = torch.randint(0, NUM_CLASSES, (n, size // 8, size // 8), generator=g)
        self.labels = cells.repeat_interleave(8, 1).repeat_interleave(8, 2)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[i], self.labels[i]


def fast_config(**kw) -> PruneConfig:
    base = dict(steps=3, interval=1, recipe={"batch_size": 2, "log_every": 0, "num_workers": 0})
    base.update(kw)
    return PruneConfig.from_dict(base)


def backward_on_batch(model: Segmenter, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 32, 32, generator=g)
    y = torch.randint(0, NUM_CLASSES, (2, 32, 32), generator=g)
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()


def images(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(3))


# ------------------------------------------------------------------------------ structures


def test_depgraph_finds_every_embedding_slice():
    pruner = NViTPruner(tiny_model(tiny_spec(), train=True), PruneConfig())
    got = {(s.name, s.dim) for s in pruner.space.emb_slices}
    want = {("encoder.patch_embed.proj.weight", 0), ("encoder.patch_embed.proj.bias", 0), ("encoder.cls_token", 2),
            ("encoder.pos_embed", 2), ("encoder.norm.weight", 0), ("encoder.norm.bias", 0),
            ("decoder.proj_dec.weight", 1)}
    for i in range(2):
        b = f"encoder.blocks.{i}"
        want |= {(f"{b}.norm1.weight", 0), (f"{b}.norm1.bias", 0), (f"{b}.attn.qkv.weight", 1),
                 (f"{b}.attn.proj.weight", 0), (f"{b}.attn.proj.bias", 0), (f"{b}.norm2.weight", 0),
                 (f"{b}.norm2.bias", 0), (f"{b}.mlp.fc1.weight", 1), (f"{b}.mlp.fc2.weight", 0),
                 (f"{b}.mlp.fc2.bias", 0)}
    assert got == want
    # NViT's EMB saliency: patch-embed output, proj/fc2 output rows, qkv/fc1 input columns
    sources = {(s.name, s.dim) for s in pruner.space.emb_slices if s.source}
    nvit = {("encoder.patch_embed.proj.weight", 0), ("encoder.patch_embed.proj.bias", 0)}
    for i in range(2):
        b = f"encoder.blocks.{i}"
        nvit |= {(f"{b}.attn.qkv.weight", 1), (f"{b}.attn.proj.weight", 0), (f"{b}.attn.proj.bias", 0),
                 (f"{b}.mlp.fc1.weight", 1), (f"{b}.mlp.fc2.weight", 0), (f"{b}.mlp.fc2.bias", 0)}
    assert sources == nvit
    mlp = {(s.name, s.dim, s.source) for s in pruner.space.mlp_slices[1]}
    assert mlp == {("encoder.blocks.1.mlp.fc1.weight", 0, True), ("encoder.blocks.1.mlp.fc1.bias", 0, True),
                   ("encoder.blocks.1.mlp.fc2.weight", 1, False)}


def prune_some_of_everything(pruner: NViTPruner) -> None:
    m = pruner.masks
    m.remove(Key("emb"), torch.tensor([0, 5, 6, 17, 31]))
    m.remove(Key("heads", 0), torch.tensor([1]))
    m.remove(Key("qk", 0), torch.tensor([2, 3, 9]))
    m.remove(Key("v", 0), torch.tensor([0]))
    m.remove(Key("qk", 1), torch.tensor([15]))
    m.remove(Key("v", 1), torch.tensor([4, 5, 6, 7, 8]))
    m.remove(Key("mlp", 0), torch.arange(0, 128, 3))
    m.remove(Key("mlp", 1), torch.tensor([100]))


def test_masked_model_equals_the_physically_smaller_one_and_reloads(tmp_path):
    model = tiny_model(tiny_spec())
    pruner = NViTPruner(model, PruneConfig())
    prune_some_of_everything(pruner)
    x = images()
    with torch.no_grad(), pruner.hooks():
        masked = model(x)
    small = pruner.shrink().eval()
    spec = small.spec
    assert spec.embed_dim == 27 and spec.decoder_dim == 24
    assert [(b.num_heads, b.qk_dim, b.v_dim, b.mlp_hidden) for b in spec.blocks] == [(1, 13, 15, 85), (2, 15, 11, 127)]
    assert spec.attn_scale == pytest.approx(16 ** -0.5)  # the dense scale is kept
    with torch.no_grad():
        torch.testing.assert_close(small(x), masked, atol=1e-5, rtol=1e-5)
    save_model(small, tmp_path / "nvit.safetensors")
    loaded = load_model(tmp_path / "nvit.safetensors").eval()  # the spec alone rebuilds it
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), masked, atol=1e-5, rtol=1e-5)
    # without the hooks the dense model is unchanged
    with torch.no_grad():
        assert not torch.allclose(model(x), masked)
    # a fresh process rebuilds and runs it from the two files, without importing the pruning code
    torch.save(x, tmp_path / "x.pt")
    code = (
        "import sys, torch; from segcompress.models.checkpoint import load_model; "
        f"m = load_model({str(tmp_path / 'nvit.safetensors')!r}).eval(); "
        f"x = torch.load({str(tmp_path / 'x.pt')!r}); "
        "torch.no_grad().__enter__(); "
        f"torch.save(m(x), {str(tmp_path / 'y.pt')!r}); "
        "assert 'segcompress.prune' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    torch.testing.assert_close(torch.load(tmp_path / "y.pt"), masked, atol=1e-5, rtol=1e-5)


def test_analytic_flops_of_a_pruned_spec_equal_the_fvcore_count():
    pruner = NViTPruner(tiny_model(tiny_spec(), train=True), PruneConfig())
    prune_some_of_everything(pruner)
    small = pruner.shrink()
    assert analytic_gmacs(small.spec) == pytest.approx(count_gmacs(small, images(1)), rel=1e-9)
    assert pruner.gmacs() == pytest.approx(analytic_gmacs(small.spec), rel=1e-12)


# ------------------------------------------------------------------------------ ranking


def test_a_zeroed_head_is_pruned_first():
    model = tiny_model(tiny_spec(), train=True)
    qkv = model.encoder.blocks[0].attn.qkv
    with torch.no_grad():  # head 1 of block 0: q, k, v rows (16 each, 2 heads) -> 0
        for part in range(3):
            qkv.weight[part * 32 + 16: part * 32 + 32] = 0
            qkv.bias[part * 32 + 16: part * 32 + 32] = 0
    for eta in (0.0, 1.0):
        pruner = NViTPruner(model, PruneConfig(eta=eta))
        with pruner.hooks():
            backward_on_batch(model)
        pruner.accumulate()
        pruner.saliency.update(pruner.masks)
        assert pruner.saliency.scores[Key("heads", 0)][1] == 0
        pruned = pruner.prune_to(pruner.dense_gmacs - 1e-12, 0.0)  # exactly one group
        assert pruned == {"heads.0": 1}
        assert pruner.masks[Key("heads", 0)].tolist() == [True, False]


def test_zeroed_mlp_channels_are_pruned_before_any_other():
    model = tiny_model(tiny_spec(), train=True)
    dead = torch.tensor([3, 10, 11, 40, 41, 42, 77, 90, 91, 92, 93, 100, 101, 102, 120, 127, 5, 6, 7, 8])
    with torch.no_grad():
        model.encoder.blocks[1].mlp.fc1.weight[dead] = 0
        model.encoder.blocks[1].mlp.fc1.bias[dead] = 0
    pruner = NViTPruner(model, PruneConfig())
    with pruner.hooks():
        backward_on_batch(model)
    pruner.accumulate()
    pruner.saliency.update(pruner.masks)
    pruned = pruner.prune_to(pruner.dense_gmacs - 1e-12, 0.0)
    assert pruned == {"mlp.1": pruner.group[Key("mlp", 1)]}
    gone = (~pruner.masks[Key("mlp", 1)]).nonzero().flatten()
    assert set(gone.tolist()) <= set(dead.tolist())


def test_saliency_momentum_and_pruned_units_score_zero():
    model = tiny_model(tiny_spec(), train=True)
    pruner = NViTPruner(model, PruneConfig(momentum=0.9))
    with pruner.hooks():
        backward_on_batch(model, seed=0)
        pruner.accumulate()
        first = {k: v.clone() for k, v in pruner.saliency.update(pruner.masks).items()}
        pruner.masks.remove(Key("mlp", 0), torch.tensor([4]))
        backward_on_batch(model, seed=1)
        pruner.accumulate()
        raw = {k: (v.double() / pruner.saliency.divisor[k]) ** 2 for k, v in pruner.saliency.unit_sums().items()}
        second = pruner.saliency.update(pruner.masks)
    key = Key("qk", 1)
    torch.testing.assert_close(second[key], 0.9 * first[key] + 0.1 * raw[key])
    assert second[Key("mlp", 0)][4] == 0 and raw[Key("mlp", 0)][4] == 0  # masked: no gradient either


def test_emb_saliency_sums_the_reference_slices_or_the_whole_group():
    """The default EMB saliency is NViT's sum; ``group`` adds the LayerNorms, tokens and decoder input."""
    model = tiny_model(tiny_spec(), train=True)
    backward_on_batch(model)
    params = dict(model.named_parameters())

    def wg(name: str, dim: int) -> torch.Tensor:
        p = params[name]
        return (p.detach() * p.grad).movedim(dim, 0).reshape(32, -1).sum(1)

    reference = NViTPruner(model, PruneConfig()).saliency.unit_sums()[Key("emb")]
    space = NViTPruner(model, PruneConfig()).space
    want = sum(wg(s.name, s.dim) for s in space.emb_slices if s.source)
    torch.testing.assert_close(reference, want, rtol=1e-5, atol=0)
    group = NViTPruner(model, PruneConfig(emb_saliency="group")).saliency.unit_sums()[Key("emb")]
    torch.testing.assert_close(group, sum(wg(s.name, s.dim) for s in space.emb_slices), rtol=1e-5, atol=0)
    extra = wg("encoder.blocks.0.norm1.weight", 0) + wg("encoder.cls_token", 2) + wg("decoder.proj_dec.weight", 1)
    assert extra.abs().sum() > 0 and not torch.allclose(group, reference, rtol=0.01, atol=0)
    with pytest.raises(ValueError, match="emb_saliency.*'reference' or 'group'"):
        PruneConfig.from_dict({"emb_saliency": "all"})


@pytest.mark.parametrize("reset", [True, False])
def test_saliency_average_restarts_after_the_first_prune_unless_kept(reset):
    model = tiny_model(tiny_spec(), train=True)
    pruner = NViTPruner(model, PruneConfig(momentum=0.9, reset_saliency=reset))

    def batch(seed: int) -> dict[Key, torch.Tensor]:
        backward_on_batch(model, seed=seed)
        pruner.accumulate()
        return {k: (v.double() / pruner.saliency.divisor[k]) ** 2 for k, v in pruner.saliency.unit_sums().items()}

    with pruner.hooks():
        raw0 = batch(0)
        pruner.step(pruner.dense_gmacs * 0.95, pruner.dense_gmacs * 0.5)
        after_first = {k: v.clone() for k, v in pruner.saliency.scores.items()}
        raw1 = batch(1)
        pruner.step(pruner.dense_gmacs * 0.9, pruner.dense_gmacs * 0.5)
    key = Key("qk", 1)
    alive = pruner.masks[key]
    kept = 0.9 * raw0[key] + 0.1 * raw1[key]
    expected = 0.1 * raw1[key] if reset else kept
    torch.testing.assert_close(pruner.saliency.scores[key][alive], expected[alive], rtol=1e-9, atol=0)
    assert not torch.allclose(kept[alive], 0.1 * raw1[key][alive], rtol=0.01, atol=0)  # the settings differ here
    assert all(bool((v == 0).all()) == reset for v in after_first.values())
    assert len(pruner.history) == 2


# ------------------------------------------------------------------------------ the driver


def test_prune_hits_the_target_within_one_percent_and_reloads(tmp_path):
    model = tiny_model(tiny_spec(), train=True)
    dense = analytic_gmacs(model.spec)
    target = 0.6 * dense
    result = prune(model, Scenes(), target, fast_config(), seed=0)
    assert 0.99 * target <= result.achieved_gmacs <= target
    small = result.model
    assert analytic_gmacs(small.spec) == pytest.approx(result.achieved_gmacs, rel=1e-12)
    assert count_gmacs(small, images(1)) == pytest.approx(result.achieved_gmacs, rel=1e-9)
    assert len(result.steps) == 3 and result.steps[-1]["gflops"] == pytest.approx(result.achieved_gmacs)
    assert all(b.num_heads >= 1 and b.qk_dim >= 1 and b.v_dim >= 1 and b.mlp_hidden >= 1 for b in small.spec.blocks)
    report = result.report()
    json.dumps(report)
    assert report["params"] < report["dense_params"]
    save_model(small, tmp_path / "p.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "p.safetensors").eval()(images()), small.eval()(images()))


def test_subtractive_flops_term_also_reaches_the_target():
    model = tiny_model(tiny_spec(), 1, train=True)
    target = 0.55 * analytic_gmacs(model.spec)
    result = prune(model, Scenes(), target, fast_config(flops_mode="subtract", eta=0.5, kd_weight=0.0), seed=1)
    assert 0.99 * target <= result.achieved_gmacs <= target


def test_every_structure_keeps_one_group_unless_min_keep_says_otherwise():
    """NViT keeps at least one group per layer: near the floor every width is still >= its group."""
    dense = analytic_gmacs(tiny_spec())
    floor = NViTPruner(tiny_model(tiny_spec(), train=True), PruneConfig()).min_gmacs()
    assert NViTPruner(tiny_model(tiny_spec(), train=True), PruneConfig(min_keep=1)).min_gmacs() < floor
    # tiny groups (clamped to a quarter of each width): E 8, heads 1, QK 4, V 4, MLP 16
    small = prune(tiny_model(tiny_spec(), train=True), Scenes(), 1.02 * floor, fast_config(), seed=0).model.spec
    assert small.embed_dim >= 8 and analytic_gmacs(small) < 0.6 * dense
    assert all(b.num_heads >= 1 and b.qk_dim >= 4 and b.v_dim >= 4 and b.mlp_hidden >= 16 for b in small.blocks)
    loose = prune(tiny_model(tiny_spec(), train=True), Scenes(), 1.02 * floor, fast_config(min_keep=1),
                  seed=0).model.spec
    assert min(min(b.qk_dim, b.v_dim) for b in loose.blocks) < 4 or loose.embed_dim < 8


def test_dense_target_changes_nothing():
    model = tiny_model(tiny_spec(), train=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = prune(model, Scenes(), analytic_gmacs(model.spec), fast_config(), seed=0)
    assert result.model is model and result.steps == []
    assert result.achieved_gmacs == result.dense_gmacs
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    # and a pruning step whose target is the dense FLOPs removes no unit
    pruner = NViTPruner(model, PruneConfig())
    with pruner.hooks():
        backward_on_batch(model)
    pruner.accumulate()
    assert pruner.step(pruner.dense_gmacs, pruner.dense_gmacs)["pruned"] == {}
    assert pruner.shrink().spec.embed_dim == 32


def test_unreachable_target_is_a_clear_error():
    model = tiny_model(tiny_spec(), train=True)
    with pytest.raises(ValueError, match="below the smallest prunable model.*one group each"):
        prune(model, Scenes(), 1e-6, fast_config(), seed=0)


def test_config_validation_and_budget_split():
    with pytest.raises(ValueError, match="unknown key"):
        PruneConfig.from_dict({"stpes": 3})
    with pytest.raises(ValueError, match="flops_mode"):
        PruneConfig.from_dict({"flops_mode": "latency"})
    assert PruneConfig.from_dict({"recipe": {"lr": 0.01}}).recipe["batch_size"] == 8
    assert prune_target_gmacs(40.0, 10.0, 0.5) == pytest.approx(20.0)
    assert prune_target_gmacs(40.0, 10.0, 1.0) == pytest.approx(10.0)
    pruner = NViTPruner(tiny_model(tiny_spec(), train=True), PruneConfig())
    assert pruner.group[Key("emb")] == 8 and pruner.group[Key("heads", 0)] == 1  # clamped to the tiny widths


# ------------------------------------------------------------------------------ CLI


def test_cli_prune_then_finetune_on_synthetic_cityscapes(tmp_path, synthetic_cityscapes):
    from segcompress.cli import main

    root = synthetic_cityscapes  # trains on its 2 train images
    model = tiny_model(tiny_spec(num_classes=19), train=True)
    dense = tmp_path / "m" / "dense.safetensors"
    save_model(model, dense)
    out = tmp_path / "m" / "nvit-50.safetensors"
    config = json.dumps({"steps": 2, "interval": 1, "recipe": {"batch_size": 2, "log_every": 0, "num_workers": 0}})
    common = ["--layout", "cityscapes", "--root", str(root), "--crop", "32", "--img-scale", "64", "32", "--seed", "0"]
    assert main(["prune", "--model", str(dense), "--target-fraction", "0.8", "--prune-share", "0.5",
                 "--config-json", config, "--out", str(out), *common]) == 0
    report = json.loads((tmp_path / "m" / "nvit-50.report.json").read_text())
    dense_g = analytic_gmacs(model.spec)
    assert report["overall_target_gflops"] == pytest.approx(0.8 * dense_g)
    assert report["prune_target_gflops"] == pytest.approx(0.8 ** 0.5 * dense_g)
    assert 0.99 * report["prune_target_gflops"] <= report["achieved_gflops"] <= report["prune_target_gflops"]
    assert report["fvcore_gflops"] == pytest.approx(report["achieved_gflops"], rel=1e-9)
    assert report["prune_then_merge"]["prune_share"] == 0.5
    assert len(report["blocks"]) == 2 and report["num_steps"] == 2
    pruned = load_model(out)
    assert analytic_gmacs(pruned.spec) == pytest.approx(report["achieved_gflops"])

    ft = tmp_path / "m" / "nvit-50-ft.safetensors"
    recipe = json.dumps({"iters": 2, "batch_size": 2, "lr": 1e-4, "min_lr": 0.0, "log_every": 0, "num_workers": 0,
                         "checkpoint_every": 0, "kd_weight": 0.5})
    assert main(["finetune", "--model", str(out), "--teacher", "dense", "--recipe", recipe, "--out", str(ft),
                 *common]) == 0
    tuned = load_model(ft)
    assert tuned.spec == pruned.spec
    assert any(not torch.equal(a, b) for a, b in zip(tuned.state_dict().values(), pruned.state_dict().values()))

    # prune-then-merge: ToMe attached while fine-tuning; the checkpoint is the bare pruned model
    ptm = tmp_path / "m" / "nvit_tome-ft.safetensors"
    assert main(["finetune", "--model", str(out), "--method", "tome", "--knob", '{"r": 2}', "--teacher", "none",
                 "--recipe", recipe, "--out", str(ptm), *common]) == 0
    assert load_model(ptm).spec == pruned.spec
