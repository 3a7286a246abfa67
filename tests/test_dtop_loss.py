"""DToP's training losses: targets, the per-head terms, and the whole loss on a tiny Segmenter."""

import math

import pytest
import torch
import torch.nn.functional as F

from segcompress.tokens.dtop import ATMHead, DToP, DToPConfig
from segcompress.tokens.dtop_loss import (
    HeadWeights, at_label_pixels, class_targets, dice_loss, dtop_loss, dtop_loss_terms, head_canvases, head_loss,
    head_loss_terms, pixel_ce, presence_loss, sigmoid_focal_loss,
)
from segcompress.tokens.patch import attach
from tiny_segmenter import tiny_model, tiny_spec

torch.set_num_threads(1)

SPEC = tiny_spec(64, 8, 4)  # 8×8 patches, width 32, 5 classes, 4 blocks → heads after blocks 2 and 3


def images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def label_maps(n: int, seed: int, size: int = 64, ignore_share: float = 0.1) -> torch.Tensor:
    """Blocky labels over classes 0-3 (class 4 never present) with some ignored pixels."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, 4, (n, 1, 4, 4), generator=g).float()
    lab = F.interpolate(coarse, size=(size, size), mode="nearest")[:, 0].long()
    lab[torch.rand(n, size, size, generator=g) < ignore_share] = 255
    return lab


# -- targets -------------------------------------------------------------------------------------
def test_class_targets():
    labels = torch.tensor([[[0, 2], [255, 2]], [[255, 255], [255, 255]]])
    present, masks, valid = class_targets(labels, 3)
    assert present.tolist() == [[True, False, True], [False, False, False]]
    assert valid.tolist() == [[[True, True], [False, True]], [[False, False], [False, False]]]
    assert masks.shape == (2, 3, 2, 2) and masks.dtype == torch.float32
    assert masks[0, 0].tolist() == [[1, 0], [0, 0]] and masks[0, 2].tolist() == [[0, 1], [0, 1]]
    assert masks[0, 1].sum() == 0 and masks[1].sum() == 0  # ignored pixels are no class's
    with pytest.raises(ValueError, match="labels"):
        class_targets(torch.tensor([[[0, 3]]]), 3)


# -- the terms -----------------------------------------------------------------------------------
def test_presence_loss_is_the_weighted_two_way_ce():
    logits = torch.tensor([[[2.0, 0.0], [0.5, 1.5], [-1.0, 1.0]]])  # (1, K=3, 2), index 0 = present
    present = torch.tensor([[True, False, True]])
    ce = [-math.log(math.exp(2) / (math.exp(2) + 1)),  # present, target 0
          -math.log(math.exp(1.5) / (math.exp(0.5) + math.exp(1.5))),  # absent, target 1
          -math.log(math.exp(-1) / (math.exp(-1) + math.exp(1)))]  # present, target 0
    expected = (ce[0] + 0.1 * ce[1] + ce[2]) / (1 + 0.1 + 1)  # weighted mean: over the weights' sum
    assert float(presence_loss(logits, present)) == pytest.approx(expected, rel=1e-6)
    assert float(presence_loss(logits, present, absent_weight=1.0)) == pytest.approx(sum(ce) / 3, rel=1e-6)
    # an absent class predicted absent costs a tenth of a present class predicted equally badly
    flip = torch.tensor([[[0.0, 1.0]]])
    assert float(presence_loss(flip.flip(-1), torch.tensor([[False]]))) == pytest.approx(
        float(presence_loss(flip, torch.tensor([[True]]))), rel=1e-6)


def test_focal_loss_against_the_formula_on_three_pixels():
    logits = torch.tensor([[[1.0, -2.0, 0.5]]])  # one mask of 1×3 pixels
    targets = torch.tensor([[[1.0, 0.0, 0.0]]])
    expected = []
    for x, t in zip([1.0, -2.0, 0.5], [1, 0, 0]):
        p = 1 / (1 + math.exp(-x))
        p_t = p if t else 1 - p
        alpha_t = 0.25 if t else 0.75
        expected.append(-alpha_t * (1 - p_t) ** 2 * math.log(p_t))
    assert float(sigmoid_focal_loss(logits, targets)) == pytest.approx(sum(expected) / 3, rel=1e-6)
    # pixel 1 ignored: the mean over the two others
    valid = torch.tensor([[[True, False, True]]])
    assert float(sigmoid_focal_loss(logits, targets, valid)) == pytest.approx(
        (expected[0] + expected[2]) / 2, rel=1e-6)
    # γ = 0, α < 0: plain BCE
    assert float(sigmoid_focal_loss(logits, targets, alpha=-1, gamma=0)) == pytest.approx(
        float(F.binary_cross_entropy_with_logits(logits, targets)), rel=1e-6)
    # two masks: the mean of the per-mask means (a perfect second mask halves the loss)
    two = sigmoid_focal_loss(torch.cat([logits, (2 * targets - 1) * 100]), torch.cat([targets, targets]))
    assert float(two) == pytest.approx(sum(expected) / 6, rel=1e-6)


def test_dice_perfect_inverted_and_smoothing():
    targets = torch.tensor([[[1.0, 1.0, 0.0, 0.0], [0.0, 1.0, 0.0, 1.0]]])  # one 2×4 mask, 4 positives
    perfect = (2 * targets - 1) * 50
    assert float(dice_loss(perfect, targets)) == pytest.approx(0.0, abs=1e-6)
    inverted = -perfect
    assert float(dice_loss(inverted, targets)) == pytest.approx(1 - 1 / (8 + 1), abs=1e-6)  # ≈ 1
    zero = torch.zeros_like(targets)  # σ = 1/2: 1 − (2·2 + 1) / (4 + 4 + 1)
    assert float(dice_loss(zero, targets)) == pytest.approx(1 - 5 / 9, rel=1e-6)


def test_ignored_pixels_change_nothing():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 5)
    targets = (torch.rand(2, 3, 4, 5) > 0.5).float()
    valid = torch.rand(2, 1, 4, 5) > 0.3
    other_logits = torch.where(valid, logits, torch.randn_like(logits) * 10)
    other_targets = torch.where(valid, targets, 1 - targets)
    for fn in (sigmoid_focal_loss, dice_loss):
        assert torch.allclose(fn(logits, targets, valid), fn(other_logits, other_targets, valid), atol=1e-6)
    # head loss: an image whose left half is ignored costs what its right half alone costs, with
    # the mask logits sampled there (the left half's logits do not matter either)
    labels = label_maps(2, 1, size=16, ignore_share=0.0)
    labels[..., :8] = 255
    mask_logits, presence = torch.randn(2, 5, 16, 16), torch.randn(2, 5, 2)
    other = mask_logits.clone()
    other[..., :8] = torch.randn(2, 5, 16, 8) * 10
    half = head_loss(mask_logits[..., 8:], presence, labels[..., 8:])
    assert torch.allclose(head_loss(mask_logits, presence, labels), half, atol=1e-6)
    assert torch.allclose(head_loss(other, presence, labels), half, atol=1e-6)
    # all-ignored image: only presence counts (every class absent)
    empty = torch.full((1, 16, 16), 255)
    terms = head_loss_terms(mask_logits[:1], presence[:1], empty)
    assert float(terms.focal) == 0 and float(terms.dice) == 0
    assert torch.allclose(terms.presence, presence_loss(presence[:1], torch.zeros(1, 5, dtype=torch.bool)))


def test_head_loss_uses_only_present_masks_upsampled_to_the_labels():
    torch.manual_seed(1)
    labels = label_maps(2, 3, size=32)
    mask_logits, presence = torch.randn(2, 5, 4, 4), torch.randn(2, 5, 2)
    present, masks, valid = class_targets(labels, 5)
    assert not present[:, 4].any()
    up = F.interpolate(mask_logits, size=(32, 32), mode="bilinear", align_corners=False)
    sel = present  # the reference's matched pairs only
    b = sel.nonzero()[:, 0]
    v = valid[b]
    expected = (presence_loss(presence, present) + 20 * sigmoid_focal_loss(up[sel], masks[sel], v)
                + dice_loss(up[sel], masks[sel], v))
    assert torch.allclose(head_loss(mask_logits, presence, labels), expected, atol=1e-6)
    # the absent class's mask logits do not matter
    other = mask_logits.clone()
    other[:, 4] = 100.0
    assert torch.allclose(head_loss(other, presence, labels), expected, atol=1e-6)
    w = HeadWeights(2.0, 0.0, 3.0)
    t = head_loss_terms(mask_logits, presence, labels)
    assert torch.allclose(head_loss(mask_logits, presence, labels, w), 2 * t.presence + 3 * t.dice)


def test_strided_loss_pixels_equal_the_full_upsampling_sampled():
    torch.manual_seed(2)
    logits = torch.randn(2, 5, 4, 4)
    full = F.interpolate(logits, size=(32, 32), mode="bilinear", align_corners=False)
    assert torch.allclose(at_label_pixels(logits, (32, 32), 4, (1, 3)), full[..., 1::4, 3::4], atol=1e-5)
    assert torch.equal(at_label_pixels(full, (32, 32), 4, (1, 3)), full[..., 1::4, 3::4])
    labels = label_maps(2, 4, size=32)
    assert torch.allclose(pixel_ce(logits, labels, loss_stride=4, offset=(1, 3)),
                          F.cross_entropy(full[..., 1::4, 3::4], labels[:, 1::4, 3::4], ignore_index=255), atol=1e-5)


def test_gradients_reach_a_real_head():
    torch.manual_seed(3)
    head = ATMHead(32, 5, layers=2).train()
    mask, presence = head(torch.randn(2, 16, 32))
    loss = head_loss(mask.unflatten(-1, (4, 4)), presence, label_maps(2, 5, size=32))
    assert torch.isfinite(loss)
    loss.backward()
    for name in ("proj.weight", "queries", "presence.weight", "layers.1.cross_attn.k.weight",
                 "layers.1.cross_attn.q.weight", "layers.0.ffn.0.weight"):
        grad = head.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name


# -- the whole loss on a tiny Segmenter ----------------------------------------------------------
def dtop_model(threshold: float) -> tuple[torch.nn.Module, DToP]:
    model = tiny_model(SPEC, train=True)
    torch.manual_seed(0)
    m = DToP(SPEC, DToPConfig(threshold=threshold))
    m.keep_outputs = True
    attach(model, m)
    return model, m.train()


@pytest.mark.parametrize("threshold", [1.0, 0.0])
def test_dtop_loss_is_finite_and_trains_heads_decoder_and_encoder(threshold):
    model, m = dtop_model(threshold)
    labels = label_maps(2, 6)
    logits = model(images(2, 7))
    st = m.last
    assert len(st.canvases) == len(st.presence) == 2
    assert st.canvases[-1] is st.canvas
    assert bool(st.exited.any()) == (threshold < 1)
    loss = dtop_loss(st, logits, labels)
    ce, heads = dtop_loss_terms(st, logits, labels)
    assert torch.isfinite(loss) and len(heads) == 2
    assert torch.allclose(loss, ce + sum(h.total() for h in heads))
    assert torch.allclose(ce, F.cross_entropy(logits, labels, ignore_index=255))
    assert torch.allclose(dtop_loss(st, logits, labels, aux_weight=0.0), ce)
    loss.backward()
    for i in range(2):
        for name in ("proj.weight", "presence.weight", "layers.2.cross_attn.k.weight"):
            grad = m.heads[i].get_parameter(name).grad
            assert grad is not None and grad.abs().sum() > 0, (i, name)
    for p in (model.encoder.blocks[0].mlp.fc1.weight, model.encoder.blocks[3].attn.qkv.weight,
              model.decoder.cls_emb):
        assert p.grad is not None and p.grad.abs().sum() > 0
    if threshold < 1:
        # the canvas is not detached: the final CE alone trains the first head (the exited patches
        # take its probabilities), the reference's clone-not-detach
        model.zero_grad(set_to_none=True)
        logits = model(images(2, 7))
        pixel_ce(logits, labels).backward()
        grad = m.heads[0].layers[2].cross_attn.k.weight.grad
        assert grad is not None and grad.abs().sum() > 0


def test_each_head_is_judged_on_its_own_canvas():
    model, m = dtop_model(1.0)
    with torch.no_grad():
        model(images(2, 8))
    st = m.last
    assert len(st.canvases) == 2
    # at threshold 1 every head sees every patch: the canvases differ (head 0's is not the final one)
    assert not torch.allclose(st.canvases[0], st.canvases[1])
    grids = head_canvases(st)
    assert grids[0].shape == (2, 5, 8, 8)
    assert torch.equal(grids[1].flatten(2), st.canvas)
    with torch.no_grad():
        model(images(2, 9))  # a new run keeps its own canvases
    assert len(m.last.canvases) == 2 and not torch.equal(m.last.canvases[0], st.canvases[0])
