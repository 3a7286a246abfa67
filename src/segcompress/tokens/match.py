"""FLOPs matching: what a method's ``solve`` is given (:class:`Problem`) and returns (:class:`Match`).

Each method solves its own knob (``segcompress.methods.<name>.solve``): ToMe and CTS exactly in
closed form, ALGM by bisection of its threshold on calibration images. The tolerance is
|achieved − target| ≤ ``tolerance``·target (1 %). A target out of the method's reach gives the
nearest achievable knob, ``within_tolerance = False`` and a message saying why (:func:`finish`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

if TYPE_CHECKING:
    import torch
    from torch import nn

    from segcompress.models.spec import SegmenterSpec

TOLERANCE = 0.01


@dataclass
class Problem:
    """A FLOPs target for one method on one model.

    Args:
        spec: the model's architecture.
        target: GFLOPs to meet.
        settings: the method's settings as a dict (they go into the knob as they are).
        tolerance: relative tolerance.
        model: the model (input-dependent methods run it).
        images: returns the calibration batches (B, 3, H, W) at the crop size (input-dependent
            methods); called at most once.
    """

    spec: SegmenterSpec
    target: float
    settings: dict[str, Any]
    tolerance: float = TOLERANCE
    model: nn.Module | None = None
    images: Callable[[], Sequence[torch.Tensor]] | None = None

    def calibration(self) -> Sequence[torch.Tensor]:
        if self.images is None or self.model is None:
            raise ValueError("this method's FLOPs depend on the images: give calibration images (--calib-root)")
        batches = self.images()
        if not batches:
            raise ValueError("no calibration images found")
        return batches


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


def finish(method: str, knob: dict[str, Any], problem: Problem, achieved: float, dense: float,
           reach: tuple[float, float], std: float = 0.0, extra: dict[str, Any] | None = None) -> Match:
    """The :class:`Match` of ``knob``, with a message when it misses the target."""
    target, tolerance = problem.target, problem.tolerance
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


def bisect_cost(cost: Callable[[float], Any], low: float, high: float, problem: Problem,
                max_iter: int = 30) -> tuple[float, Any, tuple[Any, Any]]:
    """Bisect a knob x in [``low``, ``high``] whose ``cost(x)`` (a
    :class:`~segcompress.tokens.cost.Cost`, its ``mean`` rising with x) meets ``problem.target``.

    Returns (best x, its cost, (cost(low), cost(high))): the nearest of every knob tried; the
    bisection runs only when the target lies between the two ends and stops early inside a
    quarter of the tolerance.
    """
    target = problem.target
    lo, hi = cost(low), cost(high)
    best_x, best = (low, lo) if abs(lo.mean - target) <= abs(hi.mean - target) else (high, hi)
    if lo.mean < target < hi.mean:
        a, b = low, high
        for _ in range(max_iter):
            mid = 0.5 * (a + b)
            c = cost(mid)
            if abs(c.mean - target) < abs(best.mean - target):
                best_x, best = mid, c
            if abs(c.mean - target) <= 0.25 * problem.tolerance * target:
                break
            if c.mean < target:
                a = mid
            else:
                b = mid
    return best_x, best, (lo, hi)

