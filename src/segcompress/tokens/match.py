"""FLOPs matching: find the knob of a token method whose GFLOPs meet a target.

* ToMe: exact. The knob is an r-list "the first j layers merge r+1 tokens, the rest r", which
  moves the FLOPs one token-layer at a time; every (r, j) is scanned in closed form (the count is
  not monotone everywhere, since switching a layer from r=0 to r=1 adds its matching matmul).
* CTS: exact. Every K from 0 to the number of superpatches is scanned in closed form.
* ALGM: bisection of the local threshold τ on calibration images (mean GFLOPs; lower τ merges
  more). The global stage's threshold is automatic, so FLOPs above τ's ceiling are out of reach.

The tolerance is |achieved − target| ≤ ``tolerance``·target (1 %). A target out of the method's
reach gives the nearest achievable knob, ``within_tolerance = False`` and a message saying why.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from segcompress.flops import analytic_gmacs
from segcompress.models.spec import SegmenterSpec
from segcompress.tokens import cost
from segcompress.tokens.cts import superpatch_grid

TOLERANCE = 0.01


@dataclass
class Match:
    """A solved knob and what it achieves."""

    method: str
    knob: dict[str, Any]
    target_gflops: float
    achieved_gflops: float
    dense_gflops: float
    within_tolerance: bool
    gflops_std: float = 0.0
    reach_gflops: tuple[float, float] = (math.nan, math.nan)
    message: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def target_fraction(self) -> float:
        return self.target_gflops / self.dense_gflops

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["reach_gflops"] = list(self.reach_gflops)
        d["target_fraction"] = self.target_fraction
        d["achieved_fraction"] = self.achieved_gflops / self.dense_gflops
        d.update(d.pop("extra"))
        return d


def _finish(method: str, knob: dict[str, Any], target: float, achieved: float, dense: float, reach: tuple[float, float],
            tolerance: float, std: float = 0.0, extra: dict[str, Any] | None = None) -> Match:
    ok = abs(achieved - target) <= tolerance * target
    message = ""
    if not ok:
        lo, hi = reach
        if target < lo:
            message = (f"target {target:.4g} GFLOPs is below {method}'s reach: its fewest FLOPs here are {lo:.4g} "
                       f"({lo / dense:.1%} of dense); using the most compressing knob")
        elif target > hi:
            message = (f"target {target:.4g} GFLOPs is above {method}'s reach: its most FLOPs with any merging are "
                       f"{hi:.4g} ({hi / dense:.1%} of dense); using the least compressing knob")
        else:
            message = (f"no knob of {method} lands within {tolerance:.0%} of {target:.4g} GFLOPs; "
                       f"nearest is {achieved:.4g}")
    return Match(method, knob, target, achieved, dense, ok, std, reach, message, extra or {})


def tome_knob(r: int, j: int, depth: int) -> int | list[int]:
    """The r-list with the first ``j`` layers at r+1 and the rest at r (an int when j = 0)."""
    return r if j == 0 else [r + 1] * j + [r] * (depth - j)


def match_tome(spec: SegmenterSpec, target: float, base_knob: dict[str, Any] | None = None,
               tolerance: float = TOLERANCE) -> Match:
    """The ToMe r-list whose closed-form GFLOPs are nearest ``target`` (ties: fewer merges)."""
    base = {k: v for k, v in (base_knob or {}).items() if k not in ("r", "inflect")}
    base.setdefault("prop_attn", True)
    base.setdefault("decoder_on_merged", False)
    depth = spec.depth
    n = spec.grid[0] * spec.grid[1]
    max_r = n // 2
    dense = analytic_gmacs(spec)
    best: tuple[float, int, int, float] | None = None
    lo, hi = math.inf, -math.inf
    for s in range(depth * max_r + 1):
        r, j = divmod(s, depth)
        g = cost.tome_gmacs(spec, {"r": tome_knob(r, j, depth), **base})
        if s > 0:
            lo, hi = min(lo, g), max(hi, g)
        err = abs(g - target)
        if best is None or err < best[0] - 1e-12:
            best = (err, r, j, g)
    assert best is not None
    _, r, j, g = best
    knob = {"r": tome_knob(r, j, depth), **base}
    return _finish("tome", knob, target, g, dense, (lo, hi), tolerance)


def match_cts(spec: SegmenterSpec, target: float, base_knob: dict[str, Any] | None = None,
              tolerance: float = TOLERANCE, include_policy: bool = True) -> Match:
    """The CTS K whose closed-form GFLOPs (policy net included by default) are nearest ``target``."""
    base = {k: v for k, v in (base_knob or {}).items() if k != "k"}
    base.setdefault("policy", None)
    base.setdefault("prop_attn", False)
    base.setdefault("decoder_on_merged", True)
    sh, sw = superpatch_grid(spec.grid)
    dense = analytic_gmacs(spec)
    values = [cost.cts_gmacs(spec, {"k": k, **base}, include_policy) for k in range(sh * sw + 1)]
    k = min(range(len(values)), key=lambda i: (abs(values[i] - target), i))
    reach = (min(values[1:]), max(values[1:])) if len(values) > 1 else (dense, dense)
    return _finish("cts", {"k": k, **base}, target, values[k], dense, reach, tolerance,
                   extra={"policy_net_counted": include_policy})


def match_algm(model: nn.Module, images: Sequence[torch.Tensor], target: float, base_knob: dict[str, Any] | None = None,
               tolerance: float = TOLERANCE, max_iter: int = 30) -> Match:
    """Bisect ALGM's local threshold τ so that the mean GFLOPs over ``images`` meet ``target``.

    Args:
        model: the Segmenter (ideally trained; similarities come from its features).
        images: calibration batches (B, 3, H, W) at the crop size; each image counts as batch 1.
        target: GFLOPs.
        base_knob: other ALGM settings (layers, window, decoder_on_merged, …); τ is solved.
        tolerance: relative tolerance; bisection stops early inside a quarter of it.
        max_iter: bisection steps.
    """
    base = {k: v for k, v in (base_knob or {}).items() if k != "threshold"}
    base.setdefault("prop_attn", False)
    base.setdefault("decoder_on_merged", True)
    # FLOPs are counted per image at batch 1, where per-image and batch-coupled merging agree.
    calib = {**base, "batch_coupled": False}
    spec: SegmenterSpec = model.spec
    dense = analytic_gmacs(spec)

    def evaluate(tau: float) -> cost.Cost:
        return cost.algm_cost(model, images, {**calib, "threshold": tau})

    lo_tau, hi_tau = -1.01, 1.01  # every window merges / none does (cosine ∈ [−1, 1])
    lo, hi = evaluate(lo_tau), evaluate(hi_tau)
    reach = (lo.mean, hi.mean)
    best_tau, best = (lo_tau, lo) if abs(lo.mean - target) <= abs(hi.mean - target) else (hi_tau, hi)
    if lo.mean < target < hi.mean:
        a, b = lo_tau, hi_tau
        for _ in range(max_iter):
            mid = 0.5 * (a + b)
            c = evaluate(mid)
            if abs(c.mean - target) < abs(best.mean - target):
                best_tau, best = mid, c
            if abs(c.mean - target) <= 0.25 * tolerance * target:
                break
            if c.mean < target:
                a = mid
            else:
                b = mid
    knob = {**base, "threshold": best_tau}
    config = cost.config_from_knob(knob, spec.depth, spec.embed_dim)
    knob.setdefault("layers", config.layers)
    knob.setdefault("window", list(config.window))
    knob.setdefault("batch_coupled", config.batch_coupled)
    return _finish("algm", knob, target, best.mean, dense, reach, tolerance, std=best.std,
                   extra={"calibration_images": len(best.per_image)})
