"""Effective rank on matrices of known spectrum."""

import math

import pytest
import torch

from segcompress.rank import effective_rank, normalised_effective_rank


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
    # a constant offset is one extra direction, removed by centering
    ones = torch.ones(40, 12, dtype=torch.float64)
    assert effective_rank(ones) == pytest.approx(1.0)
    assert effective_rank(ones, center=True) == 0.0
    with pytest.raises(ValueError, match="normalisation"):
        normalised_effective_rank(x, "bogus")
