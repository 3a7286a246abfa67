"""ToFu: token fusion (Kim et al., WACV 2024), as pure functions and a thin token method.

ToFu keeps ToMe's bipartite soft matching (:mod:`~segcompress.tokens.tome`: A = even, B = odd
tokens, cosine of the head-averaged keys, the class token protected, the r best A tokens join their
best B partner, new order [prefix, unmerged A, B]) and changes only what a matched group becomes:

* **prune** (:func:`prune_merge`): the src tokens are dropped and their dst partner keeps its
  features unchanged. The dst's size still grows by the src sizes and the src's patches map to the
  dst (its nearest duplicate) through ``token_of``, so unmerging gives them the dst's features.
* **merge** with MLERP (:func:`mlerp_merge`): for a group G (one dst and every src merged into it)
  with sizes sᵢ,

  m = Σ sᵢ·xᵢ / Σ sᵢ,    x_new = m / ‖m‖ · max_{i∈G} ‖xᵢ‖,

  the direction of ToMe's size-weighted mean with the group's largest norm (averaging vectors that
  are not parallel shrinks the norm; MLERP keeps the norm distribution). Norms are taken in fp32
  with an epsilon on ‖m‖.

In both modes the sizes, the patch → token map and the token counts are exactly ToMe's, so the
GFLOPs are ToMe's at the same r (:func:`tofu_gmacs`; MLERP's norms are O(N·d) element-wise work,
which the fvcore convention does not count). Tokens outside a group are kept bit-exactly.

Which layers prune and which merge is a choice made here, not taken from a reference (the paper
has no public code): 0-based blocks i ≤ depth//2 prune and later blocks merge (blocks 0–6 prune and
7–11 merge for 12 blocks). The first merging block is the knob ``switch`` (default depth//2 + 1).
Proportional attention and the decoder's input (restored grid or merged tokens) follow ToMe's
settings and defaults.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Literal, NamedTuple

import torch

from segcompress.methods.tofu import ToFuSettings
from segcompress.models.spec import SegmenterSpec
from segcompress.tokens import tome as tome_fn
from segcompress.tokens.patch import TokenMethod
from segcompress.tokens.state import TokenState, merge_slots

Mode = Literal["prune", "merge"]
MLERP_EPS = 1e-6


class Match(NamedTuple):
    """One bipartite match, as slots for :func:`~segcompress.tokens.state.merge_slots`.

    ``slot`` (B, T): new index of every old token; ``is_src`` (B, T): the tokens merged into a
    partner (the r chosen A tokens); ``num_out``: T − r.
    """

    slot: torch.Tensor
    is_src: torch.Tensor
    num_out: int


def match_slots(state: TokenState, metric: torch.Tensor, r: int) -> Match | None:
    """ToMe's matching and slot assignment (:func:`~segcompress.tokens.tome.bipartite_soft_matching`).

    Args:
        state: current tokens (no padding: the same r is removed in every image).
        metric: (B, T, c) matching features.
        r: tokens to remove, capped at ⌊(T − prefix)/2⌋.

    Returns:
        The match, or ``None`` when nothing is removed (r = 0 after the cap).
    """
    if state.counts is not None:
        raise ValueError("ToFu merges the same number of tokens per image; the state is padded")
    T, p = state.num_tokens, state.num_prefix
    r = tome_fn.effective_r(r, T, p)
    if r == 0:
        return None
    with torch.no_grad():
        node_max, node_idx = tome_fn.bipartite_scores(metric, p).max(dim=-1)
        order = node_max.argsort(dim=-1, descending=True, stable=True)  # the same top r as ToMe's
        top = order[:, :r]
        src_a = torch.zeros_like(node_max, dtype=torch.bool).scatter_(1, top, torch.ones_like(top, dtype=torch.bool))
        slot, _ = tome_fn.bipartite_slots(node_idx, src_a, T, p)
    is_src = torch.zeros_like(slot, dtype=torch.bool)
    is_src[:, ::2] = src_a
    return Match(slot, is_src, T - r)


def _kept_tokens(match: Match) -> torch.Tensor:
    """(B, num_out) old index of the one non-src token of every slot (a dst, an unmerged A or a prefix)."""
    B, T = match.slot.shape
    keep = ~match.is_src
    old = torch.arange(T, device=match.slot.device).expand(B, T)
    kept = torch.empty(B, match.num_out, dtype=torch.long, device=match.slot.device)
    return kept.scatter_(1, match.slot[keep].view(B, -1), old[keep].view(B, -1))


def _gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))


def group_max_norm(x: torch.Tensor, slot: torch.Tensor, num_out: int) -> torch.Tensor:
    """(B, num_out) fp32: the largest ‖xᵢ‖ among the old tokens of ``x`` (B, T, C) sent to each slot."""
    norms = x.float().norm(dim=-1)
    return norms.new_zeros(slot.shape[0], num_out).scatter_reduce_(1, slot, norms, "amax", include_self=False)


def mlerp(mean: torch.Tensor, max_norm: torch.Tensor, eps: float = MLERP_EPS) -> torch.Tensor:
    """MLERP of groups given their size-weighted means (B, T, C) and largest norms (B, T).

    Returns ``mean / max(‖mean‖, eps) · max_norm`` in ``mean``'s dtype (the arithmetic in fp32).
    """
    m = mean.float()
    scale = max_norm.float() / m.norm(dim=-1).clamp_min(eps)
    return (m * scale[..., None]).to(mean.dtype)


def mlerp_merge(state: TokenState, metric: torch.Tensor, r: int) -> TokenState:
    """One ToFu merge: ToMe's matching, every matched group fused by MLERP.

    Sizes, the patch → token map and the token order are those of
    :func:`~segcompress.tokens.tome.bipartite_soft_matching`; tokens that merge with nothing are
    kept bit-exactly. r = 0 returns ``state`` unchanged.
    """
    match = match_slots(state, metric, r)
    if match is None:
        return state
    mean = merge_slots(state, match.slot, match.num_out, None)
    fused = mlerp(mean.x, group_max_norm(state.x, match.slot, match.num_out))
    members = torch.zeros_like(mean.size).scatter_add_(1, match.slot, torch.ones_like(state.size))
    single = (members == 1)[..., None]
    return mean.with_x(torch.where(single, _gather_tokens(state.x, _kept_tokens(match)), fused))


def prune_merge(state: TokenState, metric: torch.Tensor, r: int) -> TokenState:
    """One ToFu prune: ToMe's matching, the src tokens dropped, their dst kept bit-exactly.

    The dst's size grows by the src sizes and the src's patches map to the dst, so unmerging gives
    them the dst's features. r = 0 returns ``state`` unchanged.
    """
    match = match_slots(state, metric, r)
    if match is None:
        return state
    pruned = merge_slots(state, match.slot, match.num_out, None)  # sizes and map as ToMe's
    return replace(pruned, x=_gather_tokens(state.x, _kept_tokens(match)))


def default_switch(depth: int) -> int:
    """The first merging block by default: depth//2 + 1 (blocks i ≤ depth//2 prune)."""
    return depth // 2 + 1


def layer_modes(depth: int, switch: int | None = None) -> list[Mode]:
    """Per 0-based block: ``"prune"`` before block ``switch``, ``"merge"`` from it on.

    Args:
        depth: encoder depth.
        switch: first merging block in ``[0, depth]`` (0: MLERP everywhere; depth: pruning
            everywhere); default :func:`default_switch`.
    """
    switch = default_switch(depth) if switch is None else int(switch)
    if not 0 <= switch <= depth:
        raise ValueError(f"ToFu switch must be in 0..{depth}, got {switch}")
    return ["prune" if i < switch else "merge" for i in range(depth)]


def default_modes(depth: int) -> list[Mode]:
    """The default per-block modes: prune in blocks i ≤ depth//2, MLERP after."""
    return layer_modes(depth)


class ToFu(TokenMethod):
    """ToFu in every block with r > 0: pruning before block ``switch``, MLERP merging from it.

    Args:
        r: per-layer schedule, see :func:`~segcompress.tokens.tome.parse_r`.
        depth: encoder depth.
        switch: first merging block (default depth//2 + 1), see :func:`layer_modes`.
        prop_attn: proportional attention (default: :class:`~segcompress.methods.tofu.ToFuSettings`'s).
        decoder_on_merged: decoder on merged tokens (default: ToFuSettings's).
    """

    name = "tofu"

    def __init__(self, r: tome_fn.RSchedule, depth: int, switch: int | None = None,
                 prop_attn: bool = ToFuSettings.prop_attn, decoder_on_merged: bool = ToFuSettings.decoder_on_merged):
        super().__init__(prop_attn, decoder_on_merged)
        self.r_spec = r
        self.r = tome_fn.parse_r(depth, r)
        self.modes = layer_modes(depth, switch)
        self.switch = default_switch(depth) if switch is None else int(switch)

    def merge_blocks(self, depth: int) -> set[int]:
        return {i for i, r in enumerate(self.r) if r > 0}

    def merge(self, index: int, state: TokenState, keys: torch.Tensor) -> TokenState:
        reduce = prune_merge if self.modes[index] == "prune" else mlerp_merge
        return reduce(state, tome_fn.head_mean_keys(keys), self.r[index])

    def knob(self) -> dict[str, Any]:
        r: Any = self.r_spec
        out: dict[str, Any] = {}
        if isinstance(r, tuple):
            r, out["inflect"] = r
        return {"r": r, **out, "switch": self.switch, **super().knob()}


def tofu_gmacs(spec: SegmenterSpec, knob: dict[str, Any]) -> float:
    """GFLOPs of ToFu at ``knob``: ToMe's at the same r (same matching matmul and token counts).

    ``decoder_on_merged`` defaults to :class:`ToFu`'s default, as when the knob builds the method.
    """
    tome_knob = {k: v for k, v in knob.items() if k in ("r", "inflect")}
    tome_knob["decoder_on_merged"] = bool(knob.get("decoder_on_merged", ToFuSettings.decoder_on_merged))
    return tome_fn.tome_gmacs(spec, tome_knob)
