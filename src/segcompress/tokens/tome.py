"""ToMe: token merging by bipartite soft matching (Bolya et al., ICLR 2023), as pure functions.

Per block, between the attention residual and the MLP: split the tokens alternately into A (even
positions) and B (odd positions), score every A token against every B token by the cosine
similarity of the head-averaged attention keys, protect the prefix (class) tokens, and merge the r
A tokens with the highest best-match score into their best B partner (size-weighted average). The
new order is [prefix tokens, unmerged A tokens in their old order, B tokens], as in the reference.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from segcompress.flops import analytic_gmacs, bipartite_match_macs
from segcompress.methods.tome import ToMeSettings, schedule
from segcompress.models.spec import SegmenterSpec
from segcompress.tokens.cost import NUM_PREFIX, decoder_tokens
from segcompress.tokens.patch import TokenMethod
from segcompress.tokens.state import TokenState, cumulative_index, merge_slots

RSchedule = int | tuple[int, float] | list[int]


def parse_r(num_layers: int, r: RSchedule) -> list[int]:
    """Per-layer r from the reference's three forms.

    Args:
        num_layers: encoder depth.
        r: an int (the same r in every layer); a pair ``(r, inflect)`` (a linear ramp from
            ``r·(1 − inflect)`` to ``r·(1 + inflect)``; inflect −1 is the paper's decreasing
            schedule 2r → 0); or a list of per-layer values (zero-padded to ``num_layers``).
    """
    if isinstance(r, list):
        values = [int(v) for v in r]
        if len(values) > num_layers:
            raise ValueError(f"r schedule has {len(values)} entries for {num_layers} layers")
        if any(v < 0 for v in values):
            raise ValueError(f"r schedule has a negative entry: {values}")
        return values + [0] * (num_layers - len(values))
    inflect = 0.0
    if isinstance(r, tuple):
        r, inflect = r
    r = int(r)
    if r < 0:
        raise ValueError(f"r must be >= 0, got {r}")
    lo = int(r * (1.0 - inflect))
    hi = 2 * r - lo
    step = (hi - lo) / max(num_layers - 1, 1)
    return [int(lo + step * i) for i in range(num_layers)]


def effective_r(r: int, num_tokens: int, num_prefix: int) -> int:
    """r capped at ⌊(T − protected)/2⌋ (the most a bipartite split can merge)."""
    return int(max(0, min(int(r), (int(num_tokens) - num_prefix) // 2)))


def bipartite_scores(metric: torch.Tensor, num_prefix: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Cosine scores (B, ⌈T/2⌉, ⌊T/2⌋) between A = even and B = odd tokens of ``metric`` (B, T, c).

    Prefix tokens are protected (their A row or B column is −∞), as are padding tokens
    (``valid`` False).
    """
    metric = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    a, b = metric[:, ::2], metric[:, 1::2]
    scores = a @ b.transpose(-1, -2)
    T = metric.shape[1]
    neg = -math.inf
    pos = torch.arange(T, device=metric.device)
    blocked_a = pos[::2] < num_prefix
    blocked_b = pos[1::2] < num_prefix
    if valid is not None:
        blocked_a = blocked_a | ~valid[:, ::2]
        blocked_b = blocked_b | ~valid[:, 1::2]
        return scores.masked_fill(blocked_a[..., :, None] | blocked_b[..., None, :], neg)
    return scores.masked_fill(blocked_a[:, None] | blocked_b[None, :], neg)


def bipartite_slots(
        node_idx: torch.Tensor,
        is_src: torch.Tensor,
        num_tokens: int,
        num_prefix: int,
        valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Slot assignment of a bipartite merge: [prefix, unmerged A (old order), B (old order)].

    Args:
        node_idx: (B, |A|) best B partner of each A token.
        is_src: (B, |A|) bool, A tokens merged into their partner (never a prefix or padding token).
        num_tokens: T.
        num_prefix: prefix tokens (kept first, in order).
        valid: (B, T) real-token mask, or ``None`` without padding.

    Returns:
        (slot (B, T), counts (B,)) for :func:`~segcompress.tokens.state.merge_slots`; padding
        tokens get slot −1.
    """
    B = node_idx.shape[0]
    device = node_idx.device
    pos = torch.arange(num_tokens, device=device)
    pos_a, pos_b = pos[::2], pos[1::2]
    pre_a, pre_b = (pos_a < num_prefix).expand(B, -1), (pos_b < num_prefix).expand(B, -1)
    valid_a = valid[:, ::2] if valid is not None else torch.ones_like(pre_a)
    valid_b = valid[:, 1::2] if valid is not None else torch.ones_like(pre_b)
    keep_a = valid_a & ~pre_a & ~is_src
    keep_b = valid_b & ~pre_b
    n_keep_a = keep_a.sum(dim=1, keepdim=True)
    slot_a = torch.where(pre_a, pos_a.expand(B, -1), num_prefix + cumulative_index(keep_a))
    slot_b = torch.where(pre_b, pos_b.expand(B, -1), num_prefix + n_keep_a + cumulative_index(keep_b))
    slot_b = torch.where(valid_b, slot_b, torch.full_like(slot_b, -1))
    slot_a = torch.where(is_src, slot_b.gather(1, node_idx), slot_a)
    slot_a = torch.where(valid_a, slot_a, torch.full_like(slot_a, -1))
    slot = torch.empty(B, num_tokens, dtype=torch.long, device=device)
    slot[:, ::2] = slot_a
    slot[:, 1::2] = slot_b
    counts = num_prefix + n_keep_a[:, 0] + keep_b.sum(dim=1)
    return slot, counts


def merge_top_r(
        state: TokenState,
        node_max: torch.Tensor,
        node_idx: torch.Tensor,
        r: torch.Tensor | int,
) -> TokenState:
    """Merge the ``r`` A tokens with the highest ``node_max`` into their partner ``node_idx``.

    ``r`` is an int (every image) or a (B,) tensor (per image; the result is padded).
    """
    order = node_max.argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    r_b = r[:, None] if isinstance(r, torch.Tensor) else r
    is_src = rank < r_b
    valid = state.valid()
    slot, counts = bipartite_slots(node_idx, is_src, state.num_tokens, state.num_prefix, valid)
    num_out = int(counts.max()) if (isinstance(r, torch.Tensor) or valid is not None) else state.num_tokens - int(r)
    return merge_slots(state, slot, num_out, counts)


def bipartite_soft_matching(state: TokenState, metric: torch.Tensor, r: int) -> TokenState:
    """One ToMe merge: the ``r`` most similar A tokens join their best B partner.

    Args:
        state: current tokens (no padding; ToMe merges the same r in every image).
        metric: (B, T, c) matching features, e.g. attention keys averaged over heads.
        r: tokens to remove; capped at ⌊(T − prefix)/2⌋. r = 0 returns ``state`` unchanged.
    """
    if state.counts is not None:
        raise ValueError("ToMe merges the same number of tokens per image; the state is padded")
    r = effective_r(r, state.num_tokens, state.num_prefix)
    if r == 0:
        return state
    with torch.no_grad():
        scores = bipartite_scores(metric, state.num_prefix)
        node_max, node_idx = scores.max(dim=-1)
    return merge_top_r(state, node_max, node_idx, r)


def head_mean_keys(k: torch.Tensor) -> torch.Tensor:
    """ToMe's metric: keys (B, h, T, d) averaged over heads → (B, T, d)."""
    return k.mean(dim=1)


def token_schedule(r_list: Sequence[int], num_tokens: int, num_prefix: int) -> tuple[list[int], list[int], list[int]]:
    """Tokens in/out per block and the effective r per block for a ToMe schedule (input-independent)."""
    t_in, t_out, eff = [], [], []
    t = num_tokens
    for r in r_list:
        e = effective_r(r, t, num_prefix)
        t_in.append(t)
        t -= e
        t_out.append(t)
        eff.append(e)
    return t_in, t_out, eff


class ToMe(TokenMethod):
    """ToMe in every block with r > 0 (metric: attention keys averaged over heads).

    Args:
        r: per-layer schedule, see :func:`~segcompress.tokens.tome.parse_r`.
        depth: encoder depth.
        prop_attn: proportional attention (reference default: on).
        decoder_on_merged: decoder on merged tokens (default: :class:`~segcompress.methods.tome.ToMeSettings`'s).
    """

    name = "tome"

    def __init__(self, r: RSchedule, depth: int, prop_attn: bool = ToMeSettings.prop_attn,
                 decoder_on_merged: bool = ToMeSettings.decoder_on_merged):
        super().__init__(prop_attn, decoder_on_merged)
        self.r_spec = r
        self.r = parse_r(depth, r)

    def merge_blocks(self, depth: int) -> set[int]:
        return {i for i, r in enumerate(self.r) if r > 0}

    def merge(self, index: int, state: TokenState, keys: torch.Tensor) -> TokenState:
        return bipartite_soft_matching(state, head_mean_keys(keys), self.r[index])

    def knob(self) -> dict[str, Any]:
        r: Any = self.r_spec
        out: dict[str, Any] = {}
        if isinstance(r, tuple):
            r, out["inflect"] = r
        return {"r": r, **out, **super().knob()}


def tome_gmacs(spec: SegmenterSpec, knob: dict[str, Any]) -> float:
    """GFLOPs of ToMe at ``knob``: fewer tokens after every merge, plus the A·Bᵀ matching matmul."""
    n = spec.grid[0] * spec.grid[1]
    t_in, t_out, eff = token_schedule(parse_r(spec.depth, schedule(knob)), NUM_PREFIX + n, NUM_PREFIX)
    match = [bipartite_match_macs(t, spec.block_dims(i).qk_dim) if e > 0 else 0.0
             for i, (t, e) in enumerate(zip(t_in, eff))]
    return analytic_gmacs(
        spec, tokens_in=t_in, tokens_out=t_out, match_macs=match,
        decoder_tokens=decoder_tokens(spec, t_out[-1], bool(knob.get("decoder_on_merged", ToMeSettings.decoder_on_merged))),
    )
