"""ToFu (pruning, then MLERP merging) on the Segmenter encoder through the token state."""

import pytest
import torch

from segcompress.flops import count_gmacs
from segcompress.tokens.patch import attach
from segcompress.tokens.state import TokenState, restore_grid
from segcompress.tokens.tofu import (
    ToFu, default_modes, layer_modes, match_slots, mlerp_merge, prune_merge, tofu_gmacs,
)
from segcompress.tokens.tome import bipartite_soft_matching, token_schedule, tome_gmacs
from tiny_segmenter import tiny_model, tiny_spec
from types import SimpleNamespace

from segcompress.methods import get


def from_knob(knob: dict, depth: int):
    """ToFu as the registry builds it from a knob."""
    return get("tofu").code().build(SimpleNamespace(spec=SimpleNamespace(depth=depth)), knob)

torch.set_num_threads(1)

GRID = (4, 5)
N = GRID[0] * GRID[1]


@pytest.fixture(scope="module")
def model():
    return tiny_model(tiny_spec([32, 48], 8, 4))


@pytest.fixture(scope="module")
def img():
    return torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(1))


def _state(seed: int, sizes: bool = False) -> TokenState:
    """A dense state (1 class token + a 4×5 grid, width 8); ``sizes``: random integer sizes."""
    g = torch.Generator().manual_seed(seed)
    state = TokenState.from_tokens(torch.randn(2, 1 + N, 8, generator=g), GRID, 1)
    if sizes:
        size = torch.randint(1, 5, (2, 1 + N), generator=g).float()
        size[:, 0] = 1
        state = TokenState(state.x, size, state.token_of, GRID, 1, merged=True)
    return state


def _metric(seed: int) -> torch.Tensor:
    return torch.randn(2, 1 + N, 6, generator=torch.Generator().manual_seed(seed))


def _groups(state: TokenState, merged: TokenState, b: int) -> list[torch.Tensor]:
    """Old token indices of every new token, read from the new map (valid for a dense ``state``)."""
    slot = torch.cat([torch.zeros(1, dtype=torch.long), merged.token_of[b]])  # old token j → new token
    return [(slot == t).nonzero()[:, 0] for t in range(merged.num_tokens)]


@pytest.mark.parametrize("decoder_on_merged", [False, True])
def test_r0_is_exactly_dense(model, img, decoder_on_merged):
    with torch.no_grad():
        dense = model(img)
        feats = model.forward_features(img)
        attach(model, ToFu(0, model.spec.depth, decoder_on_merged=decoder_on_merged))
        try:
            assert torch.equal(model(img), dense)
            assert torch.equal(model.forward_features(img), feats)
        finally:
            attach(model, None)


@pytest.mark.parametrize("fn", [mlerp_merge, prune_merge])
def test_matching_sizes_and_map_are_tomes(fn):
    state, metric = _state(0, sizes=True), _metric(1)
    tome = bipartite_soft_matching(state, metric, 6)
    out = fn(state, metric, 6)
    assert out.merged and out.counts is None and out.num_tokens == 1 + N - 6
    assert torch.equal(out.token_of, tome.token_of)
    assert torch.equal(out.size, tome.size)
    assert torch.equal(out.size.sum(dim=1), state.size.sum(dim=1))
    assert fn(state, metric, 0) is state


def test_mlerp_of_identical_vectors_is_that_vector():
    state = _state(2, sizes=True)
    v = torch.randn(8)
    same = TokenState(v.expand(2, 1 + N, 8).clone(), state.size, state.token_of, GRID, 1, merged=True)
    out = mlerp_merge(same, _metric(3), 8)
    assert torch.allclose(out.x, v.expand_as(out.x), rtol=1e-5, atol=1e-6)


def test_mlerp_norm_is_the_group_max_and_direction_the_weighted_mean():
    state, metric = _state(4, sizes=True), _metric(5)
    out = mlerp_merge(state, metric, 7)
    fused = 0
    for b in range(2):
        for t, members in enumerate(_groups(state, out, b)):
            x, s = state.x[b, members], state.size[b, members]
            if len(members) == 1:
                assert torch.equal(out.x[b, t], x[0])  # unmerged tokens are kept bit-exactly
                continue
            fused += len(members) - 1
            mean = (s[:, None] * x).sum(0) / s.sum()
            assert out.x[b, t].norm() == pytest.approx(float(x.norm(dim=-1).max()), rel=1e-5)
            assert torch.allclose(out.x[b, t] / out.x[b, t].norm(), mean / mean.norm(), atol=1e-5)
            assert out.x[b, t].norm() > mean.norm()  # not the plain (shrunk) average
    assert fused == 2 * 7  # every src token of both images joined a group


def test_mlerp_keeps_the_dtype():
    state, metric = _state(6), _metric(7)
    half = state.with_x(state.x.bfloat16())
    out = mlerp_merge(half, metric, 5)
    assert out.x.dtype == torch.bfloat16
    assert torch.allclose(out.x.float(), mlerp_merge(state, metric, 5).x, rtol=2e-2, atol=2e-2)


def test_prune_keeps_tokens_bit_exact_and_pruned_patches_show_their_dst():
    state, metric = _state(8, sizes=True), _metric(9)
    out = prune_merge(state, metric, 7)
    match = match_slots(state, metric, 7)
    assert int(match.is_src.sum()) == 2 * 7
    restored = restore_grid(out).flatten(2).transpose(1, 2)  # (B, N, C) from the channels-last grid
    for b in range(2):
        for t, members in enumerate(_groups(state, out, b)):
            kept = members[~match.is_src[b, members]]
            assert len(kept) == 1  # one dst (or unmerged) token per new token
            assert torch.equal(out.x[b, t], state.x[b, kept[0]])
            assert out.size[b, t] == state.size[b, members].sum()
            for j in members[match.is_src[b, members]]:  # a pruned token's patch shows its dst
                assert torch.equal(restored[b, j - 1], state.x[b, kept[0]])
                assert torch.equal(out.unmerge()[b, j - 1], state.x[b, kept[0]])


def test_forward_sizes_and_token_schedule(model, img):
    method = ToFu(3, model.spec.depth)
    method.record = True
    with torch.no_grad():
        state = method.encode(model, img)
    n = 4 * 6
    t_in, t_out, _ = token_schedule(method.r, 1 + n, 1)
    assert [int(a[0]) for a, _ in method.trace] == t_in
    assert [int(o[0]) for _, o in method.trace] == t_out
    assert all(bool((a == a[0]).all() and (o == o[0]).all()) for a, o in method.trace)
    assert torch.equal(state.size.sum(dim=1), torch.full((2,), 1.0 + n))
    assert state.size[:, 0].eq(1).all()  # the class token is never merged
    assert method.features(model, img).shape == (2, n, 32)
    for on_merged in (False, True):
        attach(model, ToFu(3, model.spec.depth, decoder_on_merged=on_merged))
        try:
            with torch.no_grad():
                assert model(img).shape == (2, 5, 32, 48)
        finally:
            attach(model, None)


def test_modes_and_switch():
    assert default_modes(12) == ["prune"] * 7 + ["merge"] * 5
    assert layer_modes(12, 4) == ["prune"] * 4 + ["merge"] * 8
    assert layer_modes(4, 0) == ["merge"] * 4 and layer_modes(4, 4) == ["prune"] * 4
    assert ToFu(2, 12).modes == default_modes(12) and ToFu(2, 12).switch == 7
    with pytest.raises(ValueError):
        layer_modes(4, 5)


@pytest.mark.parametrize("switch", [None, 0, 2, 4])
def test_merge_dispatches_on_the_switch(switch):
    method = ToFu(4, 4, switch=switch)
    state = _state(10)
    keys = torch.randn(2, 2, 1 + N, 6, generator=torch.Generator().manual_seed(11))
    metric = keys.mean(dim=1)
    for i, mode in enumerate(method.modes):
        expect = (prune_merge if mode == "prune" else mlerp_merge)(state, metric, 4)
        other = (mlerp_merge if mode == "prune" else prune_merge)(state, metric, 4)
        got = method.merge(i, state, keys)
        assert torch.equal(got.x, expect.x) and not torch.equal(got.x, other.x)


@pytest.mark.parametrize("knob", [
    {"r": 3, "switch": 3, "prop_attn": True, "decoder_on_merged": False},
    {"r": 2, "inflect": -1.0, "switch": 1, "prop_attn": False, "decoder_on_merged": True},
    {"r": [4, 0, 2, 1], "switch": 0, "prop_attn": True, "decoder_on_merged": False},
])
def test_knob_rebuilds_the_method(knob):
    method = from_knob(knob, 4)
    assert method.knob() == knob
    again = from_knob(method.knob(), 4)
    assert (again.r, again.modes, again.prop_attn, again.decoder_on_merged) == (
        method.r, method.modes, method.prop_attn, method.decoder_on_merged)
    with pytest.raises(ValueError, match="unknown tofu knob"):
        from_knob({**knob, "ratio": 0.5}, 4)


@pytest.mark.parametrize("knob", [
    {"r": 3}, {"r": [6, 0, 2, 1], "decoder_on_merged": False, "switch": 1},
    {"r": 2, "inflect": -1.0, "switch": 0, "decoder_on_merged": True},
])
def test_analytic_flops_equal_tome_and_fvcore(model, knob):
    tome_knob = {k: v for k, v in knob.items() if k != "switch"}
    assert tofu_gmacs(model.spec, knob) == tome_gmacs(model.spec, tome_knob)
    attach(model, from_knob(knob, model.spec.depth))
    try:
        counted = count_gmacs(model, torch.randn(1, 3, 32, 48))
    finally:
        attach(model, None)
    assert counted == pytest.approx(tofu_gmacs(model.spec, knob), rel=1e-9)
