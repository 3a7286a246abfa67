"""ToMe on the Segmenter encoder through the token state."""

import pytest
import torch

from segcompress.flops import count_gmacs
from segcompress.methods import apply_method
from segcompress.tokens.tome import tome_gmacs
from segcompress.tokens.patch import TokenMethod
from segcompress.tokens.tome import ToMe
from segcompress.tokens.state import TokenState, restore_grid
from segcompress.tokens.tome import bipartite_soft_matching, parse_r, token_schedule
from tiny_segmenter import tiny_model, tiny_spec

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model():
    return tiny_model(tiny_spec([32, 48], 8, 4))


@pytest.fixture(scope="module")
def img():
    return torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(1))


def test_parse_r_forms():
    assert parse_r(4, 3) == [3, 3, 3, 3]
    assert parse_r(4, [5, 2]) == [5, 2, 0, 0]
    assert parse_r(3, (4, -1.0)) == [8, 4, 0]  # the decreasing schedule 2r -> 0
    with pytest.raises(ValueError):
        parse_r(2, [1, 2, 3])


@pytest.mark.parametrize("decoder_on_merged", [False, True])
def test_r0_is_exactly_dense(model, img, decoder_on_merged):
    with torch.no_grad():
        dense = model(img)
        feats = model.forward_features(img)
        apply_method(model, "tome", {"r": 0, "decoder_on_merged": decoder_on_merged})
        try:
            assert torch.equal(model(img), dense)
            assert torch.equal(model.forward_features(img), feats)
        finally:
            apply_method(model, "dense")


def test_sizes_sum_and_map_shapes(model, img):
    method = ToMe(5, model.spec.depth)
    with torch.no_grad():
        state = method.encode(model, img)
    n = 4 * 6
    t_in, t_out, _ = token_schedule(method.r, 1 + n, 1)
    assert state.x.shape[1] == t_out[-1]
    assert torch.equal(state.size.sum(dim=1), torch.full((2,), 1.0 + n))
    assert state.size[:, 0].eq(1).all()  # the class token is never merged
    assert state.token_of.shape == (2, n) and state.token_of.min() >= 1 and state.token_of.max() < state.x.shape[1]
    assert restore_grid(state).shape == (2, 32, 4, 6)
    assert method.features(model, img).shape == (2, n, 32)


def test_unmerge_of_unmerged_state_is_identity():
    x = torch.randn(2, 1 + 12, 8)
    state = TokenState.from_tokens(x, (3, 4), 1)
    assert torch.equal(state.unmerge(), x[:, 1:])
    assert torch.equal(restore_grid(state), x[:, 1:].transpose(1, 2).reshape(2, 8, 3, 4))


def test_map_tracks_the_size_weighted_average():
    """Merge one-hot patch features: each final token must be the mean of exactly the patches mapped to it."""
    torch.manual_seed(3)
    n, p = 20, 1
    x = torch.cat([torch.zeros(1, 1, n), torch.eye(n)[None]], dim=1).expand(2, -1, -1).clone()
    state = TokenState.from_tokens(x, (4, 5), p)
    for r in (4, 3, 5):
        metric = torch.randn(2, state.num_tokens, 6)
        state = bipartite_soft_matching(state, metric, r)
    tok = state.token_of
    for b in range(2):
        for t in range(1, state.num_tokens):
            members = (tok[b] == t).nonzero()[:, 0]
            assert len(members) == int(state.size[b, t])
            expect = torch.zeros(n)
            expect[members] = 1.0 / len(members)
            assert torch.allclose(state.x[b, t], expect, atol=1e-6)


def test_r_is_capped_at_half():
    x = torch.randn(1, 1 + 9, 4)
    state = bipartite_soft_matching(TokenState.from_tokens(x, (3, 3), 1), torch.randn(1, 10, 4), 100)
    assert state.num_tokens == 10 - 4  # ⌊(10 - 1)/2⌋ = 4 merged


def _block_out(blk, state, prop):
    return TokenMethod(prop_attn=prop).run_block(0, blk, state, merge=False).x


def test_proportional_attention_changes_output_only_when_sizes_differ(model):
    blk = model.encoder.blocks[0]
    torch.manual_seed(4)
    x = torch.randn(2, 1 + 6, 32)
    base = TokenState.from_tokens(x, (2, 3), 1)
    with torch.no_grad():
        equal = TokenState(x, torch.full((2, 7), 3.0), base.token_of, base.grid, 1, merged=True)
        assert torch.allclose(_block_out(blk, equal, True), _block_out(blk, equal, False), atol=1e-6)
        sizes = torch.tensor([[1.0, 1, 2, 5, 1, 1, 3]]).expand(2, -1)
        differ = TokenState(x, sizes, base.token_of, base.grid, 1, merged=True)
        assert not torch.allclose(_block_out(blk, differ, True), _block_out(blk, differ, False), atol=1e-4)


@pytest.mark.parametrize("knob", [{"r": 3}, {"r": [6, 0, 2, 1], "decoder_on_merged": True}, {"r": 2, "inflect": -1.0}])
def test_analytic_flops_equal_fvcore(model, knob):
    apply_method(model, "tome", knob)
    try:
        counted = count_gmacs(model, torch.randn(1, 3, 32, 48))
    finally:
        apply_method(model, "dense")
    assert counted == pytest.approx(tome_gmacs(model.spec, knob), rel=1e-9)


def test_decoder_on_merged_output_shape(model, img):
    apply_method(model, "tome", {"r": 4, "decoder_on_merged": True})
    try:
        with torch.no_grad():
            assert model(img).shape == (2, 5, 32, 48)
    finally:
        apply_method(model, "dense")


def test_knob_errors(model):
    with pytest.raises(ValueError, match="unknown tome knob"):
        apply_method(model, "tome", {"r": 2, "ratio": 0.5})
    with pytest.raises(ValueError, match="needs 'r'"):
        apply_method(model, "tome", {})


def test_restored_features_for_the_rank_analysis(model, img):
    from segcompress.tokens import restored_features, restored_state

    with torch.no_grad():
        dense = restored_features(model, img)
        assert torch.allclose(dense, model.forward_features(img), atol=1e-6)
        apply_method(model, "tome", {"r": 6})
        try:
            feats = restored_features(model, img)
            state = restored_state(model, img)
            pre = restored_features(model, img, final_norm=False)
        finally:
            apply_method(model, "dense")
    assert feats.shape == dense.shape == pre.shape
    assert torch.equal(feats, state.unmerge())
    # duplicated rows: at most as many distinct rows as tokens left
    assert len(torch.unique(feats[0], dim=0)) <= state.num_tokens - 1
