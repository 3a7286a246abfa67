"""Effective rank (Roy & Vetterli, EUSIPCO 2007) of encoder features.

For a matrix X with singular values σ₁ ≥ … ≥ σ_Q, p_k = σ_k / Σ σ_i and
erank(X) = exp(−Σ p_k ln p_k), with 0 ln 0 = 0; 1 ≤ erank(X) ≤ rank(X) ≤ Q = min(m, n).

The study takes it on the final encoder features restored onto the original token grid (every
patch position gets the feature of the token that holds it), so duplicated rows from merging can
only lower it. Choices the paper leaves open are options (defaults in config.yaml):
  * ``normalise``: ``"min_dim"`` divides by min(rows, width) (default; the width is the model's own
    E′, so pruned and merged models are comparable), ``"width"`` by the feature width, ``"none"``.
  * ``center``: subtract the mean feature before the SVD (default off).
"""

from __future__ import annotations

from typing import Literal

import torch

Normalise = Literal["min_dim", "width", "none"]


def effective_rank(x: torch.Tensor, center: bool = False) -> float:
    """Entropy effective rank of a 2-D matrix (computed in float64)."""
    if x.dim() != 2:
        raise ValueError(f"effective_rank needs a 2-D matrix, got shape {tuple(x.shape)}")
    x = x.detach().to(torch.float64)
    if center:
        x = x - x.mean(dim=0, keepdim=True)
    s = torch.linalg.svdvals(x)
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def normalised_effective_rank(x: torch.Tensor, normalise: Normalise = "min_dim", center: bool = False) -> float:
    """:func:`effective_rank` divided as ``normalise`` says (see the module docstring)."""
    erank = effective_rank(x, center=center)
    if normalise == "min_dim":
        return erank / min(x.shape)
    if normalise == "width":
        return erank / x.shape[1]
    if normalise == "none":
        return erank
    raise ValueError(f"unknown rank normalisation {normalise!r}; choose min_dim, width or none")
