"""The one token state that ToMe, ALGM and CTS update while the encoder runs.

A :class:`TokenState` carries

* ``x`` (B, T, C): the tokens, prefix tokens (the class token) first;
* ``size`` (B, T): how many original patches each token stands for (prefix tokens: 1). Padding
  tokens, which exist only when images of one batch hold different numbers of tokens (ALGM's
  per-image merging), have size 0 and features 0;
* ``token_of`` (B, N) int64: for every original patch n (row-major on the patch grid), the index
  along dimension 1 of ``x`` of the token that now holds it. O(N) memory, never an N×N matrix.

Every reduction is expressed as a *slot assignment*: each old token names the new token it goes
to (:func:`merge_slots`); the new features are size-weighted averages (a scatter-add of ``size·x``
and ``size``, then a division), and the map is composed with one gather
(``token_of ← slot[token_of]``). Unmerging is a gather through ``token_of``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch

from segcompress.models.segmenter import grid_view


@dataclass
class TokenState:
    """Tokens with their sizes and the patch → token map.

    Args:
        x: tokens (B, T, C), the ``num_prefix`` prefix tokens first.
        size: (B, T) float token sizes in original patches; 0 marks a padding token.
        token_of: (B, N) int64 index into dim 1 of ``x`` of the token holding each original patch.
        grid: the original patch grid (rows, cols), N = rows·cols.
        num_prefix: leading tokens that are never merged (the class token).
        counts: (B,) int64 number of real (non-padding) tokens per image, or ``None`` when every
            image has all T tokens (no padding).
        merged: ``False`` while the state is still the dense grid (all sizes 1, identity map), so
            the dense code path (no attention bias) can be kept bit-exact.
    """

    x: torch.Tensor
    size: torch.Tensor
    token_of: torch.Tensor
    grid: tuple[int, int]
    num_prefix: int
    counts: torch.Tensor | None = None
    merged: bool = False

    @classmethod
    def from_tokens(cls, x: torch.Tensor, grid: tuple[int, int], num_prefix: int) -> "TokenState":
        """The dense state of embedded tokens (B, num_prefix + rows·cols, C)."""
        B, T, _ = x.shape
        n = grid[0] * grid[1]
        if T != num_prefix + n:
            raise ValueError(f"{T} tokens do not fit a {grid[0]}x{grid[1]} grid with {num_prefix} prefix token(s)")
        size = x.new_ones(B, T)
        token_of = (torch.arange(n, device=x.device) + num_prefix).expand(B, n)
        return cls(x, size, token_of, grid, num_prefix)

    @property
    def num_tokens(self) -> int:
        """T, the padded token count."""
        return int(self.x.shape[1])

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    def token_counts(self) -> torch.Tensor:
        """(B,) real tokens per image (prefix included)."""
        if self.counts is not None:
            return self.counts
        return torch.full((self.x.shape[0],), self.num_tokens, dtype=torch.long, device=self.x.device)

    def valid(self) -> torch.Tensor | None:
        """(B, T) bool mask of real tokens, or ``None`` without padding."""
        if self.counts is None:
            return None
        return torch.arange(self.num_tokens, device=self.x.device) < self.counts[:, None]

    def real_rows(self) -> torch.Tensor | None:
        """(M,) positions of the real tokens in ``x`` flattened to (B·T, C), or ``None`` without
        padding (see :func:`tokenwise`)."""
        valid = self.valid()
        return None if valid is None else valid.reshape(-1).nonzero().squeeze(1)

    def with_x(self, x: torch.Tensor) -> "TokenState":
        return replace(self, x=x)

    def attn_bias(self, prop_attn: bool) -> torch.Tensor | None:
        """Additive attention bias over keys, (B, 1, 1, T), or ``None`` when it would be all zeros.

        ``log size`` with proportional attention (padding: log 0 = -inf), otherwise 0 for real
        tokens and -inf for padding.
        """
        if not self.merged:
            return None
        if prop_attn:
            return self.size.log()[:, None, None, :].to(self.x.dtype)
        valid = self.valid()
        if valid is None:
            return None
        bias = torch.zeros_like(self.size, dtype=self.x.dtype).masked_fill(~valid, float("-inf"))
        return bias[:, None, None, :]

    def unmerge(self, x: torch.Tensor | None = None) -> torch.Tensor:
        """Per-token values restored onto the original grid: (B, N, C) = x[b, token_of[b, n]].

        Args:
            x: values per token (B, T, C); default the state's tokens.
        """
        x = self.x if x is None else x
        idx = self.token_of[..., None].expand(-1, -1, x.shape[-1])
        return x.gather(1, idx)


def merge_slots(state: TokenState, slot: torch.Tensor, num_out: int, counts: torch.Tensor | None) -> TokenState:
    """Reduce ``state`` by sending every old token to a new slot (size-weighted average).

    Args:
        state: the current state (B, T).
        slot: (B, T) int64, the new index of each old token in ``[0, num_out)``; several old tokens
            naming one slot are merged; -1 drops a token (only for padding, which carries nothing).
        num_out: the new padded token count.
        counts: (B,) new real-token counts, or ``None`` if every image has ``num_out`` tokens.

    Returns:
        The new state: x' = Σ size·x / Σ size per slot, size' = Σ size, token_of' = slot[token_of].
        Empty slots (padding) get x' = 0 and size' = 0.
    """
    B, T, C = state.x.shape
    rows = B * num_out
    base = torch.arange(B, device=slot.device)[:, None] * num_out
    flat = torch.where(slot >= 0, slot + base, torch.full_like(slot, rows)).reshape(-1)  # -1 → trash row
    size = state.size
    weighted = (state.x * size[..., None].to(state.x.dtype)).reshape(B * T, C)
    # index_put_ with accumulate is a scatter-add; on CPU it is several times faster than index_add_.
    x_sum = state.x.new_zeros(rows + 1, C).index_put_((flat,), weighted, accumulate=True)[:rows].view(B, num_out, C)
    size_sum = size.new_zeros(rows + 1).index_put_((flat,), size.reshape(-1), accumulate=True)[:rows].view(B, num_out)
    x_new = x_sum / size_sum.clamp_min(1e-6)[..., None].to(x_sum.dtype)
    token_of = slot.gather(1, state.token_of)
    if counts is not None and bool((counts == num_out).all()):
        counts = None
    return TokenState(x_new, size_sum, token_of, state.grid, state.num_prefix, counts, merged=True)


def split_images(state: TokenState) -> list[TokenState]:
    """Each image of the batch as a state of its own (batch 1), on its real tokens only."""
    return [
        TokenState(state.x[b:b + 1, :n], state.size[b:b + 1, :n], state.token_of[b:b + 1], state.grid,
                   state.num_prefix, None, state.merged)
        for b, n in enumerate(state.token_counts().tolist())
    ]


def stack_images(states: list[TokenState]) -> TokenState:
    """One batch from single-image states (the inverse of :func:`split_images`): padded to the
    largest image with size-0, zero tokens, ``counts`` set when the images differ."""
    counts = [s.num_tokens for s in states]
    first = states[0]
    merged = any(s.merged for s in states)
    token_of = torch.cat([s.token_of for s in states])
    if len(set(counts)) == 1:
        return TokenState(torch.cat([s.x for s in states]), torch.cat([s.size for s in states]), token_of,
                          first.grid, first.num_prefix, None, merged)
    T = max(counts)
    x = first.x.new_zeros(len(states), T, first.x.shape[-1])
    size = first.size.new_zeros(len(states), T)
    for b, s in enumerate(states):
        x[b, :counts[b]] = s.x[0]
        size[b, :counts[b]] = s.size[0]
    return TokenState(x, size, token_of, first.grid, first.num_prefix,
                      torch.tensor(counts, dtype=torch.long, device=x.device), merged)


def tokenwise(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """``fn`` (a per-token map: LayerNorm, a linear layer, an MLP) on the real tokens of ``x`` only.

    With padding (``rows`` from :meth:`TokenState.real_rows`) the real tokens of every image are
    packed into one (M, C) matrix, mapped, and scattered back into (B, T, C') with zeros at the
    padding, so images that kept fewer tokens cost no more than their own tokens (ALGM's per-image
    merging pads a batch to its largest image). Without padding it is ``fn(x)``.
    """
    if rows is None:
        return fn(x)
    B, T, C = x.shape
    y = fn(x.reshape(B * T, C).index_select(0, rows))
    return y.new_zeros(B * T, y.shape[-1]).index_copy(0, rows, y).view(B, T, -1)


def cumulative_index(mask: torch.Tensor) -> torch.Tensor:
    """Position of each True entry among the True entries of its row (0-based; junk where False)."""
    return mask.long().cumsum(dim=-1) - 1


def restore_grid(state: TokenState, values: torch.Tensor | None = None) -> torch.Tensor:
    """Values on the patch grid, (B, C, rows, cols), from per-token values (B, T, C).

    A channels-last view (:func:`~segcompress.models.segmenter.grid_view`), like the decoder's masks.

    With ``values=None`` the state's own tokens are restored (the encoder features the rank
    analysis needs, every patch carrying the feature of the token that holds it).
    """
    return grid_view(state.unmerge(values), state.grid)
