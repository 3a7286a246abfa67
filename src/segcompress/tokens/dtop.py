"""DToP: dynamic token pruning (Tang et al., ICCV 2023), adapted to Segmenter.

Light auxiliary heads after some encoder blocks predict, per patch token, how confident they are
of its class; confident tokens *exit*: their prediction is final at that stage and they skip the
later blocks. A canvas keeps, for every patch, the logits of the last head that saw it, so an
exited patch keeps those of its exit head. Per class among the exiting tokens' labels, the k most
confident stay alive as context. Decisions are per image (cost depends on the input).

The reference implementation (``zbwxp/Dynamic-Token-Pruning``) ships only SegViT (ATM decoder)
configs; this is an **adaptation to Segmenter**. Choices, where the reference is silent or does
not apply:

* **Class token.** Kept in the encoder (Segmenter's weights expect it); it never exits and the
  heads do not see it. The reference drops it (``with_cls_token=False``).
* **Heads** (:class:`ATMHead`): the reference's ``PruneHead``: LayerNorm(Linear(E→C)), K learned
  class queries, ``layers`` post-norm decoder layers (query self-attention, cross-attention to the
  alive tokens, ReLU FFN of width 4C, dropout 0.1 as ``nn.TransformerDecoderLayer``), mask logits =
  the last cross-attention's scaled pre-softmax logits averaged over heads (B, K, n), presence =
  Linear(C→2) on the final queries, index 0 = present (the reference's last logit is "no
  object"). C = E/2; heads of width 64, but at least 3 heads where C is divisible by 3
  (:func:`head_count`: ViT-T 96 → 3 × 32, ViT-S 192 → 3, ViT-B 384 → 6, ViT-L 512 → 8). A batch
  is run padded, with −∞ on padding keys (the reference loops over images).
* **Split** (:func:`reference_split`): heads after blocks [6, 8] (1-based) of 12 (the ViT-B
  config), [8, 16] of 24 (ViT-L); other depths: [⌊d/2⌋, max(⌊d/2⌋+1, ⌊2d/3⌋)], dropping entries
  that are not before the last block (depth 4 → [2, 3], 2 → [1]). Every head may prune; the
  final head is Segmenter's decoder.
* **Exit rule** (:func:`exit_mask`): score > threshold exits; per exiting class the
  ``keep_per_class`` (reference: 5) highest scores stay; equal scores: lower position stays first.
  Decided under ``no_grad``. Threshold ≥ 1 never exits (scores are ≤ 1).
* **Removal.** Exited tokens are gathered out of the sequence per image (survivors first, in
  their order; images pad to the batch's largest count, −∞ attention bias, as ALGM; on CPU the
  blocks then run image by image, :func:`~segcompress.tokens.patch.per_image_blocks`). The reference
  scatters survivors back into zeros; here an exited token's feature at its exit moment is kept
  for the grid features (:meth:`DToP.encode`, the rank analysis) instead of zeros.
* **Final composition** (:func:`compose`): Segmenter's decoder has no presence branch, so the
  reference's output (the final head's presence × sigmoid(canvas)) does not exist. Instead, per
  patch, survivors take the decoder's softmax (the decoder runs on the survivors only) and exited
  patches take their exit head's p(c,t) normalised over c. :meth:`DToP.masks` returns the log of
  these probabilities (logits whose softmax is the composition; at threshold 1 the dense model's
  log-softmax), which ``Segmenter.forward`` upsamples bilinearly.
* **Weights.** The heads are registered submodules of :class:`DToP` (they train with the model);
  once attached, they are part of the Segmenter's parameters and state dict (``token_method.*``),
  unlike CTS's frozen policy net.
* **Cost**: heads always run (also at threshold 1, as in the reference); GFLOPs per image from
  its per-block token counts (:func:`dtop_gmacs_from_counts`, heads in ``extra_macs``).
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from segcompress.flops import analytic_gmacs
from segcompress.models.segmenter import grid_view
from segcompress.models.spec import SegmenterSpec
from segcompress.tokens.cost import NUM_PREFIX, Cost
from segcompress.tokens.patch import TokenMethod, decode_merged
from segcompress.tokens.state import TokenState, cumulative_index, tokenwise

KEEP_PER_CLASS = 5  # hard-coded in the reference's prune_head.py
DEFAULT_THRESHOLD = 0.9  # reference ViT-B (ViT-L: 0.95)
HEAD_LAYERS = 3
PRESENT = 0  # index of "present" in the presence logits


# -- the auxiliary head -------------------------------------------------------------------------
def head_count(dim: int) -> int:
    """Attention heads of an ATM head of width ``dim``: width 64 (C // 64), at least 3 where C is
    divisible by 3, at least 1, lowered until it divides C."""
    h = max(dim // 64, 3 if dim % 3 == 0 else 1, 1)
    while dim % h:
        h -= 1
    return h


def _init_linear_norm(m: nn.Module) -> None:
    """The reference's init: Linear truncated normal (std 0.02, bias 0), LayerNorm (1, 0)."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


class HeadAttention(nn.Module):
    """Multi-head attention of ``query`` on ``memory`` with explicit matmuls (q, k, v, proj: C→C).

    Also returns the scaled pre-softmax logits averaged over heads (B, Q, n), the ATM mask logits.
    """

    def __init__(self, dim: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"head width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.q, self.k, self.v, self.proj = (nn.Linear(dim, dim) for _ in range(4))
        self.attn_drop = nn.Dropout(dropout)

    def forward(self, query: torch.Tensor, memory: torch.Tensor,
                bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Args:
            query: (B, Q, C).
            memory: (B, n, C).
            bias: additive bias over keys (B, 1, 1, n) (−∞ at padding), or ``None``.

        Returns:
            (output (B, Q, C), logits (B, Q, n) averaged over heads, without the bias).
        """
        B, Q, C = query.shape
        n, h = memory.shape[1], self.heads
        q = self.q(query).view(B, Q, h, C // h).transpose(1, 2)
        k = self.k(memory).view(B, n, h, C // h).transpose(1, 2)
        v = self.v(memory).view(B, n, h, C // h).transpose(1, 2)
        logits = (q @ k.transpose(-2, -1)) * self.scale  # (B, h, Q, n)
        attn = self.attn_drop((logits if bias is None else logits + bias).softmax(dim=-1))
        out = (attn @ v).transpose(1, 2).reshape(B, Q, C)
        return self.proj(out), logits.mean(dim=1)


class ATMLayer(nn.Module):
    """Post-norm decoder layer: query self-attention, cross-attention to the tokens, ReLU FFN (4C)."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.self_attn = HeadAttention(dim, heads, dropout)
        self.cross_attn = HeadAttention(dim, heads, dropout)
        self.ffn = nn.Sequential(nn.Linear(dim, 4 * dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(4 * dim, dim))
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, q: torch.Tensor, memory: torch.Tensor,
                bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(queries (B, K, C), cross-attention logits (B, K, n))."""
        q = self.norm1(q + self.drop(self.self_attn(q, q)[0]))
        out, logits = self.cross_attn(q, memory, bias)
        q = self.norm2(q + self.drop(out))
        return self.norm3(q + self.drop(self.ffn(q))), logits


class ATMHead(nn.Module):
    """DToP's auxiliary head (an ATM head) on the alive patch tokens.

    Args:
        embed_dim: encoder width E.
        num_classes: K (one learned query per class, fixed matching).
        dim: head width C (default E // 2).
        heads: attention heads (default :func:`head_count`).
        layers: decoder layers (reference: 3).
        dropout: dropout in the layers while training (reference: 0.1).
    """

    def __init__(self, embed_dim: int, num_classes: int, dim: int | None = None, heads: int | None = None,
                 layers: int = HEAD_LAYERS, dropout: float = 0.1) -> None:
        super().__init__()
        dim = embed_dim // 2 if dim is None else int(dim)
        heads = head_count(dim) if heads is None else int(heads)
        self.embed_dim, self.num_classes, self.dim, self.num_heads = embed_dim, num_classes, dim, heads
        self.proj = nn.Linear(embed_dim, dim)
        self.proj_norm = nn.LayerNorm(dim)
        self.layers = nn.ModuleList(ATMLayer(dim, heads, dropout) for _ in range(layers))
        self.presence = nn.Linear(dim, 2)
        self.queries = nn.Parameter(torch.randn(num_classes, dim))  # nn.Embedding's N(0, 1), as the reference
        self.apply(_init_linear_norm)

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Args:
            x: patch tokens (B, n, E), class token dropped.
            valid: (B, n) bool, False at padding (ignored as keys), or ``None``.

        Returns:
            (mask logits (B, K, n), presence logits (B, K, 2)); mask logits at padding are junk.
        """
        memory = self.proj_norm(self.proj(x))
        bias = None
        if valid is not None:
            # an image without any real token (possible only with keep_per_class 0) gets no mask
            keep = valid | ~valid.any(dim=1, keepdim=True)
            bias = torch.zeros_like(valid, dtype=x.dtype).masked_fill(~keep, float("-inf"))[:, None, None, :]
        q = self.queries.expand(x.shape[0], -1, -1)
        logits = x.new_zeros(x.shape[0], self.num_classes, x.shape[1])
        for layer in self.layers:
            q, logits = layer(q, memory, bias)
        return logits, self.presence(q)


def atm_head_macs(n: float, embed_dim: int, num_classes: int, dim: int | None = None,
                  layers: int = HEAD_LAYERS) -> float:
    """Counted MACs of one :class:`ATMHead` on ``n`` tokens (fvcore convention, LayerNorm 5/element).

    n·E·C + 5nC (projection, its norm) + layers·(14KC² + 2nC² + 2KnC + 2K²C + 15KC) + 2KC:
    per layer self-attention 4KC² + 2K²C, cross-attention 2KC² (q, proj) + 2nC² (k, v) + 2KnC,
    FFN 8KC², three norms 15KC; presence 2KC.
    """
    C = embed_dim // 2 if dim is None else dim
    K, E = num_classes, embed_dim
    layer = 14 * K * C * C + 2 * n * C * C + 2 * K * n * C + 2 * K * K * C + 15 * K * C
    return n * E * C + 5 * n * C + layers * layer + 2 * K * C


# -- pure functions ------------------------------------------------------------------------------
def class_probs(mask_logits: torch.Tensor, presence_logits: torch.Tensor) -> torch.Tensor:
    """p(c,t) = softmax(presence)[c, present] · sigmoid(mask logit[c, t]), (B, K, n)."""
    return presence_logits.softmax(dim=-1)[..., PRESENT, None] * mask_logits.sigmoid()


def token_confidence(mask_logits: torch.Tensor, presence_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (score (B, n), label (B, n)): max and argmax over classes of :func:`class_probs`."""
    return class_probs(mask_logits, presence_logits).max(dim=1)


def exit_mask(score: torch.Tensor, label: torch.Tensor, threshold: float, keep_per_class: int = KEEP_PER_CLASS,
              valid: torch.Tensor | None = None) -> torch.Tensor:
    """(B, n) bool: the tokens that exit.

    A token is confident when ``score > threshold`` (and ``valid``); confident tokens exit, except
    that for every label among them the ``keep_per_class`` highest-scoring ones stay (equal
    scores: the lower position stays). Padding (``valid`` False) never exits.
    """
    conf = score > threshold
    if valid is not None:
        conf = conf & valid
    if keep_per_class <= 0 or not bool(conf.any()):
        return conf
    n = score.shape[1]
    by_score = score.sort(dim=1, descending=True, stable=True).indices
    lab = torch.where(conf, label, torch.full_like(label, -1)).gather(1, by_score)
    by_label = lab.sort(dim=1, stable=True).indices
    order = by_score.gather(1, by_label)  # grouped by label, each group by descending score
    grouped = lab.gather(1, by_label)
    pos = torch.arange(n, device=score.device).expand_as(grouped)
    starts = torch.ones_like(grouped, dtype=torch.bool)
    starts[:, 1:] = grouped[:, 1:] != grouped[:, :-1]
    first = torch.where(starts, pos, torch.zeros_like(pos)).cummax(dim=1).values
    rank = torch.empty_like(pos).scatter_(1, order, pos - first)  # rank within its label group
    return conf & (rank >= keep_per_class)


def _scatter_rows(target: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
                  mask: torch.Tensor | None = None) -> torch.Tensor:
    """``target`` (B, N, C) with row ``positions[b, i]`` replaced by ``values[b, i]`` where ``mask``
    (and the position is ≥ 0); out of place, differentiable."""
    B, N, C = target.shape
    ok = positions >= 0 if mask is None else mask & (positions >= 0)
    idx = torch.where(ok, positions, torch.full_like(positions, N))  # the rest goes to a trash row
    out = torch.cat([target, target.new_zeros(B, 1, C)], dim=1)
    return out.scatter(1, idx[..., None].expand(-1, -1, C), values.to(target.dtype))[:, :N]


def write_canvas(canvas: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
                 valid: torch.Tensor | None = None) -> torch.Tensor:
    """The canvas (B, K, N) with the per-token ``values`` (B, K, n) written at the patches
    ``positions`` (B, n) of the real tokens (``valid``, positions ≥ 0); every other patch keeps its
    value. Out of place (the reference's clone), so gradients reach every head."""
    return _scatter_rows(canvas.transpose(1, 2), values.transpose(1, 2), positions, valid).transpose(1, 2)


def compose(final_probs: torch.Tensor, canvas_probs: torch.Tensor, exited: torch.Tensor,
            eps: float = 1e-12) -> torch.Tensor:
    """Per-patch class probabilities (B, K, N).

    Args:
        final_probs: the decoder's softmax over classes on the grid (B, K, N) (survivors).
        canvas_probs: p(c,t) of each patch's last head (B, K, N).
        exited: (B, N) bool, patches that exited.

    Survivors take ``final_probs``; exited patches ``canvas_probs`` normalised over c.
    """
    exit_p = canvas_probs / canvas_probs.sum(dim=1, keepdim=True).clamp_min(eps)
    return torch.where(exited[:, None], exit_p, final_probs)


def drop_tokens(state: TokenState, patch_of: torch.Tensor, leave: torch.Tensor) -> tuple[TokenState, torch.Tensor]:
    """Remove the tokens ``leave`` (B, T) from ``state``, per image.

    Survivors move to the front in their order; images pad to the largest count (size 0, zeros).
    ``patch_of`` (B, T): patch index of each token (−1: prefix, padding), compacted alike. The new
    ``token_of`` maps a removed token's patches to the class token (a placeholder: DToP keeps
    exited patches apart).
    """
    B, T, C = state.x.shape
    valid = state.valid()
    keep = ~leave if valid is None else valid & ~leave
    counts = keep.sum(dim=1)
    num_out = int(counts.max())
    order = (~keep).to(torch.uint8).sort(dim=1, stable=True).indices[:, :num_out]
    real = torch.arange(num_out, device=counts.device) < counts[:, None]
    x = state.x.gather(1, order[..., None].expand(-1, -1, C)) * real[..., None].to(state.x.dtype)
    size = state.size.gather(1, order) * real.to(state.size.dtype)
    new_patch_of = torch.where(real, patch_of.gather(1, order), torch.full_like(order, -1))
    new_index = cumulative_index(keep)
    token_of = torch.where(keep.gather(1, state.token_of), new_index.gather(1, state.token_of),
                           torch.zeros_like(state.token_of))
    out_counts = None if bool((counts == num_out).all()) else counts
    return TokenState(x, size, token_of, state.grid, state.num_prefix, out_counts, merged=True), new_patch_of


def reference_split(depth: int) -> list[int]:
    """1-based blocks after which a head runs: [6, 8] of 12, [8, 16] of 24; else ⌊d/2⌋ and
    max(⌊d/2⌋+1, ⌊2d/3⌋), each before the last block (e.g. 4 → [2, 3], 2 → [1], 1 → [])."""
    if depth >= 24:
        split = [depth // 3, 2 * depth // 3]
    else:
        first = max(1, depth // 2)
        split = [first, max(first + 1, 2 * depth // 3)]
    return [s for s in split if s < depth]


# -- the method ----------------------------------------------------------------------------------
@dataclass
class DToPConfig:
    """DToP settings.

    Args:
        threshold: exit threshold on max_c p(c,t) (reference: 0.9 ViT-B, 0.95 ViT-L; ≥ 1 never exits).
        split: 1-based blocks after which a head runs; ``None``: :func:`reference_split`.
        keep_per_class: most confident exiting tokens per class that stay (reference: 5).
        head_dim: head width C; ``None``: E // 2.
        head_layers: decoder layers per head (reference: 3).
        head_dropout: dropout in the heads while training (reference: 0.1).
        aux_weight: weight of every head's loss while the model trains with DToP attached
            (reference: 1.0).
    """

    threshold: float = DEFAULT_THRESHOLD
    split: list[int] | None = None
    keep_per_class: int = KEEP_PER_CLASS
    head_dim: int | None = None
    head_layers: int = HEAD_LAYERS
    head_dropout: float = 0.1
    aux_weight: float = 1.0

    def resolved_split(self, depth: int) -> list[int]:
        """The split for ``depth`` blocks, checked: increasing, each in [1, depth − 1]."""
        split = reference_split(depth) if self.split is None else [int(s) for s in self.split]
        if any(b <= a for a, b in zip(split, split[1:])) or any(not 1 <= s < depth for s in split):
            raise ValueError(f"DToP split {split} must be increasing 1-based blocks before the last of {depth}")
        return split


@dataclass
class DToPState:
    """The encoder's run under DToP.

    Args:
        tokens: the alive tokens (class token, survivors, padding).
        patch_of: (B, T) patch index of each alive token (−1: class token, padding).
        exited: (B, N) bool, patches that exited.
        exit_x: (B, N, E) features of exited patches at their exit (zeros elsewhere).
        canvas: (B, K, N) mask logits of each patch's last head (zeros before the first head).
        canvas_probs: (B, K, N) p(c,t) of each patch's last head.
        presence: presence logits (B, K, 2) of every head that ran.
        canvases: the canvas (B, K, N) right after each head ran (the heads' mask losses).
        head_tokens: (B,) patch tokens each head saw.
    """

    tokens: TokenState
    patch_of: torch.Tensor
    exited: torch.Tensor
    exit_x: torch.Tensor
    canvas: torch.Tensor
    canvas_probs: torch.Tensor
    presence: list[torch.Tensor] = field(default_factory=list)
    canvases: list[torch.Tensor] = field(default_factory=list)
    head_tokens: list[torch.Tensor] = field(default_factory=list)


class DToP(TokenMethod):
    """DToP on a Segmenter: heads after the split blocks, exits, the canvas, the composition.

    The heads are registered submodules (trained with the model); ``record`` fills ``trace`` (per
    block (alive tokens in, out), class token included) and ``head_trace`` (patches per head);
    ``keep_outputs`` (and any run with gradients, or in training mode) keeps the last run's
    :class:`DToPState` in ``last`` for the heads' losses; :meth:`training_loss` takes it.

    Args:
        spec: the Segmenter's spec (width, classes, depth).
        config: settings.
    """

    name = "dtop"

    def __init__(self, spec: SegmenterSpec, config: DToPConfig | None = None) -> None:
        super().__init__(prop_attn=False, decoder_on_merged=True)
        self.config = config or DToPConfig()
        self.split = self.config.resolved_split(spec.depth)
        c = self.config
        self.heads = nn.ModuleList(
            ATMHead(spec.embed_dim, spec.num_classes, c.head_dim, layers=c.head_layers, dropout=c.head_dropout)
            for _ in self.split
        )
        self.head_trace: list[torch.Tensor] = []
        self.keep_outputs = False
        self.last: DToPState | None = None

    def run(self, model: nn.Module, img: torch.Tensor, num_blocks: int | None = None) -> DToPState:
        """The encoder blocks (no final norm) with the heads and exits, up to ``num_blocks``."""
        tokens = self.start(model, img)
        B, T, E = tokens.x.shape
        p, N, K = tokens.num_prefix, tokens.num_patches, model.spec.num_classes
        patch_of = torch.cat([torch.full((p,), -1, device=img.device), torch.arange(N, device=img.device)])
        z = tokens.x.new_zeros(B, K, N)
        st = DToPState(tokens, patch_of.expand(B, -1), torch.zeros(B, N, dtype=torch.bool, device=img.device),
                       tokens.x.new_zeros(B, N, E), z, z)
        blocks = model.encoder.blocks
        end = len(blocks) if num_blocks is None else min(num_blocks, len(blocks))
        self.trace, self.head_trace = [], []
        start = 0
        for head, after in zip(self.heads, self.split):  # the blocks up to each head, the head, ...
            if after > end:
                break
            st.tokens = self.run_blocks(blocks, start, after, st.tokens, set())
            self.exit_step(head, st)
            start = after
        st.tokens = self.run_blocks(blocks, start, end, st.tokens, set())  # ... and the rest
        if self.keep_outputs or self.training or torch.is_grad_enabled():
            self.last = st
        return st

    def exit_step(self, head: ATMHead, st: DToPState) -> None:
        """One head on the alive patches: write the canvases, then remove the exiting tokens."""
        tokens = st.tokens
        p = tokens.num_prefix
        valid = tokens.valid()
        vp = None if valid is None else valid[:, p:]
        pos = st.patch_of[:, p:]
        logits, presence = head(tokens.x[:, p:], vp)
        probs = class_probs(logits, presence)
        st.canvas = write_canvas(st.canvas, logits, pos, vp)
        st.canvases.append(st.canvas)
        st.canvas_probs = write_canvas(st.canvas_probs, probs, pos, vp)
        st.presence.append(presence)
        seen = torch.full_like(pos[:, 0], pos.shape[1]) if vp is None else vp.sum(dim=1)
        st.head_tokens.append(seen)
        if self.record:
            self.head_trace.append(seen)
        with torch.no_grad():
            score, label = probs.max(dim=1)
            leave = exit_mask(score, label, self.config.threshold, self.config.keep_per_class, vp)
        if not bool(leave.any()):
            return
        B, N = st.exited.shape
        st.exited = st.exited | _scatter_rows(st.exited[..., None].new_zeros(B, N, 1), leave[..., None], pos,
                                              leave)[..., 0]
        st.exit_x = _scatter_rows(st.exit_x, tokens.x[:, p:], pos, leave)
        st.tokens, st.patch_of = drop_tokens(tokens, st.patch_of, F.pad(leave, (p, 0)))

    def grid_tokens(self, st: DToPState) -> torch.Tensor:
        """(B, p + N, E): the prefix tokens, then every patch's feature (survivors: current; exited:
        at exit)."""
        t = st.tokens
        grid = _scatter_rows(st.exit_x, t.x[:, t.num_prefix:], st.patch_of[:, t.num_prefix:])
        return torch.cat([t.x[:, :t.num_prefix], grid], dim=1)

    def encode(self, model: nn.Module, img: torch.Tensor, num_blocks: int | None = None,
               final_norm: bool = True) -> TokenState:
        """The dense-grid state of every patch's feature (exited ones at their exit), final norm
        on all unless ``final_norm=False``; after ``num_blocks`` blocks if given."""
        st = self.run(model, img, num_blocks)
        x = self.grid_tokens(st)
        if final_norm and num_blocks is None:
            x = model.encoder.norm(x)
        return TokenState.from_tokens(x, st.tokens.grid, st.tokens.num_prefix)

    def masks(self, model: nn.Module, img: torch.Tensor) -> torch.Tensor:
        """Log of the composed class probabilities on the grid (B, K, gh, gw): the decoder on the
        survivors, exited patches from the canvas (:func:`compose`)."""
        st = self.run(model, img)
        t = st.tokens
        p = t.num_prefix
        x = tokenwise(model.encoder.norm, t.x, t.real_rows())
        logits = decode_merged(model.decoder, t.with_x(x), prop_attn=False)[:, p:]  # (B, T - p, K)
        valid = t.valid()
        final = _scatter_rows(logits.new_zeros(logits.shape[0], t.num_patches, logits.shape[-1]),
                              logits.softmax(dim=-1), st.patch_of[:, p:], None if valid is None else valid[:, p:])
        probs = compose(final.transpose(1, 2), st.canvas_probs, st.exited)
        return grid_view(probs.clamp_min(torch.finfo(probs.dtype).tiny).log().transpose(1, 2), t.grid)

    def training_loss(self, labels: torch.Tensor, loss_stride: int = 1,
                      offset: tuple[int, int] = (0, 0)) -> torch.Tensor | None:
        """``aux_weight`` · Σ heads' losses of the last run (the reference's auxiliary terms; the
        trainer adds the segmentation loss of the composed output)."""
        from segcompress.tokens.dtop_loss import head_canvases, head_loss

        st, self.last = self.last, None  # the state (and its graph) is not kept past the step
        if st is None or not st.presence:
            return None
        terms = [head_loss(c, p, labels, loss_stride=loss_stride, offset=offset)
                 for c, p in zip(head_canvases(st), st.presence)]
        return self.config.aux_weight * torch.stack(terms).sum()

    def knob(self) -> dict[str, Any]:
        c = self.config
        return {"threshold": c.threshold, "split": list(self.split), "keep_per_class": c.keep_per_class,
                "head_dim": self.heads[0].dim if len(self.heads) else c.head_dim, "head_layers": c.head_layers}


# -- the heads' file ------------------------------------------------------------------------------
#: what a heads file records of the architecture (checked on load)
HEADS_SHAPE_KEYS = ("split", "head_dim", "head_layers", "embed_dim", "num_classes")


def heads_shape(method: DToP, spec: SegmenterSpec) -> dict[str, Any]:
    dim = method.heads[0].dim if len(method.heads) else method.config.head_dim
    return {"split": list(method.split), "head_dim": dim, "head_layers": method.config.head_layers,
            "embed_dim": spec.embed_dim, "num_classes": spec.num_classes}


def save_heads(method: DToP, spec: SegmenterSpec, path: str | Path, metadata: dict[str, Any] | None = None) -> None:
    """Write the heads' weights (safetensors, atomically) with their shape and ``metadata``."""
    from segcompress.io import write_safetensors

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: DToP heads path must end in .safetensors")
    state = {k: v.detach().contiguous().cpu() for k, v in method.heads.state_dict().items()}
    meta = {"method": "dtop", **heads_shape(method, spec), **(metadata or {})}
    write_safetensors(path, state, {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()})


def load_heads(method: DToP, spec: SegmenterSpec, path: str | Path) -> None:
    """Load trained heads into ``method``; a file of another split or width is refused by name."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: DToP heads not found (train them with `segcompress policy --method dtop`)")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("method") != "dtop":
        raise ValueError(f"{path}: not a DToP heads file (its metadata says method={meta.get('method')!r})")
    want = heads_shape(method, spec)
    have = {k: json.loads(meta[k]) if k in meta else None for k in HEADS_SHAPE_KEYS}
    wrong = [f"{k} {have[k]} (settings: {want[k]})" for k in HEADS_SHAPE_KEYS if have[k] != want[k]]
    if wrong:
        raise ValueError(f"{path}: heads trained for another setting: " + ", ".join(wrong)
                         + "; retrain them with `segcompress policy --method dtop` or change methods.dtop")
    method.heads.load_state_dict(load_file(str(path), device=str(next(method.heads.parameters()).device)
                                           if len(method.heads) else "cpu"))


# -- cost ----------------------------------------------------------------------------------------
def dtop_gmacs_from_counts(spec: SegmenterSpec, tokens_per_block: Sequence[float], head_tokens: Sequence[float],
                           head_dim: int | None = None, head_layers: int = HEAD_LAYERS) -> float:
    """GFLOPs of one image under DToP.

    Args:
        spec: the architecture.
        tokens_per_block: alive tokens entering each block (class token included); no block
            changes its count (exits happen between blocks).
        head_tokens: patch tokens each head saw.
        head_dim: head width C (default E // 2).
        head_layers: layers per head.

    The decoder runs on the survivors of the last block; the heads count through ``extra_macs``.
    """
    t = [float(v) for v in tokens_per_block]
    heads = sum(atm_head_macs(n, spec.embed_dim, spec.num_classes, head_dim, head_layers) for n in head_tokens)
    return analytic_gmacs(spec, tokens_in=t, tokens_out=t, decoder_tokens=t[-1] - NUM_PREFIX, extra_macs=heads)


def dtop_floor_gmacs(spec: SegmenterSpec, split: Sequence[int] | None = None, survivors: int = 50,
                     head_dim: int | None = None, head_layers: int = HEAD_LAYERS) -> float:
    """The lowest GFLOPs DToP reaches: every patch but ``survivors`` exits at the first head."""
    split = reference_split(spec.depth) if split is None else list(split)
    n = spec.grid[0] * spec.grid[1]
    if not split:
        return dtop_gmacs_from_counts(spec, [NUM_PREFIX + n] * spec.depth, [], head_dim, head_layers)
    alive = min(survivors, n)
    t = [NUM_PREFIX + (n if i < split[0] else alive) for i in range(spec.depth)]
    return dtop_gmacs_from_counts(spec, t, [n] + [alive] * (len(split) - 1), head_dim, head_layers)


@torch.no_grad()
def dtop_token_counts(model: nn.Module, method: DToP,
                      images: Iterable[torch.Tensor]) -> list[tuple[list[int], list[int]]]:
    """Per-image (alive tokens entering each block, patches each head saw) under ``method``.

    Runs the encoder only (the counts do not depend on the decoder); batches run as given
    (decisions are per image).
    """
    was_training, method_training, record = model.training, method.training, method.record
    model.eval()
    method.eval()
    method.record = True
    out: list[tuple[list[int], list[int]]] = []
    try:
        for batch in images:
            method.run(model, batch)
            blocks = torch.stack([a for a, _ in method.trace], dim=1).tolist()
            heads = torch.stack(method.head_trace, dim=1).tolist() if method.head_trace else [[]] * len(blocks)
            out.extend(zip(blocks, heads))
    finally:
        method.record = record
        model.train(was_training)
        method.train(method_training)
    return out


def dtop_cost(model: nn.Module, method: DToP, images: Iterable[torch.Tensor]) -> Cost:
    """Mean and population std of DToP's GFLOPs over images (each counted as at batch 1)."""
    c = method.config
    dim = method.heads[0].dim if len(method.heads) else c.head_dim
    per_image = [dtop_gmacs_from_counts(model.spec, t, h, dim, c.head_layers)
                 for t, h in dtop_token_counts(model, method, images)]
    if not per_image:
        raise ValueError("DToP FLOPs need at least one image")
    std = statistics.pstdev(per_image) if len(per_image) > 1 else 0.0
    return Cost(statistics.fmean(per_image), std, per_image)
