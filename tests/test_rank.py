"""Effective rank on matrices of known spectrum."""

import math

import pytest
import torch

from segcompress.rank import effective_rank, normalised_effective_rank, rank_divisor


def _with_singular_values(values, rows=40, cols=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(rows, rows, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, cols, generator=g, dtype=torch.float64))
    s = torch.zeros(rows, cols, dtype=torch.float64)
    for i, val in enumerate(values):
        s[i, i] = val
    return u @ s @ v.T


@pytest.mark.parametrize("k", [1, 3, 7, 12])
def test_equal_singular_values_give_the_rank(k):
    x = _with_singular_values([2.5] * k)
    assert effective_rank(x) == pytest.approx(k, rel=1e-9)


def test_known_spectrum_entropy():
    values = [3.0, 1.0]
    p = [0.75, 0.25]
    expected = math.exp(-sum(q * math.log(q) for q in p))
    assert effective_rank(_with_singular_values(values)) == pytest.approx(expected, rel=1e-9)


def test_bounds_and_duplicated_rows():
    x = torch.randn(64, 16, dtype=torch.float64)
    r = effective_rank(x)
    assert 1.0 <= r <= 16
    # merging tokens = duplicating rows of a few distinct ones: rank is capped by their number
    merged = x[:4].repeat_interleave(16, dim=0)
    assert effective_rank(merged) <= 4 + 1e-9
    assert effective_rank(merged) < r


def test_normalisations_and_centering():
    x = _with_singular_values([1.0] * 6, rows=40, cols=12)
    assert normalised_effective_rank(x, "min_dim") == pytest.approx(6 / 12)
    assert normalised_effective_rank(x, "width") == pytest.approx(6 / 12)
    assert normalised_effective_rank(x, "none") == pytest.approx(6)
    assert normalised_effective_rank(x, "reference", reference_width=24) == pytest.approx(6 / 24)
    few_rows = _with_singular_values([1.0] * 6, rows=10, cols=12)
    # min(rows, E_ref) when there are fewer rows than the reference width
    assert normalised_effective_rank(few_rows, "reference", reference_width=24) == pytest.approx(6 / 10)
    # a constant offset is one extra direction, removed by centering
    ones = torch.ones(40, 12, dtype=torch.float64)
    assert effective_rank(ones) == pytest.approx(1.0)
    assert effective_rank(ones, center=True) == 0.0
    with pytest.raises(ValueError, match="normalisation"):
        normalised_effective_rank(x, "bogus")


# (rank, width) of the features of variants ranked on the same 256 patch positions: the dense
# model (E = 64) and narrower, pruned ones. Raw order: 30 > 24 > 12 > 9 > 3.
VARIANTS = [(24, 64), (9, 16), (12, 32), (3, 8), (30, 48)]


def _variant(rank: int, width: int) -> torch.Tensor:
    return _with_singular_values([1.0] * rank, rows=256, cols=width, seed=rank)


def _order(values: list[float]) -> list[int]:
    return sorted(range(len(values)), key=lambda i: values[i], reverse=True)


def test_reference_normalisation_keeps_the_raw_order_whatever_the_widths():
    feats = [_variant(r, w) for r, w in VARIANTS]
    raw = [effective_rank(x) for x in feats]
    assert raw == pytest.approx([r for r, _ in VARIANTS], rel=1e-9)
    reference = [normalised_effective_rank(x, "reference", reference_width=64) for x in feats]
    assert _order(reference) == _order(raw)
    assert reference == pytest.approx([r / 64 for r, _ in VARIANTS], rel=1e-9)
    # the per-model normalisation divides by each model's own width and reverses pairs:
    # the pruned (9, 16) scores 0.5625, above the dense (24, 64) at 0.375
    own = [normalised_effective_rank(x, "min_dim") for x in feats]
    assert own[1] > own[0] and raw[1] < raw[0]
    assert _order(own) != _order(raw)


def test_reference_divisor_errors():
    assert rank_divisor(256, 16, "reference", 64) == 64
    with pytest.raises(ValueError, match="needs the reference"):
        rank_divisor(256, 16, "reference")
    with pytest.raises(ValueError, match="features are 64 wide but the reference is 16"):
        rank_divisor(256, 64, "reference", 16)
