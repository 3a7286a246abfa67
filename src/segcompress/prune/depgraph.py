"""DepGraph structural pruning of a Segmenter encoder with torch-pruning, to a FLOPs target.

torch-pruning (Fang et al., CVPR 2023, "DepGraph") traces the model and groups every slice that
must be removed together: the residual width E (patch embedding, class and position tokens, every
LayerNorm, the ``qkv``/``fc1`` inputs, the ``proj``/``fc2`` outputs and the decoder's ``proj_dec``
input), per block the attention head dimensions (``qkv`` rows and ``proj`` columns, the same
indices in every head and in q, k and v) and the MLP hidden width, and per block whole heads.
One knob, the channel ratio ``p``, drives the recipe of the Isomorphic-Pruning authors (global
ranking with isomorphic scopes, Taylor importance):

* E and the MLP widths lose ``p`` of their channels (each isomorphic scope removes exactly ``p``);
* the head dimensions of all blocks form one scope that loses ``p · head_dim_scope`` of them;
* ``p · head_ratio_scale`` of all heads are removed, ranked globally.

The decoder is never pruned (its ``proj_dec`` input columns follow E). A pruned model is turned
back into the project's format: a :class:`~segcompress.models.spec.SegmenterSpec` with per-block
widths (``qk_dim == v_dim``: DepGraph cannot narrow them separately) and the dense attention
scale, built by :func:`~segcompress.models.segmenter.build_segmenter` with the pruned weights
loaded strictly, so ``save_model``/``load_model`` handle it without torch-pruning.

The library has no FLOPs target: :func:`prune_to_target` bisects ``p``, pruning a fresh copy of
the dense model for each candidate and scoring it with
:func:`~segcompress.flops.analytic_gmacs`, until the FLOPs land in ``[target·(1-tol), target]``
(NViT's window). Notes on torch-pruning 1.6.1 (``torch_pruning.__version__`` says "1.6.0"):

* ``BasePruner`` is the pruner (``MetaPruner`` is an alias); ``GroupNormImportance`` is gone,
  magnitude importance is ``GroupMagnitudeImportance``.
* The project's :class:`~segcompress.models.vit.Attention` splits ``qkv`` into
  ``[h·qk, h·qk, h·v]``, which DepGraph's index mapping cannot follow (torch-pruning issue #105);
  :func:`traceable_attention` swaps in a reshape-and-unbind forward while the pruner is built and
  stepped (the same computation when ``qk_dim == v_dim``).
* Heads are only removed from an attention group whose scope prunes at least one dimension, and
  the head counts are updated before the group's safety check, so a block can be reported with 0
  heads (or be emptied): such candidates are refused (:class:`ZeroHeadsError`).
* Any ratio > 0 removes at least one channel from every scope (the library floors the kept count).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import logging
import types
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

from segcompress.flops import analytic_gmacs, count_params
from segcompress.models.segmenter import Segmenter, build_segmenter, spec_scale
from segcompress.models.spec import BlockDims, SegmenterSpec
from segcompress.models.vit import Attention
from segcompress.methods.depgraph import IMPORTANCES, DepGraphSettings  # noqa: F401 (re-export)

log = logging.getLogger(__name__)

Batch = Sequence[torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class ZeroHeadsError(ValueError):
    """A pruning candidate left an encoder block without attention heads."""


# ------------------------------------------------------------------------------ tracing


def _traceable_forward(self: Attention, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``Attention.forward`` with ``qkv`` reshaped to (B, N, 3, h, d) and unbound (equal when qk == v)."""
    B, N, _ = x.shape
    q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    return self.attend(q, k, v, attn_mask)


@contextmanager
def traceable_attention(model: Segmenter) -> Iterator[Segmenter]:
    """Temporarily give every encoder block's attention a forward DepGraph can trace.

    The project's split of ``qkv`` into ``[h·qk, h·qk, h·v]`` defeats torch-pruning's index
    mapping; a reshape to (B, N, 3, h, d) followed by ``unbind`` is the same computation when
    ``qk_dim == v_dim`` (every dense model, and every model DepGraph pruned), and is what
    torch-pruning handles for timm. The instance's own ``forward`` is restored on exit.

    Raises:
        ValueError: a block has ``qk_dim != v_dim`` (an NViT-pruned model).
    """
    attns = [blk.attn for blk in model.encoder.blocks]
    for i, attn in enumerate(attns):
        if attn.qk_dim != attn.v_dim:
            raise ValueError(f"encoder block {i} has qk_dim {attn.qk_dim} != v_dim {attn.v_dim}; DepGraph "
                             "pruning needs equal query/key and value widths (prune the dense model)")
    saved = [attn.__dict__.get("forward") for attn in attns]
    for attn in attns:
        attn.forward = types.MethodType(_traceable_forward, attn)
    try:
        yield model
    finally:
        for attn, own in zip(attns, saved):
            if own is None:
                del attn.forward
            else:
                attn.forward = own


# ------------------------------------------------------------------------------ Taylor gradients


def segmentation_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean pixel cross-entropy over labelled pixels (the training loss, ``ignore_index`` 255)."""
    from segcompress.train import pixel_loss_sums

    ce_sum, _, count = pixel_loss_sums(logits, labels)
    return ce_sum / count.clamp(min=1).to(ce_sum.dtype)


def taylor_gradients(
        model: nn.Module,
        batches: Iterable[Batch],
        num_batches: int | None = None,
        loss_fn: LossFn = segmentation_loss,
) -> dict[str, torch.Tensor]:
    """∂L/∂w of every parameter, summed over calibration batches, for Taylor importance.

    The same sum as calling ``backward`` on each batch without ``zero_grad`` between, but the
    model's ``.grad`` is left untouched: the gradients are returned by parameter name, to be set on
    each pruning candidate (``copy.deepcopy`` drops ``.grad``). The model runs in eval mode (no
    dropout or drop-path), as the torch-pruning examples do; its mode and ``requires_grad`` flags
    are restored.

    Args:
        model: the dense Segmenter.
        batches: ``(images, labels)`` pairs, images (B, 3, H, W) normalised crops, labels (B, H, W).
        num_batches: use at most this many batches (default: all).
        loss_fn: ``loss_fn(logits, labels)``, default :func:`segmentation_loss`.

    Raises:
        ValueError: ``batches`` is empty.
    """
    names, params = zip(*model.named_parameters())
    flags = [p.requires_grad for p in params]
    was_training = model.training
    device = params[0].device
    sums = [torch.zeros_like(p) for p in params]
    used = 0
    model.eval()
    try:
        for p in params:
            p.requires_grad_(True)
        for batch in itertools.islice(batches, num_batches):
            images, labels = batch[0].to(device), batch[1].to(device)
            loss = loss_fn(model(images), labels)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            for s, g in zip(sums, grads):
                if g is not None:
                    s += g
            used += 1
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
        model.train(was_training)
    if used == 0:
        raise ValueError("no calibration batch for Taylor importance (empty batches)")
    if num_batches is not None and used < num_batches:
        log.warning("Taylor importance from %d calibration batches (%d asked)", used, num_batches)
    return {n: s.detach() for n, s in zip(names, sums)}


# ------------------------------------------------------------------------------ one candidate


def _importance(settings: DepGraphSettings) -> Any:
    import torch_pruning as tp

    if settings.importance == "taylor":
        return tp.importance.GroupTaylorImportance()
    return tp.importance.GroupMagnitudeImportance(p=2)


def _pruner(model: Segmenter, p: float, settings: DepGraphSettings, example_input: torch.Tensor) -> Any:
    """torch-pruning's ``BasePruner`` for ``model`` at channel ratio ``p`` (traceable attention on)."""
    import torch_pruning as tp

    enc, dec = model.encoder, model.decoder
    qkvs = [blk.attn.qkv for blk in enc.blocks]
    dec_tokens = [prm for _, prm in dec.named_parameters(recurse=False)]  # cls_emb, proj_patch, proj_classes
    ignored: list[Any] = [dec, *dec_tokens]
    if not settings.prune_embedding:
        ignored.append(enc.patch_embed.proj)  # an ignored member makes the whole E group unprunable
    prune_heads = settings.head_ratio_scale > 0
    prune_dims = settings.head_dim_scope > 0
    return tp.pruner.BasePruner(
        model, example_input, importance=_importance(settings),
        global_pruning=settings.global_pruning, isomorphic=settings.isomorphic, pruning_ratio=p,
        # one scope for the head dims of all blocks; with head_dim_scope 0 the attention groups
        # stay in their isomorphic scope at ratio p, which only triggers the head removal
        pruning_ratio_dict={tuple(qkvs): p * settings.head_dim_scope} if prune_dims else None,
        num_heads={qkv: blk.attn.num_heads for qkv, blk in zip(qkvs, enc.blocks)},
        prune_num_heads=prune_heads, head_pruning_ratio=p * settings.head_ratio_scale if prune_heads else 0.0,
        prune_head_dims=prune_dims, round_to=settings.round_to if settings.round_to > 1 else None,
        ignored_layers=ignored,
        unwrapped_parameters=[(enc.cls_token, 2), (enc.pos_embed, 2)] + [(t, t.ndim - 1) for t in dec_tokens],
    )


def depgraph_prune(
        model: Segmenter,
        p: float,
        settings: DepGraphSettings,
        grads: dict[str, torch.Tensor] | None = None,
        example_input: torch.Tensor | None = None,
) -> Segmenter:
    """A deep copy of ``model`` pruned in place by torch-pruning at channel ratio ``p``.

    The copy's modules are torch-pruning's edited ones; its attention attributes (heads, widths),
    ``encoder.embed_dim`` and ``spec`` are updated so it runs as a Segmenter of the new widths
    (:func:`to_project` rebuilds it without any torch-pruning state).

    Args:
        model: the dense Segmenter (not modified), every block with ``qk_dim == v_dim``.
        p: channel ratio in [0, 1); 0 returns an unpruned copy.
        settings: pruning settings.
        grads: :func:`taylor_gradients` of ``model`` (needed for Taylor importance when ``p > 0``).
        example_input: one crop (1, 3, H, W) to trace with (default: zeros of the spec's crop).

    Raises:
        ValueError: ``p`` out of range, Taylor importance without ``grads``, a token method attached.
        ZeroHeadsError: a block is left with no head.
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"channel ratio p must be in [0, 1), got {p}")
    if getattr(model, "token_method", None) is not None:
        raise ValueError("detach the token method before pruning (model.token_method is set)")
    if p > 0 and settings.importance == "taylor" and grads is None:
        raise ValueError("Taylor importance needs the gradients of taylor_gradients(model, batches)")
    dense_spec = model.spec
    scale = spec_scale(dense_spec)
    pruned = copy.deepcopy(model).eval()
    device = next(pruned.parameters()).device
    if example_input is None:
        example_input = torch.zeros(1, 3, *dense_spec.crop, device=device)
    if p > 0 and grads is not None and settings.importance == "taylor":
        for name, prm in pruned.named_parameters():
            if name not in grads:
                raise ValueError(f"no Taylor gradient for parameter {name!r}")
            prm.grad = grads[name].detach().to(device=prm.device, dtype=prm.dtype).clone()
    if p > 0:
        with traceable_attention(pruned), torch.enable_grad():
            pruner = _pruner(pruned, p, settings, example_input)
            pruner.step()
        heads = [int(pruner.num_heads[blk.attn.qkv]) for blk in pruned.encoder.blocks]
    else:
        heads = [blk.attn.num_heads for blk in pruned.encoder.blocks]
    pruned.zero_grad(set_to_none=True)
    spec = _pruned_spec(pruned, heads, dense_spec, scale, p)
    enc = pruned.encoder
    enc.embed_dim = spec.embed_dim
    for i, blk in enumerate(enc.blocks):
        d = spec.block_dims(i)
        blk.attn.num_heads, blk.attn.qk_dim, blk.attn.v_dim = d.num_heads, d.qk_dim, d.v_dim
        blk.attn.scale = scale
    pruned.spec = spec
    return pruned.train(model.training)


def _pruned_spec(pruned: Segmenter, heads: list[int], dense: SegmenterSpec, scale: float, p: float) -> SegmenterSpec:
    """The project spec of a torch-pruning-edited Segmenter whose blocks have ``heads`` heads."""
    enc = pruned.encoder
    E = enc.patch_embed.proj.out_channels
    blocks = []
    for i, (blk, h) in enumerate(zip(enc.blocks, heads)):
        qkv_out, proj_in = blk.attn.qkv.out_features, blk.attn.proj.in_features
        if h < 1 or qkv_out == 0:
            raise ZeroHeadsError(f"DepGraph pruning at p={p:.4f} left encoder block {i} with no attention head")
        if qkv_out % (3 * h) or proj_in * 3 != qkv_out:
            raise RuntimeError(f"block {i}: qkv has {qkv_out} outputs and proj {proj_in} inputs, which do not "
                               f"split into {h} heads (torch-pruning left the attention inconsistent)")
        d = qkv_out // (3 * h)
        blocks.append(BlockDims(num_heads=h, qk_dim=d, v_dim=d, mlp_hidden=blk.mlp.fc1.out_features))
    # ``num_heads`` has no effect once ``blocks`` is given, but E must be divisible by it
    num_heads = max(h for h in range(1, dense.num_heads + 1) if E % h == 0)
    return dataclasses.replace(dense, embed_dim=E, num_heads=num_heads, attn_scale=scale, blocks=blocks)


def to_project(pruned: Segmenter) -> Segmenter:
    """A fresh Segmenter built from ``pruned.spec`` with ``pruned``'s weights (loaded strictly).

    The result holds no torch-pruning state: ``save_model`` writes it and ``load_model`` rebuilds
    it from its JSON spec. The global RNG is left as it was.
    """
    from segcompress.seeding import preserved_global_rng

    device = next(pruned.parameters()).device
    with preserved_global_rng():
        model = build_segmenter(pruned.spec)
    state = {k: v.detach().clone() for k, v in pruned.state_dict().items()}
    model.load_state_dict(state, strict=True)
    return model.to(device).train(pruned.training)


def prune_once(
        model: Segmenter,
        p: float,
        settings: DepGraphSettings,
        grads: dict[str, torch.Tensor] | None = None,
        example_input: torch.Tensor | None = None,
) -> Segmenter:
    """``model`` pruned by DepGraph at channel ratio ``p``, in the project's format.

    See :func:`depgraph_prune` (arguments, errors) and :func:`to_project`; ``model`` is not modified.
    """
    return to_project(depgraph_prune(model, p, settings, grads, example_input))


# ------------------------------------------------------------------------------ target search


@dataclass
class DepGraphResult:
    """Outcome of :func:`prune_to_target`.

    Args:
        model: the pruned Segmenter in the project's format (a copy of the dense model if the
            target is at or above the dense FLOPs).
        spec: its spec (``model.spec``).
        ratio: the channel ratio ``p`` it was pruned at.
        dense_gmacs, target_gmacs, achieved_gmacs: closed-form GMACs (fvcore convention).
        within_tolerance: ``achieved`` lies in ``[target·(1-tol), target]``.
        message: why the window was missed (``None`` when it was not).
        candidates: every ``(p, GMACs)`` pruned, in order; GMACs ``None`` for a refused candidate
            (a block without heads).
        monotone: GMACs did not increase with ``p`` over the candidates (bisection assumes it).
        dense_params: parameters of the dense model.
    """

    model: Segmenter
    spec: SegmenterSpec
    ratio: float
    dense_gmacs: float
    target_gmacs: float
    achieved_gmacs: float
    within_tolerance: bool
    message: str | None = None
    candidates: list[tuple[float, float | None]] = field(default_factory=list)
    monotone: bool = True
    dense_params: int = 0

    @property
    def embed_dim(self) -> int:
        return self.spec.embed_dim

    @property
    def blocks(self) -> list[BlockDims]:
        """Per-block widths of the pruned encoder."""
        return [self.spec.block_dims(i) for i in range(self.spec.depth)]

    def report(self) -> dict[str, Any]:
        """JSON-ready summary: FLOPs (GFLOPs = GMACs), ratio, params, per-block widths, search."""
        return {
            "dense_gflops": self.dense_gmacs,
            "target_gflops": self.target_gmacs,
            "achieved_gflops": self.achieved_gmacs,
            "achieved_fraction": self.achieved_gmacs / self.dense_gmacs,
            "within_tolerance": self.within_tolerance,
            "message": self.message,
            "ratio": self.ratio,
            "dense_params": self.dense_params,
            "params": count_params(self.model),
            "embed_dim": self.embed_dim,
            "blocks": [dataclasses.asdict(b) for b in self.blocks],
            "attn_scale": self.spec.attn_scale,
            "candidates": [list(c) for c in self.candidates],
            "monotone": self.monotone,
        }


def is_monotone(candidates: Iterable[tuple[float, float | None]]) -> bool:
    """Whether GMACs never increase with ``p`` over ``(p, GMACs)`` pairs (refused ones skipped)."""
    points = sorted((p, g) for p, g in candidates if g is not None)
    return all(b[1] <= a[1] * (1 + 1e-12) for a, b in zip(points, points[1:]))


def _missed_window_message(settings: DepGraphSettings, lower: float, target_gmacs: float,
                           best: tuple[float, Segmenter, float], none_under: bool,
                           candidates: list[tuple[float, float | None]]) -> str:
    """Why the bisection missed ``[lower, target]``, naming the cause: every ratio that would go
    below the target left a block without heads (``none_under``, with refused candidates), or
    the window fell between two neighbouring widths."""
    closest = f"closest: p={best[0]:.5f}, {best[2]:.4f} GFLOPs"
    refused = [p for p, g in candidates if g is None and p > best[0]]
    if none_under and refused:
        return (f"target {target_gmacs:.4f} GFLOPs is out of reach: every ratio above p={best[0]:.5f} (from "
                f"p={min(refused):.5f}) leaves an encoder block without attention heads; {closest}; lower "
                f"head_ratio_scale to remove fewer heads")
    return (f"no ratio in {settings.max_bisection_steps} bisection steps lands in [{lower:.4f}, "
            f"{target_gmacs:.4f}] GFLOPs (pruned widths are discrete); {closest}")


def prune_to_target(
        model: Segmenter,
        target_gmacs: float,
        settings: DepGraphSettings,
        batches: Iterable[Batch] | None = None,
        *,
        example_input: torch.Tensor | None = None,
        loss_fn: LossFn = segmentation_loss,
) -> DepGraphResult:
    """Prune ``model`` by DepGraph to ``target_gmacs``: bisection on the channel ratio ``p``.

    The gradients for Taylor importance are taken once from ``settings.calibration_batches`` of
    ``batches``; every candidate prunes a fresh copy of the dense model (one-shot, no training)
    and is scored by :func:`~segcompress.flops.analytic_gmacs` of its spec. ``p = max_ratio`` is
    tried first (if it stays above the target, the target is out of reach and that model is
    returned); then ``[0, max_ratio]`` is bisected until a candidate lands in
    ``[target·(1-tol), target]``. A candidate with a headless block counts as too small. As pruned
    widths are discrete, the window can fall between two neighbouring ratios; then the largest
    candidate under the target is returned (else the smallest above), with ``within_tolerance``
    false and a ``message``. A non-monotone FLOPs curve is logged as a warning and reported
    (``monotone`` false), not raised: the returned model is still a valid candidate.

    Args:
        model: the dense Segmenter (not modified).
        target_gmacs: the FLOPs target (GMACs, fvcore convention).
        settings: pruning settings.
        batches: ``(images, labels)`` calibration batches (needed for Taylor importance).
        example_input: one crop to trace with (default: zeros of the spec's crop).
        loss_fn: calibration loss (default: the training pixel cross-entropy).

    Raises:
        ValueError: a non-positive target, or Taylor importance without batches.
    """
    if not target_gmacs > 0:
        raise ValueError(f"target GMACs must be positive, got {target_gmacs}")
    dense = analytic_gmacs(model.spec)
    dense_params = count_params(model)
    lower = target_gmacs * (1.0 - settings.tolerance)
    if target_gmacs >= dense:
        log.info("target %.4f GFLOPs >= dense %.4f: nothing to prune", target_gmacs, dense)
        small = prune_once(model, 0.0, settings, None, example_input)
        inside = dense >= lower
        return DepGraphResult(small, small.spec, 0.0, dense, target_gmacs, dense, inside,
                              None if inside else "target at or above the dense FLOPs: nothing pruned",
                              dense_params=dense_params)
    grads = None
    if settings.importance == "taylor":
        if batches is None:
            raise ValueError("Taylor importance needs calibration batches (or use importance: magnitude)")
        grads = taylor_gradients(model, batches, settings.calibration_batches, loss_fn)

    candidates: list[tuple[float, float | None]] = []
    under: tuple[float, Segmenter, float] | None = None  # largest FLOPs <= target
    over: tuple[float, Segmenter, float] | None = None  # smallest FLOPs > target

    def evaluate(p: float) -> tuple[Segmenter, float] | None:
        nonlocal under, over
        try:
            small = prune_once(model, p, settings, grads, example_input)
        except ZeroHeadsError as e:
            log.info("p=%.5f refused: %s", p, e)
            candidates.append((p, None))
            return None
        g = analytic_gmacs(small.spec)
        candidates.append((p, g))
        log.info("p=%.5f: %.4f GFLOPs (target %.4f)", p, g, target_gmacs)
        if g <= target_gmacs and (under is None or g > under[2]):
            under = (p, small, g)
        elif g > target_gmacs and (over is None or g < over[2]):
            over = (p, small, g)
        return small, g

    found: tuple[float, Segmenter, float] | None = None
    message: str | None = None
    lo, hi = 0.0, settings.max_ratio
    top = evaluate(hi)
    if top is not None and top[1] > target_gmacs:
        message = (f"target {target_gmacs:.4f} GFLOPs is out of reach: p=max_ratio={hi} gives {top[1]:.4f} "
                   f"GFLOPs; raise max_ratio or the scales, or prune the embedding")
        found = (hi, top[0], top[1])
    elif top is not None and top[1] >= lower:
        found = (hi, top[0], top[1])
    else:
        for _ in range(settings.max_bisection_steps):
            mid = 0.5 * (lo + hi)
            out = evaluate(mid)
            if out is None or out[1] < lower:
                hi = mid
            elif out[1] > target_gmacs:
                lo = mid
            else:
                found = (mid, out[0], out[1])
                break
    monotone = is_monotone(candidates)
    if not monotone:
        log.warning("DepGraph FLOPs are not monotone in p over the candidates %s; the bisection may have "
                    "missed a ratio in the window", candidates)
    if found is None:
        best = under or over
        if best is None:
            raise RuntimeError(f"no usable DepGraph candidate for {target_gmacs:.4f} GFLOPs: every ratio tried "
                               f"left a block without heads ({candidates}); lower head_ratio_scale")
        message = _missed_window_message(settings, lower, target_gmacs, best, under is None, candidates)
        log.warning(message)
        found = best
    p, small, g = found
    inside = lower <= g <= target_gmacs
    return DepGraphResult(small, small.spec, p, dense, target_gmacs, g, inside, message, candidates, monotone,
                          dense_params)
