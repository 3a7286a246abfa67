"""DepGraph structural pruning through torch-pruning (segcompress.prune.depgraph), on a tiny Segmenter."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from functools import partial

import pytest
import torch

from segcompress.flops import analytic_gmacs, count_gmacs
from segcompress.models.checkpoint import load_model, save_model
from segcompress.models.segmenter import Segmenter, build_segmenter
from segcompress.models.spec import BlockDims
from segcompress.prune.depgraph import (
    DepGraphSettings,
    ZeroHeadsError,
    depgraph_prune,
    is_monotone,
    prune_once,
    prune_to_target,
    taylor_gradients,
    to_project,
    traceable_attention,
)
from tiny_segmenter import tiny_model
from tiny_segmenter import tiny_spec as _tiny_spec

NUM_CLASSES = 4
CROP = 32


#: E 64, 3 blocks of 4 heads (head width 16), 4x4 patches of 8 px, decoder width 32.
tiny_spec = partial(_tiny_spec, img_size=CROP, depth=3, num_classes=NUM_CLASSES, embed_dim=64, num_heads=4,
                    decoder_dim=32, decoder_heads=1)


def calibration(n: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Random crops with labels, some pixels unlabelled (255)."""
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        labels = torch.randint(0, NUM_CLASSES, (2, CROP, CROP), generator=g)
        labels[:, :4] = 255
        out.append((torch.randn(2, 3, CROP, CROP, generator=g), labels))
    return out


def images(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, CROP, CROP, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def dense() -> Segmenter:
    return tiny_model(tiny_spec())


@pytest.fixture(scope="module")
def grads(dense: Segmenter) -> dict[str, torch.Tensor]:
    return taylor_gradients(dense, calibration())


@pytest.fixture(scope="module")
def pruned(dense: Segmenter, grads: dict[str, torch.Tensor]) -> Segmenter:
    """The torch-pruning-edited copy at p = 0.3 (Taylor, global + isomorphic)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", module="torch_pruning")  # every parameter is declared
        return depgraph_prune(dense, 0.3, DepGraphSettings(), grads).eval()


# ------------------------------------------------------------------------------ settings


def test_settings_defaults_and_round_trip():
    s = DepGraphSettings()
    assert (s.importance, s.global_pruning, s.isomorphic, s.head_ratio_scale, s.head_dim_scope, s.round_to,
            s.prune_embedding, s.tolerance) == ("taylor", True, True, 1.0, 0.5, 2, True, 0.01)
    assert DepGraphSettings.from_dict(s.to_dict()) == s
    assert DepGraphSettings.from_dict({"importance": "magnitude"}).importance == "magnitude"


@pytest.mark.parametrize("data, key", [
    ({"importance": "l1"}, "importance"),
    ({"round_to": 0}, "round_to"),
    ({"round_to": 2.5}, "round_to"),
    ({"global_pruning": False}, "isomorphic"),  # isomorphic scopes need global ranking
    ({"head_ratio_scale": -0.5}, "head_ratio_scale"),
    ({"head_dim_scope": 2.0}, "head_dim_scope"),  # 2 * max_ratio 0.9 >= 1
    ({"prune_embedding": "yes"}, "prune_embedding"),
    ({"calibration_batches": 0}, "calibration_batches"),
    ({"tolerance": 1.0}, "tolerance"),
    ({"max_ratio": 1.0}, "max_ratio"),
    ({"max_bisection_steps": 0}, "max_bisection_steps"),
    ({"ratio": 0.3}, "ratio"),  # unknown key
])
def test_settings_errors_name_the_key(data, key):
    with pytest.raises(ValueError) as err:
        DepGraphSettings.from_dict(data)
    message = str(err.value)
    assert key in message and "\n" not in message


# ------------------------------------------------------------------------------ tracing and gradients


def test_traceable_attention_computes_the_same_and_is_restored(dense):
    x = images()
    with torch.no_grad():
        want = dense(x)
        with traceable_attention(dense):
            assert all("forward" in blk.attn.__dict__ for blk in dense.encoder.blocks)
            got = dense(x)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert not any("forward" in blk.attn.__dict__ for blk in dense.encoder.blocks)
    nvit_like = build_segmenter(tiny_spec(blocks=[BlockDims(4, 8, 16, 128)] * 3))
    with pytest.raises(ValueError, match="qk_dim 8 != v_dim 16"):
        with traceable_attention(nvit_like):
            pass


def test_taylor_gradients_sum_the_batches_and_leave_grad_alone(dense, grads):
    model = tiny_model(tiny_spec()).train()
    got = taylor_gradients(model, iter(calibration()), num_batches=2)
    assert model.training and all(p.grad is None for p in model.parameters())
    ref = tiny_model(tiny_spec())  # eval mode: backward per batch, no zero_grad between
    for x, y in calibration()[:2]:
        logits = ref(x)
        torch.nn.functional.cross_entropy(logits, y, ignore_index=255).backward()
    for name, p in ref.named_parameters():
        torch.testing.assert_close(got[name], p.grad, atol=1e-6, rtol=1e-5)
    assert set(grads) == {n for n, _ in dense.named_parameters()}


# ------------------------------------------------------------------------------ one candidate


def test_converted_model_loads_without_torch_pruning_and_equals_the_pruned_one(pruned, dense, tmp_path):
    spec = pruned.spec
    assert spec.embed_dim < 64 and spec.embed_dim % spec.num_heads == 0 and spec.decoder_dim == 32
    assert spec.attn_scale == pytest.approx(16 ** -0.5)  # the dense scale is kept
    assert all(b.qk_dim == b.v_dim and b.num_heads >= 1 for b in spec.blocks)
    assert any(b.qk_dim < 16 for b in spec.blocks) and any(b.mlp_hidden < 256 for b in spec.blocks)
    assert dense.encoder.patch_embed.proj.out_channels == 64  # the dense model is untouched
    x = images()
    small = to_project(pruned).eval()
    with torch.no_grad():
        want = pruned(x)
        assert (small(x) - want).abs().max() < 1e-5
    save_model(small, tmp_path / "dg.safetensors")
    assert json.loads((tmp_path / "dg.json").read_text())["blocks"] == [b.__dict__ for b in spec.blocks]
    torch.save(x, tmp_path / "x.pt")
    code = (
        "import sys; sys.modules['torch_pruning'] = None; import torch; "
        "from segcompress.models.checkpoint import load_model; "
        f"m = load_model({str(tmp_path / 'dg.safetensors')!r}).eval(); "
        f"x = torch.load({str(tmp_path / 'x.pt')!r}); "
        "torch.no_grad().__enter__(); "
        f"torch.save(m(x), {str(tmp_path / 'y.pt')!r}); "
        "assert 'segcompress.prune' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    assert (torch.load(tmp_path / "y.pt") - want).abs().max() < 1e-5
    assert (load_model(tmp_path / "dg.safetensors").eval()(x).detach() - want).abs().max() < 1e-5


def test_analytic_gmacs_of_the_converted_spec_equal_the_traced_count(pruned):
    small = to_project(pruned)
    assert analytic_gmacs(small.spec) == pytest.approx(count_gmacs(small, images(1)), rel=1e-9)
    assert analytic_gmacs(small.spec) < analytic_gmacs(tiny_spec())


def test_gmacs_fall_with_p_and_every_block_keeps_a_head(dense, grads):
    settings = DepGraphSettings()
    points = [(0.0, analytic_gmacs(dense.spec))]  # p = 0 is the dense model (test_p0_is_the_dense_model)
    for p in (0.1, 0.3, 0.5):
        spec = prune_once(dense, p, settings, grads).spec
        assert all(spec.block_dims(i).num_heads >= 1 for i in range(spec.depth))
        points.append((p, analytic_gmacs(spec)))
    gmacs = [g for _, g in points]
    assert all(b < a for a, b in zip(gmacs, gmacs[1:])), points
    assert is_monotone(points) and not is_monotone([(0.1, 1.0), (0.2, 1.5)])


def test_p0_is_the_dense_model(dense):
    small = prune_once(dense, 0.0, DepGraphSettings())  # no gradients needed at p = 0
    assert [small.spec.block_dims(i) for i in range(3)] == [dense.spec.block_dims(i) for i in range(3)]
    assert small.spec.embed_dim == 64 and analytic_gmacs(small.spec) == pytest.approx(analytic_gmacs(dense.spec))
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(small(x), dense(x), atol=0, rtol=0)


def test_a_block_without_heads_is_refused(dense, grads):
    # 80% of the 12 heads go: 2 heads are left for 3 blocks
    with pytest.raises(ZeroHeadsError, match="no attention head"):
        prune_once(dense, 0.8, DepGraphSettings(), grads)
    with pytest.raises(ValueError, match="Taylor importance needs"):
        prune_once(dense, 0.3, DepGraphSettings())


def test_prune_embedding_false_keeps_e_with_magnitude_importance(dense):
    small = prune_once(dense, 0.3, DepGraphSettings(importance="magnitude", prune_embedding=False))
    assert small.spec.embed_dim == 64
    assert analytic_gmacs(small.spec) < analytic_gmacs(dense.spec)


def test_zero_scales_keep_the_heads_or_their_widths(dense):
    widths = prune_once(dense, 0.3, DepGraphSettings(importance="magnitude", head_ratio_scale=0.0)).spec.blocks
    assert all(b.num_heads == 4 for b in widths) and any(b.qk_dim < 16 for b in widths)
    heads = prune_once(dense, 0.3, DepGraphSettings(importance="magnitude", head_dim_scope=0.0)).spec.blocks
    assert all(b.qk_dim == 16 for b in heads) and sum(b.num_heads for b in heads) < 12


# ------------------------------------------------------------------------------ target search


def test_prune_to_target_lands_in_the_window(dense):
    dense_gmacs = analytic_gmacs(dense.spec)
    target = 0.6 * dense_gmacs
    # E = 64 moves in steps of 2 channels (~4% of the FLOPs here), so the tiny model gets a wider
    # window than the default 1% (a step of 2 of ViT-S's 384 channels is ~0.5%)
    settings = DepGraphSettings(tolerance=0.03, calibration_batches=3)
    result = prune_to_target(dense, target, settings, calibration())
    assert result.within_tolerance and result.message is None, result.report()
    assert target * 0.97 <= result.achieved_gmacs <= target
    assert result.achieved_gmacs == pytest.approx(analytic_gmacs(result.model.spec), rel=1e-12)
    assert result.spec is result.model.spec and result.dense_gmacs == pytest.approx(dense_gmacs)
    assert 0.0 < result.ratio < settings.max_ratio and result.monotone
    assert len(result.blocks) == 3 and all(b.num_heads >= 1 for b in result.blocks)
    assert any(g is None for _, g in result.candidates)  # p = max_ratio empties a block: refused
    report = json.loads(json.dumps(result.report()))
    assert report["embed_dim"] == result.embed_dim and report["within_tolerance"]


def test_a_target_beyond_the_last_head_is_reported_as_such(dense):
    # below every candidate that keeps a head in each block: the message names the heads, not the widths
    result = prune_to_target(dense, 0.05 * analytic_gmacs(dense.spec), DepGraphSettings(importance="magnitude"))
    assert not result.within_tolerance and result.achieved_gmacs > 0.05 * analytic_gmacs(dense.spec)
    assert "out of reach" in result.message and "without attention heads" in result.message
    assert "discrete" not in result.message and f"p={result.ratio:.5f}" in result.message
    refused = [p for p, g in result.candidates if g is None]
    assert refused and min(refused) > result.ratio
    # a reachable target whose (empty) window falls between two widths: the widths are named
    between = prune_to_target(dense, 0.6 * analytic_gmacs(dense.spec) + 1e-9,
                              DepGraphSettings(importance="magnitude", tolerance=0.0, max_bisection_steps=6))
    assert not between.within_tolerance and "discrete" in between.message and "heads" not in between.message


def test_prune_to_target_reports_an_unreachable_target(dense):
    dense_gmacs = analytic_gmacs(dense.spec)
    settings = DepGraphSettings(importance="magnitude", max_ratio=0.2)
    result = prune_to_target(dense, 0.1 * dense_gmacs, settings)
    assert not result.within_tolerance and "out of reach" in result.message
    assert result.ratio == 0.2 and len(result.candidates) == 1
    same = prune_to_target(dense, 2 * dense_gmacs, settings)  # above the dense FLOPs: nothing pruned
    assert same.ratio == 0.0 and same.achieved_gmacs == pytest.approx(dense_gmacs) and not same.within_tolerance
    with pytest.raises(ValueError, match="calibration batches"):
        prune_to_target(dense, 0.5 * dense_gmacs, DepGraphSettings())
