"""DToP (dynamic token pruning) adapted to Segmenter: pure functions, the ATM head, the method, FLOPs."""

import pytest
import torch

from segcompress.flops import analytic_gmacs, count_gmacs
from segcompress.models import SegmenterSpec
from segcompress.tokens.dtop import (
    ATMHead, DToP, DToPConfig, atm_head_macs, compose, dtop_cost, dtop_floor_gmacs, dtop_gmacs_from_counts,
    dtop_token_counts, exit_mask, head_count, reference_split, token_confidence, write_canvas,
)
from segcompress.tokens.patch import attach
from tiny_segmenter import tiny_model, tiny_spec

torch.set_num_threads(1)

SPEC = tiny_spec(64, 8, 4)  # 8×8 patches, width 32, 5 classes, 4 blocks → heads after blocks 2 and 3


@pytest.fixture(scope="module")
def model():
    return tiny_model(SPEC)


def images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def method(threshold: float, seed: int = 0, **kw) -> DToP:
    torch.manual_seed(seed)
    return DToP(SPEC, DToPConfig(threshold=threshold, **kw)).eval()


def median_score(model, img: torch.Tensor) -> float:
    """The median first-head score over a batch (a threshold that makes about half the tokens confident)."""
    m = method(1.0)
    m.keep_outputs = True
    with torch.no_grad():
        m.run(model, img, num_blocks=m.split[0])
    return float(m.last.canvas_probs.max(dim=1).values.median())


# -- pure functions -----------------------------------------------------------------------------
def test_confidence_is_presence_times_sigmoid_max_over_classes():
    mask = torch.tensor([[[0.0, 2.0, -1.0], [1.0, -3.0, 3.0]]])  # (1, K=2, n=3)
    presence = torch.tensor([[[2.0, 0.0], [0.0, 1.0]]])  # class 0 likely present, class 1 likely absent
    score, label = token_confidence(mask, presence)
    pres = torch.tensor([torch.sigmoid(torch.tensor(2.0)), torch.sigmoid(torch.tensor(-1.0))])
    p = pres[:, None] * mask[0].sigmoid()  # (K, n)
    assert torch.allclose(score[0], p.max(0).values) and torch.equal(label[0], p.argmax(0))
    assert label[0].tolist() == [0, 0, 1]  # token 2: 0.27·0.95 > 0.88·0.27
    assert 0 < float(score.min()) and float(score.max()) < 1


def test_exit_mask_keeps_the_top_k_of_each_class_and_never_padding():
    score = torch.tensor([[0.99, 0.95, 0.97, 0.96, 0.2, 0.98, 0.94, 0.999]])
    label = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 2]])
    valid = torch.tensor([[True] * 7 + [False]])
    out = exit_mask(score, label, 0.9, keep_per_class=2, valid=valid)
    # class 0: 0.99 and 0.97 stay, 0.95 and 0.96 exit; 0.2 is not confident; class 1: both stay
    # (only two); the padding token never exits, however confident
    assert out[0].tolist() == [False, True, False, True, False, False, False, False]
    assert exit_mask(score, label, 0.9, keep_per_class=0, valid=valid)[0].tolist() == [
        True, True, True, True, False, True, True, False]
    assert not exit_mask(torch.ones(2, 8), label.expand(2, -1), 1.0, 0).any()  # threshold 1 never exits


def test_exit_mask_is_per_image_and_breaks_ties_by_position():
    score = torch.tensor([[0.95, 0.95, 0.95], [0.5, 0.95, 0.95]])
    label = torch.zeros(2, 3, dtype=torch.long)
    out = exit_mask(score, label, 0.9, keep_per_class=1)
    assert out.tolist() == [[False, True, True], [False, False, True]]


def test_atm_head_shapes_and_padding_does_not_change_real_outputs():
    torch.manual_seed(0)
    head = ATMHead(32, 5, layers=2).eval()
    assert (head.dim, head.num_heads) == (16, 1)
    x = torch.randn(2, 7, 32)
    with torch.no_grad():
        logits, presence = head(x)
        assert logits.shape == (2, 5, 7) and presence.shape == (2, 5, 2)
        padded = torch.cat([x, 100 * torch.randn(2, 4, 32)], dim=1)
        valid = torch.arange(11) < torch.tensor([7, 7])[:, None]
        pl, pp = head(padded, valid)
        assert torch.allclose(pl[..., :7], logits, atol=1e-5) and torch.allclose(pp, presence, atol=1e-5)
        # one image of a ragged batch alone: the same outputs
        ragged = torch.cat([x[:1, :5], torch.zeros(1, 2, 32)], dim=1)
        rl, rp = head(torch.cat([ragged, x[1:]]), torch.arange(7) < torch.tensor([5, 7])[:, None])
        alone_l, alone_p = head(x[:1, :5])
        assert torch.allclose(rl[0, :, :5], alone_l[0], atol=1e-5) and torch.allclose(rp[0], alone_p[0], atol=1e-5)


def test_head_count_rule():
    assert [head_count(c) for c in (16, 96, 192, 384, 512)] == [1, 3, 3, 6, 8]
    assert ATMHead(192, 150).num_heads == 3 and ATMHead(192, 150).dim == 96  # ViT-T: 3 heads of 32


@pytest.mark.parametrize(("n", "layers"), [(7, 1), (20, 3)])
def test_head_macs_formula_equals_the_traced_count(n, layers):
    head = ATMHead(48, 6, layers=layers)
    traced = count_gmacs(head, torch.randn(1, n, 48)) * 1e9
    assert traced == pytest.approx(atm_head_macs(n, 48, 6, 24, layers), rel=1e-9)


def test_reference_numbers_head_cost_and_floor():
    vit_s = SegmenterSpec(num_classes=150, img_size=512, embed_dim=384, num_heads=6)
    assert atm_head_macs(1024, 384, 150) / 1e9 == pytest.approx(0.74, abs=0.01)  # ATM head, ViT-S, full grid
    dense = analytic_gmacs(vit_s)
    floor = dtop_floor_gmacs(vit_s)
    assert dense == pytest.approx(38.6, abs=0.1) and floor == pytest.approx(18.6, abs=0.1)
    assert floor / dense == pytest.approx(0.48, abs=0.01)


def test_reference_split():
    assert reference_split(12) == [6, 8] and reference_split(24) == [8, 16]
    assert reference_split(4) == [2, 3] and reference_split(2) == [1] and reference_split(1) == []
    with pytest.raises(ValueError, match="split"):
        DToPConfig(split=[3, 3]).resolved_split(4)


def test_write_canvas_touches_only_the_alive_positions():
    canvas = torch.full((2, 3, 6), -7.0)
    values = torch.arange(2 * 3 * 4, dtype=torch.float).view(2, 3, 4)
    positions = torch.tensor([[4, 0, 2, -1], [5, 1, 3, 0]])
    valid = torch.tensor([[True, True, True, False], [True, True, False, False]])
    out = write_canvas(canvas, values, positions, valid)
    assert torch.equal(canvas, torch.full((2, 3, 6), -7.0))  # out of place
    written = torch.zeros(2, 6, dtype=torch.bool)
    written[0, [4, 0, 2]] = True
    written[1, [5, 1]] = True
    assert torch.equal(out[:, :, [4, 0, 2]][0], values[0, :, :3]) and torch.equal(out[1][:, [5, 1]], values[1, :, :2])
    assert (out.transpose(1, 2)[~written] == -7).all()


def test_compose_takes_each_patch_from_its_source_and_sums_to_one():
    torch.manual_seed(0)
    final = torch.randn(2, 4, 6).softmax(dim=1)
    canvas = torch.rand(2, 4, 6) * 0.5
    exited = torch.tensor([[True, False, True, False, False, True], [False] * 6])
    out = compose(final, canvas, exited)
    assert torch.allclose(out.sum(dim=1), torch.ones(2, 6))
    assert torch.equal(out.transpose(1, 2)[~exited], final.transpose(1, 2)[~exited])
    norm = canvas / canvas.sum(dim=1, keepdim=True)
    assert torch.allclose(out.transpose(1, 2)[exited], norm.transpose(1, 2)[exited])


# -- the method on a tiny Segmenter -------------------------------------------------------------
def test_threshold_one_is_the_dense_model(model):
    img = images(2, 0)
    m = method(1.0)
    with torch.no_grad():
        dense_features = model.forward_features(img)
        dense_masks = model.forward_masks(img)
        state = m.encode(model, img)
        masks = m.masks(model, img)
    assert torch.equal(state.unmerge(), dense_features)
    assert torch.allclose(masks.softmax(dim=1), dense_masks.softmax(dim=1), atol=1e-6)


def test_tokens_exit_after_the_split_blocks(model):
    img = images(3, 1)
    m = method(median_score(model, img))
    m.record = True
    with torch.no_grad():
        st = m.run(model, img)
    counts = torch.stack([a for a, _ in m.trace], dim=1)  # (B, depth)
    full = 1 + 64
    assert (counts[:, :2] == full).all()  # blocks 1-2 see every token
    assert (counts[:, 2] < full).all() and (counts[:, 3] <= counts[:, 2]).all()
    assert len(set(counts[:, 2].tolist())) > 1  # per-image counts (ragged, padded)
    # the first head sees every patch, the second the first head's survivors
    assert torch.equal(m.head_trace[0], torch.full((3,), 64)) and torch.equal(m.head_trace[1], counts[:, 2] - 1)
    assert torch.equal(64 - st.exited.sum(dim=1), st.tokens.token_counts() - 1)
    assert (st.exit_x.abs().sum(-1) > 0).eq(st.exited).all()  # exited patches keep their features


def test_per_image_results_do_not_depend_on_the_batch(model):
    img = images(3, 2)
    m = method(median_score(model, img))
    with torch.no_grad():
        batch = m.masks(model, img)
        feats = m.encode(model, img).x
        for i in range(3):
            alone = m.masks(model, img[i:i + 1])
            assert torch.allclose(alone, batch[i:i + 1], atol=1e-4, rtol=1e-4)
            assert torch.allclose(m.encode(model, img[i:i + 1]).x, feats[i:i + 1], atol=1e-5, rtol=1e-5)
    probs = batch.exp()
    assert torch.allclose(probs.sum(dim=1), torch.ones(3, 8, 8), atol=1e-5)


def test_traced_gmacs_equal_the_count_formula(model):
    img = images(1, 3)
    m = method(median_score(model, images(3, 3)))
    [(blocks, heads)] = dtop_token_counts(model, m, [img])
    assert blocks[-1] < 65
    attach(model, m)
    try:
        traced = count_gmacs(model, img)
    finally:
        attach(model, None)
    assert traced == pytest.approx(dtop_gmacs_from_counts(SPEC, blocks, heads, 16), rel=1e-9)
    cost = dtop_cost(model, m, [images(2, 4)])
    assert len(cost.per_image) == 2 and cost.mean < analytic_gmacs(SPEC) + 2 * atm_head_macs(64, 32, 5) / 1e9


def test_gradients_reach_the_heads_and_the_encoder(model):
    m = method(0.0, split=[2]).train()
    m.keep_outputs = True
    model.train()
    try:
        out = m.masks(model, images(2, 5))
        assert m.last.exited.any()
        out.sum().backward()
        assert m.heads[0].proj.weight.grad is not None and m.heads[0].proj.weight.grad.abs().sum() > 0
        assert model.encoder.blocks[0].mlp.fc1.weight.grad.abs().sum() > 0
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()
