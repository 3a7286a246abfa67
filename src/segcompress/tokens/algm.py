"""ALGM: adaptive local-then-global merging (Norouzi et al., CVPR 2024), as pure functions.

Two encoder blocks merge, between the attention residual and the MLP, with the residual-stream
tokens ``x`` as the metric:

* **CLAP** (first selected block): tile the patch grid into windows (2×2 by default); a window whose
  mean pairwise cosine similarity (over ordered pairs i≠j) is ≥ τ becomes one token, the mean of
  its patches. New order: [prefix, merged windows by descending similarity, the other patches in
  raster order], as in the reference.
* **GBM** (second selected block, layer number ℓ, 1-based): ToMe's alternate bipartite split on
  ``x``; every A token whose best-match score m_i is ≥ τ_g = mean(m) + std(m)/ℓ merges into its
  partner (size-weighted). The class token is left out of the statistics.

Per image by default: each image merges its own windows and uses its own τ_g, so results never
depend on the other images of a batch; images then hold different token counts, which the state
pads (size 0, −∞ attention bias). ``batch_coupled=True`` reproduces the reference instead: every
image merges the batch minimum count, and τ_g uses the batch means of mean(m) and std(m).

Non-square grids work; rows/columns that do not fill a whole window are never merged locally.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from segcompress.flops import analytic_gmacs, bipartite_match_macs
from segcompress.models.spec import SegmenterSpec
from segcompress.tokens.cost import Cost, decoder_tokens
from segcompress.tokens.patch import TokenMethod
from segcompress.tokens.state import TokenState, cumulative_index, merge_slots
from segcompress.tokens.tome import bipartite_scores, merge_top_r

#: reference local thresholds τ by (dataset, backbone width) (the algm-segmenter repository's TRAINING.md and README).
REFERENCE_THRESHOLDS: dict[tuple[str, int], float] = {
    ("ade20k", 192): 0.90,
    ("ade20k", 384): 0.88,
    ("ade20k", 768): 0.94,
    ("ade20k", 1024): 0.95,
    ("cityscapes", 384): 0.955,
}
DEFAULT_THRESHOLD = 0.88  # segm/train.py default


@dataclass
class ALGMConfig:
    """ALGM settings.

    Args:
        threshold: τ of the local stage (lower merges more windows).
        layers: the two merging blocks, 1-based as in the reference (``[1, 5]``; ``[1, 7]`` for
            24-block ViT-L). The second number is also ℓ in the global threshold.
        window: local window (rows, cols), 2×2 by default.
        batch_coupled: reference behaviour (batch-minimum r, batch-mean global threshold).
        global_scale: multiplies the std term of τ_g (1 = reference).
    """

    threshold: float = DEFAULT_THRESHOLD
    layers: list[int] = field(default_factory=lambda: [1, 5])
    window: tuple[int, int] = (2, 2)
    batch_coupled: bool = False
    global_scale: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.window, int):
            self.window = (self.window, self.window)
        self.window = (int(self.window[0]), int(self.window[1]))
        if self.window[0] * self.window[1] < 2:
            raise ValueError(f"ALGM window must hold at least 2 patches, got {self.window}")
        self.layers = [int(v) for v in self.layers]
        if len(self.layers) != 2 or self.layers[0] < 1 or self.layers[1] <= self.layers[0]:
            raise ValueError(f"ALGM layers must be two increasing 1-based block numbers, got {self.layers}")


def reference_layers(depth: int) -> list[int]:
    """The reference's merging blocks: 1 and 5 (ViT-T/S/B, 12 blocks), 1 and 7 (ViT-L, 24 blocks).

    Shallower (test) encoders use 1 and min(5, depth).
    """
    if depth >= 24:
        return [1, 7]
    return [1, max(2, min(5, depth))]


def reference_threshold(embed_dim: int, dataset: str | None = None) -> float:
    """The reference τ for a backbone width on a dataset (``ade20k``/``cityscapes``), else 0.88."""
    return REFERENCE_THRESHOLDS.get(((dataset or "ade20k").lower(), embed_dim), DEFAULT_THRESHOLD)


def config_from_knob(knob: dict[str, Any], depth: int, embed_dim: int) -> ALGMConfig:
    """An :class:`ALGMConfig` from a knob dict; missing entries take the reference defaults."""
    return ALGMConfig(
        threshold=float(knob.get("threshold", reference_threshold(embed_dim, knob.get("dataset")))),
        layers=list(knob.get("layers") or reference_layers(depth)),
        window=knob.get("window") or 2,
        batch_coupled=bool(knob.get("batch_coupled", False)),
        global_scale=float(knob.get("global_scale", 1.0)),
    )


def window_similarity(patches: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
    """Mean pairwise cosine similarity of each window, (B, Gh, Gw), from grid tokens (B, gh, gw, C).

    Mean over ordered pairs i≠j of the w = wh·ww tokens: (‖Σ nᵢ‖² − w) / (w(w−1)) with nᵢ the
    L2-normalised tokens, O(N·C) and without a similarity matrix. Only whole windows count.
    """
    B, gh, gw, C = patches.shape
    wh, ww = window
    Gh, Gw = gh // wh, gw // ww
    n = patches[:, :Gh * wh, :Gw * ww]
    n = n / n.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    # one axis at a time, the same sums bit for bit: one reduction over the two strided window axes ran
    # 18x slower on CPU (43 against 2.4 ms for ViT-S/16's 32×32 grid, batch 8, one thread)
    s = n.reshape(B, Gh, wh, Gw, ww, C).sum(dim=4).sum(dim=2)
    w = wh * ww
    return ((s * s).sum(dim=-1) - w) / (w * (w - 1))


def window_index(grid: tuple[int, int], window: tuple[int, int], device: torch.device) -> torch.Tensor:
    """(N,) window number (row-major over whole windows) of each patch, −1 outside whole windows."""
    gh, gw = grid
    wh, ww = window
    Gh, Gw = gh // wh, gw // ww
    rows = torch.arange(gh, device=device)[:, None]
    cols = torch.arange(gw, device=device)[None, :]
    inside = (rows < Gh * wh) & (cols < Gw * ww)
    win = (rows // wh) * Gw + cols // ww
    return torch.where(inside, win, torch.full_like(win, -1)).reshape(-1)


def local_merge(state: TokenState, metric: torch.Tensor, threshold: float, window: tuple[int, int],
                batch_coupled: bool = False) -> TokenState:
    """CLAP: merge every window whose mean pairwise cosine similarity is ≥ ``threshold``.

    Args:
        state: the dense grid state (no merge before this one).
        metric: (B, T, C) the residual-stream tokens.
        threshold: τ.
        window: (rows, cols).
        batch_coupled: every image merges its top-r windows, r = the batch minimum count.
    """
    if state.merged:
        raise ValueError("ALGM's local merge needs the tokens still on the grid (it must be the first merge)")
    p = state.num_prefix
    gh, gw = state.grid
    B, T, C = metric.shape
    with torch.no_grad():
        sim = window_similarity(metric[:, p:].reshape(B, gh, gw, C), window).reshape(B, -1)  # (B, W)
        W = sim.shape[1]
        if W == 0:
            return state
        order = sim.argsort(dim=1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(W, device=sim.device).expand(B, -1))
        r = (sim >= threshold).sum(dim=1)  # (B,)
        if batch_coupled:
            r = r.min().expand(B)
        if int(r.max()) == 0:
            return state
        win = window_index(state.grid, window, sim.device)  # (N,)
        win_c = win.clamp_min(0).expand(B, -1)
        merged = (win >= 0) & (rank.gather(1, win_c) < r[:, None])  # (B, N) patch is in a merged window
        w = window[0] * window[1]
        slot_patch = torch.where(
            merged, p + rank.gather(1, win_c), p + r[:, None] + cumulative_index(~merged),
        )
        slot = torch.cat([torch.arange(p, device=sim.device).expand(B, -1), slot_patch], dim=1)
        counts = T - (w - 1) * r
    return merge_slots(state, slot, int(counts.max()), counts)


def global_threshold(node_max: torch.Tensor, valid_a: torch.Tensor, layer_number: int, batch_coupled: bool,
                     scale: float = 1.0) -> torch.Tensor:
    """τ_g = mean(m) + scale·std(m)/ℓ per image (B,), or the batch-mean version (reference).

    ``valid_a`` marks the A tokens that count (no class token, no padding); std is unbiased.
    """
    m = torch.where(valid_a, node_max, torch.zeros_like(node_max))
    n = valid_a.sum(dim=1).to(node_max.dtype)
    mean = m.sum(dim=1) / n.clamp_min(1)
    var = (torch.where(valid_a, node_max - mean[:, None], torch.zeros_like(node_max)) ** 2).sum(dim=1)
    std = (var / (n - 1).clamp_min(1)).sqrt()
    if batch_coupled:
        return (mean.mean() + scale * std.mean() / layer_number).expand_as(mean)
    return mean + scale * std / layer_number


def global_merge(state: TokenState, metric: torch.Tensor, layer_number: int, batch_coupled: bool = False,
                 scale: float = 1.0) -> TokenState:
    """GBM: bipartite merging of every A token whose best score is ≥ the adaptive threshold τ_g.

    Args:
        state: current tokens (may be padded).
        metric: (B, T, C) residual-stream tokens.
        layer_number: ℓ, the 1-based number of this block.
        batch_coupled: reference behaviour (batch-mean threshold, batch-minimum r).
        scale: multiplies the std term of τ_g.
    """
    p = state.num_prefix
    T = state.num_tokens
    if (T - p) // 2 <= 0:
        return state
    valid = state.valid()
    with torch.no_grad():
        scores = bipartite_scores(metric, p, valid)
        node_max, node_idx = scores.max(dim=-1)
        valid_a = torch.isfinite(node_max)
        tau = global_threshold(node_max, valid_a, layer_number, batch_coupled, scale)
        r = (valid_a & (node_max >= tau[:, None])).sum(dim=1)
        if batch_coupled:
            r = r.min().expand_as(r)
        if int(r.max()) == 0:
            return state
    return merge_top_r(state, node_max, node_idx, r)


class ALGM(TokenMethod):
    """ALGM: local merging (CLAP) in the first selected block, global (GBM) in the second.

    Args:
        config: thresholds, layers, window, batch coupling.
        prop_attn: proportional attention (reference: effectively off).
        decoder_on_merged: decoder on merged tokens (reference: on).
    """

    name = "algm"

    def __init__(self, config: ALGMConfig, prop_attn: bool = False, decoder_on_merged: bool = True):
        super().__init__(prop_attn, decoder_on_merged)
        self.config = config

    @property
    def merges_each_image(self) -> bool:  # type: ignore[override]
        return not self.config.batch_coupled

    def merge_blocks(self, depth: int) -> set[int]:
        first, second = self.config.layers
        if second > depth:
            raise ValueError(f"ALGM layers {self.config.layers} exceed the encoder's {depth} blocks")
        return {first - 1, second - 1}

    def merge(self, index: int, state: TokenState, keys: torch.Tensor) -> TokenState:
        c = self.config
        if index == c.layers[0] - 1:
            return local_merge(state, state.x, c.threshold, c.window, c.batch_coupled)
        return global_merge(state, state.x, c.layers[1], c.batch_coupled, c.global_scale)

    def knob(self) -> dict[str, Any]:
        c = self.config
        return {
            "threshold": c.threshold, "layers": list(c.layers), "window": list(c.window),
            "batch_coupled": c.batch_coupled, "global_scale": c.global_scale, **super().knob(),
        }


def algm_gmacs_from_counts(spec: SegmenterSpec, knob: dict[str, Any], t_in: Sequence[int], t_out: Sequence[int]) -> float:
    """GFLOPs of one image under ALGM given its per-block token counts (in / after the merge)."""
    config = config_from_knob(knob, spec.depth, spec.embed_dim)
    g = config.layers[1] - 1
    match = [0.0] * spec.depth
    match[g] = bipartite_match_macs(t_in[g], spec.embed_dim)
    return analytic_gmacs(
        spec, tokens_in=list(t_in), tokens_out=list(t_out), match_macs=match,
        decoder_tokens=decoder_tokens(spec, t_out[-1], bool(knob.get("decoder_on_merged", True))),
    )


@torch.no_grad()
def algm_token_counts(model: nn.Module, images: Iterable[torch.Tensor], knob: dict[str, Any]) -> list[tuple[list[int], list[int]]]:
    """Per-image (tokens in, tokens out) of every block under ALGM at ``knob``.

    Runs the encoder only up to the second merging block (the counts are constant after it).
    Per-image mode runs the given batches as they are (results do not depend on the batch);
    ``batch_coupled`` runs every image alone (batch 1, the reference's FLOPs convention).
    """
    spec: SegmenterSpec = model.spec
    method = ALGM(config_from_knob(knob, spec.depth, spec.embed_dim))
    method.record = True
    last = method.config.layers[1]
    was_training = model.training
    model.eval()
    out: list[tuple[list[int], list[int]]] = []
    try:
        for batch in images:
            chunks = batch.split(1) if method.config.batch_coupled else [batch]
            for img in chunks:
                method.encode(model, img, num_blocks=last)
                t_in = torch.stack([a for a, _ in method.trace], dim=1).tolist()  # (B, last)
                t_out = torch.stack([b for _, b in method.trace], dim=1).tolist()
                for ti, to in zip(t_in, t_out):
                    tail = [to[-1]] * (spec.depth - last)
                    out.append((ti + tail, to + tail))
    finally:
        model.train(was_training)
    return out


def algm_cost(model: nn.Module, images: Iterable[torch.Tensor], knob: dict[str, Any]) -> Cost:
    """Mean and std of ALGM's GFLOPs over calibration images (batch-1 convention per image)."""
    per_image = [algm_gmacs_from_counts(model.spec, knob, ti, to) for ti, to in algm_token_counts(model, images, knob)]
    if not per_image:
        raise ValueError("ALGM FLOPs need at least one calibration image")
    mean = statistics.fmean(per_image)
    std = statistics.pstdev(per_image) if len(per_image) > 1 else 0.0  # population std, as `segcompress flops`
    return Cost(mean, std, per_image)
