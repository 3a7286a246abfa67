"""ALGM (local CLAP + global GBM) on the Segmenter encoder through the token state."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from segcompress.flops import count_gmacs
from segcompress.methods import apply_method
from segcompress.tokens.algm import (
    ALGMConfig, config_from_knob, global_merge, global_threshold, local_merge, reference_layers, window_similarity,
)
from segcompress.tokens.algm import algm_cost
from segcompress.tokens.algm import ALGM
from segcompress.tokens import patch
from segcompress.tokens.state import TokenState, split_images, stack_images, tokenwise
from tiny_segmenter import tiny_model, tiny_spec

torch.set_num_threads(1)


def smooth_images(n: int, h: int, w: int, seed: int) -> torch.Tensor:
    """Blocky images (so some windows are uniform) with different amounts of texture per image."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(n, 3, h // 16, w // 16, generator=g)
    img = F.interpolate(low, size=(h, w), mode="nearest")
    noise = torch.randn(n, 3, h, w, generator=g) * torch.linspace(0.0, 1.0, n).view(n, 1, 1, 1)
    return img + noise


@pytest.fixture(scope="module")
def model():
    return tiny_model(tiny_spec([48, 64], 8, 4))


KNOB = {"threshold": 0.5, "layers": [1, 3]}


@pytest.mark.parametrize("extra", [{}, {"prop_attn": True}, {"decoder_on_merged": False}])
def test_per_image_results_do_not_depend_on_the_batch(model, extra):
    imgs = smooth_images(4, 48, 64, seed=1)
    apply_method(model, "algm", {**KNOB, **extra})
    try:
        with torch.no_grad():
            batch = model(imgs)
            state = model.token_method.encode(model, imgs)
            assert state.counts is not None and len(set(state.counts.tolist())) > 1  # really ragged
            for i in range(4):
                alone = model(imgs[i:i + 1])
                assert torch.allclose(alone, batch[i:i + 1], atol=1e-5, rtol=1e-5)
    finally:
        apply_method(model, "dense")


def test_batch_coupled_is_the_reference_behaviour(model):
    imgs = smooth_images(4, 48, 64, seed=1)
    method = ALGM(config_from_knob({**KNOB, "batch_coupled": True}, 4, 32))
    per_image = ALGM(config_from_knob(KNOB, 4, 32))
    with torch.no_grad():
        coupled = method.encode(model, imgs)
        assert coupled.counts is None  # every image merges the batch minimum
        same = method.encode(model, imgs[:1].expand(3, -1, -1, -1))
        alone = per_image.encode(model, imgs[:1])
    assert same.num_tokens == alone.num_tokens  # identical images: coupling changes nothing


def test_padding_carries_nothing(model):
    imgs = smooth_images(3, 48, 64, seed=2)
    with torch.no_grad():
        state = ALGM(config_from_knob(KNOB, 4, 32)).encode(model, imgs)
    valid = state.valid()
    assert valid is not None
    assert state.size[~valid].eq(0).all() and torch.isfinite(state.x).all()
    assert torch.equal(state.size.sum(1), torch.full((3,), 1.0 + 48))
    assert valid.gather(1, state.token_of).all()  # no patch maps to padding


def test_per_token_layers_see_the_real_tokens_only(model):
    """tokenwise packs the real tokens of a ragged batch: same values as mapping every token, zeros
    at the padding, gradients intact; without padding it is the plain map."""
    imgs = smooth_images(3, 48, 64, seed=2)
    with torch.no_grad():
        state = ALGM(config_from_knob(KNOB, 4, 32)).encode(model, imgs, final_norm=False)
    valid, rows = state.valid(), state.real_rows()
    assert valid is not None and rows is not None and rows.numel() == int(valid.sum())
    lin = torch.nn.Linear(32, 5)
    x = state.x.clone().requires_grad_(True)
    out = tokenwise(lin, x, rows)
    assert out.shape == (3, state.num_tokens, 5)
    assert torch.allclose(out[valid], lin(state.x)[valid], atol=1e-6) and out[~valid].eq(0).all()
    out.sum().backward()
    assert x.grad[~valid].eq(0).all() and x.grad[valid].abs().sum() > 0
    dense = TokenState.from_tokens(torch.randn(2, 1 + 6 * 8, 32), (6, 8), 1)
    assert dense.real_rows() is None and torch.equal(tokenwise(lin, dense.x, None), lin(dense.x))


@pytest.mark.parametrize("prop_attn", [False, True])
def test_blocks_without_a_merge_run_each_image_on_its_own_tokens(model, prop_attn, monkeypatch):
    """On CPU a block without a merge runs each image of a ragged batch alone: its real rows equal
    the padded batch's through the same block with −∞ on the padding keys, and those of the padded
    path (the one CUDA takes), to rounding; padding rows are zeros whatever they held; gradients
    flow to the real rows only."""
    imgs = smooth_images(3, 48, 64, seed=2)
    method = ALGM(config_from_knob(KNOB, 4, 32), prop_attn=prop_attn)
    with torch.no_grad():
        state = method.encode(model, imgs, final_norm=False, num_blocks=3)
    valid = state.valid()
    assert valid is not None and len(set(state.token_counts().tolist())) > 1
    blk = model.encoder.blocks[3]
    x = state.x.masked_fill(~valid[..., None], 7.0).requires_grad_(True)  # padding holds junk
    out = method.run_blocks(model.encoder.blocks, 3, 4, state.with_x(x), set()).x
    padded = blk(x, attn_mask=state.attn_bias(prop_attn))
    assert out.shape == padded.shape
    assert torch.allclose(out[valid], padded[valid], atol=1e-5) and out[~valid].eq(0).all()
    (grad,) = torch.autograd.grad(out[valid].sum(), x)
    assert grad[valid].abs().sum() > 0 and grad[~valid].eq(0).all()
    monkeypatch.setattr(patch, "PER_IMAGE_DEVICES", ())
    with torch.no_grad():
        batched = method.run_blocks(model.encoder.blocks, 3, 4, state, set()).x
    assert torch.allclose(out[valid], batched[valid], atol=1e-5)


@pytest.mark.parametrize("prop_attn", [False, True])
def test_a_merging_block_runs_each_image_alone(model, prop_attn, monkeypatch):
    """On CPU ALGM's global merge on a ragged batch runs image by image: the same tokens per image,
    sizes and patch → token map as the padded batch (the path CUDA and ``batch_coupled`` take), to
    rounding; padding stays size 0 and zeros."""
    imgs = smooth_images(3, 48, 64, seed=2)
    method = ALGM(config_from_knob(KNOB, 4, 32), prop_attn=prop_attn)
    assert method.merges_each_image and not ALGM(config_from_knob({**KNOB, "batch_coupled": True}, 4, 32)).merges_each_image
    with torch.no_grad():
        state = method.encode(model, imgs, final_norm=False, num_blocks=2)
        assert patch.runs_per_image(state) and len(set(state.token_counts().tolist())) > 1
        alone = method.run_block(2, model.encoder.blocks[2], state, merge=True)
        monkeypatch.setattr(patch, "PER_IMAGE_DEVICES", ())
        batched = method.run_block(2, model.encoder.blocks[2], state, merge=True)
    assert alone.token_counts().tolist() == batched.token_counts().tolist()
    assert alone.token_counts().tolist() != state.token_counts().tolist()  # it merged
    valid = batched.valid()
    assert valid is not None and torch.equal(alone.valid(), valid)
    assert torch.equal(alone.token_of, batched.token_of) and torch.equal(alone.size, batched.size)
    assert torch.allclose(alone.x[valid], batched.x[valid], atol=1e-5) and alone.x[~valid].eq(0).all()


def test_split_and_stack_images_are_inverses(model):
    """A ragged state split into batches of one (real tokens only) and stacked again is the same
    state; a batch whose images hold equal counts stacks without padding."""
    imgs = smooth_images(3, 48, 64, seed=2)
    method = ALGM(config_from_knob(KNOB, 4, 32))
    with torch.no_grad():
        state = method.encode(model, imgs, final_norm=False, num_blocks=2)
    ones = split_images(state)
    assert [s.num_tokens for s in ones] == state.token_counts().tolist() and all(s.counts is None for s in ones)
    back = stack_images(ones)
    for field in ("x", "size", "token_of", "counts"):
        assert torch.equal(getattr(back, field), getattr(state, field)), field
    assert back.merged and back.grid == state.grid and back.num_prefix == state.num_prefix
    same = stack_images([ones[0], ones[0]])
    assert same.counts is None and torch.equal(same.x, ones[0].x.expand(2, -1, -1))


def test_a_ragged_stretch_runs_each_image_through_it_at_once(model):
    """Between ALGM's merges (layers 1 and 4: blocks 2 and 3 without one), each image goes through
    the stretch alone: the tokens equal those of running it block by block bit for bit, and the
    recorded counts still have one entry per block."""
    imgs = smooth_images(3, 48, 64, seed=2)
    method = ALGM(config_from_knob({**KNOB, "layers": [1, 4]}, 4, 32))
    method.record = True
    blocks = model.encoder.blocks
    with torch.no_grad():
        stretch = method.encode(model, imgs, final_norm=False, num_blocks=3)
        trace = method.trace
        assert len(trace) == 3
        state = method.encode(model, imgs, final_norm=False, num_blocks=1)
        assert patch.runs_per_image(state)
        for i in (1, 2):
            state = method.run_blocks(blocks, i, i + 1, state, set())
    assert torch.equal(stretch.x, state.x) and torch.equal(stretch.token_of, state.token_of)
    counts = state.token_counts().tolist()
    assert [c.tolist() for c, _ in trace[1:]] == [counts, counts]


@pytest.mark.parametrize("prop_attn", [False, True])
def test_the_decoder_runs_each_image_on_its_own_tokens(model, prop_attn, monkeypatch):
    """On CPU the decoder on merged tokens runs each image of a ragged batch alone: its mask logits
    equal the padded batch's (the path CUDA takes) to rounding, at every real patch token; the
    prefix and padding rows are zeros whatever the padding held; gradients reach real rows only."""
    imgs = smooth_images(3, 48, 64, seed=2)
    method = ALGM(config_from_knob(KNOB, 4, 32), prop_attn=prop_attn)
    with torch.no_grad():
        state = method.encode(model, imgs)
    valid = state.valid()
    assert valid is not None and len(set(state.token_counts().tolist())) > 1
    x = state.x.masked_fill(~valid[..., None], 7.0).requires_grad_(True)
    out = patch.decode_merged(model.decoder, state.with_x(x), prop_attn)
    patch_rows = valid.clone()
    patch_rows[:, :state.num_prefix] = False
    assert out.shape == (*state.x.shape[:2], model.decoder.num_classes)
    assert out[~patch_rows].eq(0).all()
    (grad,) = torch.autograd.grad(out[patch_rows].sum(), x)
    assert grad[patch_rows].abs().sum() > 0 and grad[~valid].eq(0).all()
    monkeypatch.setattr(patch, "PER_IMAGE_DEVICES", ())
    with torch.no_grad():
        padded = patch.decode_merged(model.decoder, state.with_x(x), prop_attn)
        assert torch.allclose(out[patch_rows], padded[patch_rows], atol=1e-5)
        monkeypatch.setattr(patch, "PER_IMAGE_DEVICES", ("cpu",))
        masks = method.masks(model, imgs)
        monkeypatch.setattr(patch, "PER_IMAGE_DEVICES", ())
        assert torch.allclose(masks, method.masks(model, imgs), atol=1e-5)


@pytest.mark.parametrize("window", [(2, 2), (3, 3), (2, 4)])
def test_window_sums_one_axis_at_a_time_are_the_joint_reduction_bit_for_bit(window):
    x = torch.randn(3, 12, 24, 16, generator=torch.Generator().manual_seed(4))
    n = x / x.norm(dim=-1, keepdim=True)
    (wh, ww), w = window, window[0] * window[1]
    s = n.reshape(3, 12 // wh, wh, 24 // ww, ww, 16).sum(dim=(2, 4))
    assert torch.equal(window_similarity(x, window), ((s * s).sum(dim=-1) - w) / (w * (w - 1)))


def test_window_similarity_matches_brute_force():
    torch.manual_seed(5)
    x = torch.randn(2, 4, 6, 8)
    sim = window_similarity(x, (2, 2))
    for b, i, j in itertools.product(range(2), range(2), range(3)):
        w = x[b, 2 * i:2 * i + 2, 2 * j:2 * j + 2].reshape(4, 8)
        pairs = [F.cosine_similarity(w[a], w[c], dim=0) for a in range(4) for c in range(4) if a != c]
        assert sim[b, i, j] == pytest.approx(float(torch.stack(pairs).mean()), abs=1e-5)


@pytest.mark.parametrize("grid", [(4, 6), (5, 7)])
def test_local_merge_extremes_and_non_square_grids(grid):
    torch.manual_seed(6)
    n = grid[0] * grid[1]
    x = torch.randn(2, 1 + n, 8)
    state = TokenState.from_tokens(x, grid, 1)
    assert local_merge(state, x, 1.01, (2, 2)) is state  # nothing similar enough
    merged = local_merge(state, x, -1.01, (2, 2))
    windows = (grid[0] // 2) * (grid[1] // 2)
    assert merged.num_tokens == 1 + n - 3 * windows
    assert torch.equal(merged.size.sum(1), torch.full((2,), 1.0 + n))
    # the first merged token is the plain mean of its window's patches
    first = merged.token_of[0] == 1
    assert int(first.sum()) == 4
    assert torch.allclose(merged.x[0, 1], x[0, 1:][first].mean(0), atol=1e-6)
    # patches outside whole windows are never merged
    rows = torch.arange(n) // grid[1]
    cols = torch.arange(n) % grid[1]
    outside = (rows >= 2 * (grid[0] // 2)) | (cols >= 2 * (grid[1] // 2))
    assert merged.size.gather(1, merged.token_of)[:, outside].eq(1).all()


def test_global_threshold_matches_the_reference_formula():
    torch.manual_seed(7)
    m = torch.rand(3, 9)
    valid = torch.ones(3, 9, dtype=torch.bool)
    valid[:, 0] = False  # the class token
    tau = global_threshold(m, valid, 5, batch_coupled=False)
    ref = m[:, 1:].mean(1) + m[:, 1:].std(1) / 5
    assert torch.allclose(tau, ref, atol=1e-6)
    coupled = global_threshold(m, valid, 5, batch_coupled=True)
    assert torch.allclose(coupled, (m[:, 1:].mean(1).mean() + m[:, 1:].std(1).mean() / 5).expand(3), atol=1e-6)


def test_global_merge_merges_above_threshold_only():
    torch.manual_seed(8)
    x = torch.randn(2, 1 + 16, 8)
    state = TokenState.from_tokens(x, (4, 4), 1)
    out = global_merge(state, x, 5)
    assert out.num_tokens < state.num_tokens
    assert torch.equal(out.size.sum(1), torch.full((2,), 17.0))


def test_reference_defaults():
    assert reference_layers(12) == [1, 5] and reference_layers(24) == [1, 7]
    c = config_from_knob({}, 12, 384)
    assert c.threshold == 0.88 and c.layers == [1, 5] and c.window == (2, 2) and not c.batch_coupled
    assert config_from_knob({"dataset": "cityscapes"}, 12, 384).threshold == 0.955
    with pytest.raises(ValueError):
        ALGMConfig(layers=[3, 2])


def test_analytic_flops_equal_fvcore_per_image(model):
    imgs = smooth_images(2, 48, 64, seed=3)
    knob = dict(KNOB)
    cost = algm_cost(model, [imgs], knob)  # one batch: per-image counts
    apply_method(model, "algm", knob)
    try:
        counted = [count_gmacs(model, imgs[i:i + 1]) for i in range(2)]
    finally:
        apply_method(model, "dense")
    assert counted == pytest.approx(cost.per_image, rel=1e-9)
    assert counted[0] != counted[1]  # input-dependent
