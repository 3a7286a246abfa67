"""FLOPs of a Segmenter, with one convention for every method (docs/methods.md §7).

Convention (as the anchors report): fvcore's count, where one multiply-add is one FLOP (so
"GFLOPs" are GMACs); attention matmuls are counted (fused attention is switched off while
tracing); batch 1, one crop at the training crop size; the whole model: patch embedding, encoder,
final norm, mask decoder, bilinear upsampling, plus any extra net (a policy net) or matching
matmul a method adds. fvcore counts linear/matmul/conv/einsum, LayerNorm (5 per element) and
bilinear upsampling (4 per output element); it does not count element-wise ops (add, mul,
softmax, GELU), norms of vectors, gathers, scatters, sorts or top-k.

:func:`count_gmacs` traces a model with fvcore; :func:`analytic_gmacs` is the closed form of the
same count, general enough for token merging (fewer tokens per block), token sharing (fewer
patches embedded) and structural pruning (per-block widths). Tests check that they agree.
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import Sequence

import torch
from torch import nn

from segcompress.models.segmenter import unfused_attention
from segcompress.models.spec import SegmenterSpec

CONVENTION = (
    "fvcore count, 1 multiply-add = 1 FLOP (GFLOPs == GMACs), attention matmuls counted, batch 1, "
    "one crop at the training crop size, encoder + decoder + upsampling + any policy net"
)

TokenCounts = float | Sequence[float] | None


def count_gmacs(model: nn.Module, img: torch.Tensor) -> float:
    """Traced count of ``model(img)`` with fvcore, in G (1 multiply-add = 1 FLOP).

    Runs under :func:`~segcompress.models.segmenter.unfused_attention` (so attention matmuls are
    seen), ``torch.no_grad`` and eval mode (restored afterwards); fvcore's warnings about
    uncounted element-wise ops are silenced. ``img`` should be one crop, shape (1, 3, H, W); the
    count scales with the batch size.
    """
    from fvcore.nn import FlopCountAnalysis

    was_training = model.training
    model.eval()
    fv_logger = logging.getLogger("fvcore")
    level = fv_logger.level
    fv_logger.setLevel(logging.ERROR)
    try:
        with unfused_attention(model), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            analysis = FlopCountAnalysis(model, (img,))
            analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
            total = analysis.total()
    finally:
        fv_logger.setLevel(level)
        model.train(was_training)
    return float(total) / 1e9


def _per_block(values: TokenCounts, depth: int, name: str) -> list[float] | None:
    if values is None:
        return None
    if isinstance(values, (int, float)):
        return [float(values)] * depth
    out = [float(v) for v in values]
    if len(out) != depth:
        raise ValueError(f"{name} has {len(out)} entries but the encoder has {depth} blocks")
    if any(v < 0 for v in out):
        raise ValueError(f"{name} has a negative entry: {out}")
    return out


def block_macs(
        n_in: float,
        n_out: float,
        embed_dim: int,
        num_heads: int,
        qk_dim: int,
        v_dim: int,
        mlp_hidden: int,
        match_macs: float = 0.0,
) -> float:
    """MACs of one pre-norm encoder block (docs/methods.md §7.1).

    ``n_in`` tokens enter LN1 and attention; a merge between attention and MLP (ToMe, ALGM) leaves
    ``n_out`` tokens for LN2 and the MLP; ``match_macs`` is the merge's own counted cost.
    """
    E, h = embed_dim, num_heads
    attention = (
        5 * n_in * E  # LN1
        + n_in * E * h * (2 * qk_dim + v_dim)  # qkv
        + n_in * n_in * h * (qk_dim + v_dim)  # q kᵀ and attn v
        + n_in * h * v_dim * E  # proj
    )
    mlp = 5 * n_out * E + 2 * n_out * E * mlp_hidden  # LN2, fc1 + fc2
    return attention + match_macs + mlp


def decoder_macs(
        n_d: float, num_classes: int, encoder_dim: int, dim: int, layers: int, height: int, width: int,
) -> float:
    """MACs of the mask-transformer decoder on ``n_d`` patch tokens, with the final upsampling.

    ``dim`` must be divisible into heads; attention cost does not depend on the head count.
    """
    K, D = num_classes, dim
    m = n_d + K  # patch tokens + class embeddings
    block = 12 * m * D * D + 2 * m * m * D + 10 * m * D
    return (
        n_d * encoder_dim * D  # proj_dec
        + layers * block
        + 5 * m * D  # decoder_norm
        + n_d * D * D + K * D * D  # proj_patch, proj_classes
        + n_d * K * D  # patches · classesᵀ
        + 5 * n_d * K  # mask_norm
        + 4 * K * height * width  # bilinear upsampling to the crop
    )


def analytic_gmacs(
        spec: SegmenterSpec,
        tokens_in: TokenCounts = None,
        tokens_out: TokenCounts = None,
        decoder_tokens: float | None = None,
        match_macs: TokenCounts = None,
        embed_patches: float | None = None,
        extra_macs: float = 0.0,
) -> float:
    """Closed form of :func:`count_gmacs` for a Segmenter, in G (docs/methods.md §7.1).

    Token counts include the class token; all defaults describe the dense model, so
    ``analytic_gmacs(spec)`` is the dense count.

    Args:
        spec: the architecture; per-block widths come from ``spec.block_dims(i)`` (pruned models).
        tokens_in: tokens entering block ``i``'s attention (one number per block, or one for all).
            Default: ``1 + embed_patches`` for block 0 and ``tokens_out[i-1]`` after it (a merge in
            block ``i-1`` shrinks block ``i``'s input).
        tokens_out: tokens after a merge inside block ``i`` (entering LN2/MLP). Default: no merge
            (``tokens_in``). The final LayerNorm sees ``tokens_out[-1]`` tokens.
        decoder_tokens: patch tokens entering the decoder (K class embeddings are added).
            Default: the full patch grid (token methods that unmerge before the decoder).
        match_macs: extra counted MACs of block ``i``'s matching (e.g. ToMe's similarity matmul).
        embed_patches: patches that go through the patch embedding (CTS embeds fewer).
            Default: the full grid.
        extra_macs: anything else counted once per crop, in MACs (e.g. a policy net).
    """
    depth = spec.depth
    height, width = spec.crop
    gh, gw = spec.grid
    n_patches = gh * gw
    p = spec.patch_size
    E = spec.embed_dim
    embed_patches = float(n_patches if embed_patches is None else embed_patches)
    t_out = _per_block(tokens_out, depth, "tokens_out")
    t_in = _per_block(tokens_in, depth, "tokens_in")
    if t_in is None:
        first = 1.0 + embed_patches
        t_in = [first] + (t_out[:-1] if t_out is not None else [first] * (depth - 1))
    if t_out is None:
        t_out = list(t_in)
    match = _per_block(match_macs, depth, "match_macs") or [0.0] * depth

    total = embed_patches * 3 * p * p * E  # patch embedding (conv)
    for i in range(depth):
        d = spec.block_dims(i)
        total += block_macs(t_in[i], t_out[i], E, d.num_heads, d.qk_dim, d.v_dim, d.mlp_hidden, match[i])
    total += 5 * t_out[-1] * E  # final LayerNorm
    n_d = float(n_patches if decoder_tokens is None else decoder_tokens)
    assert spec.decoder_dim is not None
    total += decoder_macs(n_d, spec.num_classes, E, spec.decoder_dim, spec.decoder_layers, height, width)
    total += extra_macs
    return total / 1e9


def bipartite_match_macs(n_tokens: float, dim: int) -> float:
    """MACs of a bipartite similarity matmul (ToMe, ALGM global): ⌈N/2⌉·⌊N/2⌋·dim."""
    n = int(n_tokens)
    return math.ceil(n / 2) * (n // 2) * dim


def count_params(model: nn.Module) -> int:
    """Number of parameters (buffers excluded)."""
    return sum(p.numel() for p in model.parameters())
