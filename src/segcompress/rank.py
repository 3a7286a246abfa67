"""Effective rank (Roy & Vetterli, EUSIPCO 2007) of encoder features.

For a matrix X with singular values σ₁ ≥ … ≥ σ_Q, p_k = σ_k / Σ σ_i and
erank(X) = exp(−Σ p_k ln p_k), with 0 ln 0 = 0; 1 ≤ erank(X) ≤ rank(X) ≤ Q = min(m, n).

The study takes it on the final encoder features restored onto the original token grid (every
patch position gets the feature of the token that holds it), so duplicated rows from merging can
only lower it. Choices the paper leaves open are options (defaults in config.yaml):
  * ``normalise``: what the raw erank is divided by (:func:`rank_divisor`):
      - ``"reference"`` (default): min(rows, E_ref), E_ref the width of a fixed reference model (the
        study's dense model). The divisor is the same for every variant ranked on the same windows,
        so the normalised values order the variants exactly as their raw effective ranks do.
      - ``"min_dim"``: min(rows, E′), E′ the ranked model's own width. A pruned model with a
        narrower embedding is divided by less, so it can score above a model whose raw erank is
        higher (at E′ = 16 a raw 8.9 gives 0.56; at E′ = 64 a raw 24.7 gives 0.39).
      - ``"width"``: E′ (the same caveat); ``"none"``: the raw erank.
  * ``center``: subtract the mean feature before the SVD (default off).
"""

from __future__ import annotations

from typing import Literal

import torch

Normalise = Literal["reference", "min_dim", "width", "none"]
NORMALISATIONS: tuple[str, ...] = ("reference", "min_dim", "width", "none")


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


def rank_divisor(rows: int, width: int, normalise: Normalise, reference_width: int | None = None) -> float:
    """What the raw erank of a ``rows`` × ``width`` matrix is divided by (see the module docstring).

    Args:
        rows: rows of the feature matrix (patch positions on the original grid).
        width: its width E′ (the ranked model's own).
        normalise: ``reference``, ``min_dim``, ``width`` or ``none``.
        reference_width: E_ref, the reference (dense) model's width; needed by ``reference`` and
            never narrower than ``width``.
    """
    if normalise == "reference":
        if reference_width is None or reference_width < 1:
            raise ValueError("rank normalisation 'reference' needs the reference (dense) model's width, "
                             f"got {reference_width!r}")
        if width > reference_width:
            raise ValueError(f"rank normalisation 'reference': the features are {width} wide but the reference is "
                             f"{reference_width}; the reference must be the dense model the variants come from")
        return float(min(rows, reference_width))
    if normalise == "min_dim":
        return float(min(rows, width))
    if normalise == "width":
        return float(width)
    if normalise == "none":
        return 1.0
    raise ValueError(f"unknown rank normalisation {normalise!r}; choose {', '.join(NORMALISATIONS)}")


def normalised_effective_rank(x: torch.Tensor, normalise: Normalise = "reference", center: bool = False,
                              reference_width: int | None = None) -> float:
    """:func:`effective_rank` divided by :func:`rank_divisor` of ``x``'s shape."""
    erank = effective_rank(x, center=center)
    return erank / rank_divisor(x.shape[0], x.shape[1], normalise, reference_width)
