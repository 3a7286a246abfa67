"""Closed-form GFLOPs of the token methods (the project's fvcore convention, docs/methods.md §7.1).

ToMe and CTS are input-independent: the token count of every block follows from the knob.
ALGM is input-dependent (:data:`INPUT_DEPENDENT`): the per-block counts come from running the method
on images (per image, so a batch gives every image's own count), and the result is a mean and a
std. The images are one crop each (:func:`image_crops`): the calibration images of ``segcompress
match`` / ``flops``, or the images of an evaluated condition. All numbers go through
:func:`segcompress.flops.analytic_gmacs`.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from segcompress.flops import analytic_gmacs, bipartite_match_macs
from segcompress.methods import CATALOGUE
from segcompress.models.spec import SegmenterSpec
from segcompress.tokens import tome as tome_fn
from segcompress.tokens.algm import config_from_knob

NUM_PREFIX = 1  # Segmenter: one class token
# Methods whose cost depends on the image: method_cost needs a model and images, and every
# evaluated condition measures its own cost.
INPUT_DEPENDENT = frozenset(m.name for m in CATALOGUE if m.input_dependent)


def is_input_dependent(name: str) -> bool:
    """Whether method ``name``'s GFLOPs depend on the image (:data:`INPUT_DEPENDENT`)."""
    return name in INPUT_DEPENDENT


@dataclass
class Cost:
    """GFLOPs of a method at a knob: ``mean`` (the matched number), ``std`` and per-image values."""

    mean: float
    std: float = 0.0
    per_image: list[float] = field(default_factory=list)


def _decoder_tokens(spec: SegmenterSpec, final_tokens: float, decoder_on_merged: bool) -> float:
    n = spec.grid[0] * spec.grid[1]
    return final_tokens - NUM_PREFIX if decoder_on_merged else n


def tome_schedule(spec: SegmenterSpec, knob: dict[str, Any]) -> list[int]:
    """Per-layer r of a ToMe knob (``r`` int or list, optional ``inflect``)."""
    r: Any = knob["r"]
    if "inflect" in knob:
        r = (int(r), float(knob["inflect"]))
    return tome_fn.parse_r(spec.depth, r)


def tome_gmacs(spec: SegmenterSpec, knob: dict[str, Any]) -> float:
    """GFLOPs of ToMe at ``knob``: fewer tokens after every merge, plus the A·Bᵀ matching matmul."""
    n = spec.grid[0] * spec.grid[1]
    t_in, t_out, eff = tome_fn.token_schedule(tome_schedule(spec, knob), NUM_PREFIX + n, NUM_PREFIX)
    match = [bipartite_match_macs(t, spec.block_dims(i).qk_dim) if e > 0 else 0.0
             for i, (t, e) in enumerate(zip(t_in, eff))]
    return analytic_gmacs(
        spec, tokens_in=t_in, tokens_out=t_out, match_macs=match,
        decoder_tokens=_decoder_tokens(spec, t_out[-1], bool(knob.get("decoder_on_merged", False))),
    )


def cts_gmacs(spec: SegmenterSpec, knob: dict[str, Any], include_policy: bool = True) -> float:
    """GFLOPs of CTS at ``knob``: N − 3K tokens everywhere, N − 3K patches embedded, plus the policy net.

    ``include_policy=False`` leaves the policy net out (the CTS paper's unclear convention).
    """
    from segcompress.tokens.cts import policy_gmacs, superpatch_grid

    k = int(knob["k"])
    sh, sw = superpatch_grid(spec.grid)
    if not 0 <= k <= sh * sw:
        raise ValueError(f"CTS k={k} is out of range 0..{sh * sw}")
    if k == 0:
        return analytic_gmacs(spec)
    n = spec.grid[0] * spec.grid[1]
    tokens = NUM_PREFIX + n - 3 * k
    h, w = spec.crop
    return analytic_gmacs(
        spec, tokens_in=tokens, tokens_out=tokens, embed_patches=n - 3 * k,
        decoder_tokens=_decoder_tokens(spec, tokens, bool(knob.get("decoder_on_merged", True))),
        extra_macs=policy_gmacs(h, w, spec.patch_size) * 1e9 if include_policy else 0.0,
    )


def algm_gmacs_from_counts(spec: SegmenterSpec, knob: dict[str, Any], t_in: Sequence[int], t_out: Sequence[int]) -> float:
    """GFLOPs of one image under ALGM given its per-block token counts (in / after the merge)."""
    config = config_from_knob(knob, spec.depth, spec.embed_dim)
    g = config.layers[1] - 1
    match = [0.0] * spec.depth
    match[g] = bipartite_match_macs(t_in[g], spec.embed_dim)
    return analytic_gmacs(
        spec, tokens_in=list(t_in), tokens_out=list(t_out), match_macs=match,
        decoder_tokens=_decoder_tokens(spec, t_out[-1], bool(knob.get("decoder_on_merged", True))),
    )


@torch.no_grad()
def algm_token_counts(model: nn.Module, images: Iterable[torch.Tensor], knob: dict[str, Any]) -> list[tuple[list[int], list[int]]]:
    """Per-image (tokens in, tokens out) of every block under ALGM at ``knob``.

    Runs the encoder only up to the second merging block (the counts are constant after it).
    Per-image mode runs the given batches as they are (results do not depend on the batch);
    ``batch_coupled`` runs every image alone (batch 1, the reference's FLOPs convention).
    """
    from segcompress.tokens.patch import ALGM

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


def image_crops(layout: str, root: str | Path, split: str, crop: Sequence[int], max_images: int | None = None,
                img_root: str | Path | None = None) -> Iterator[torch.Tensor]:
    """The images of a dataset split as FLOPs inputs: one normalised crop (1, 3, H, W) per image.

    As ALGM's FLOPs script: every image is resized (aspect distorted) to crop×crop, batch 1.
    ``img_root``: read the images from there (a corrupted set), as the test dataset does.
    """
    from segcompress.data.datasets import build_dataset  # the data stage's reader

    h, w = (int(c) for c in crop)
    ds = build_dataset(layout, root, split, mode="test", crop=(h, w), img_scale=(4 * max(h, w), min(h, w)),
                       img_root=img_root, max_images=max_images)
    for i in range(len(ds) if max_images is None else min(len(ds), max_images)):
        img = ds[i]["image"]
        yield F.interpolate(img[None].float(), size=(h, w), mode="bilinear", align_corners=False)


def method_cost(name: str, knob: dict[str, Any], spec: SegmenterSpec, model: nn.Module | None = None,
                images: Iterable[torch.Tensor] | None = None) -> Cost:
    """Closed-form GFLOPs of ``name`` at ``knob`` (``dense``, ``tome``, ``cts``; ``algm`` needs images)."""
    if name == "dense":
        return Cost(analytic_gmacs(spec))
    if name == "tome":
        return Cost(tome_gmacs(spec, knob))
    if name == "cts":
        return Cost(cts_gmacs(spec, knob))
    if is_input_dependent(name) and (model is None or images is None):
        raise ValueError(f"{name}'s FLOPs depend on the input: give a model and images")
    if name == "algm":
        return algm_cost(model, images, knob)
    raise ValueError(f"no closed-form FLOPs for method {name!r}")
