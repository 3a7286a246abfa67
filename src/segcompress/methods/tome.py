"""ToMe (Bolya et al., ICLR 2023): bipartite soft matching in every block, off the shelf.

Knob: ``r`` (tokens merged per block: an int, or a per-block list) and, with an int ``r``, the
reference's ``inflect`` ramp; settings below. The algorithm: :mod:`segcompress.tokens.tome`.

Matching is exact: the knob is an r-list "the first j blocks merge r+1 tokens, the rest r", which
moves the FLOPs one token-layer at a time; every (r, j) is scanned in closed form (the count is not
monotone everywhere, since switching a block from r=0 to r=1 adds its matching matmul).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from segcompress.methods import Method, Settings


@dataclass(frozen=True)
class ToMeSettings(Settings):
    """ToMe's settings (``methods.tome``).

    Args:
        prop_attn: proportional attention, log(size) added to the attention logits (reference: on).
        decoder_on_merged: the decoder runs on the merged tokens and its mask logits are gathered
            back onto the grid (as ALGM and CTS do); false restores the tokens onto the grid first
            (the decoder then costs as much as the dense one).
    """

    prop_attn: bool = True
    decoder_on_merged: bool = True


METHOD = Method("tome", "ToMe", "token", settings=ToMeSettings, knob_keys=frozenset({"r", "inflect"}), matched=True)


def schedule(knob: dict[str, Any]) -> Any:
    """The r schedule of a knob: ``r`` (int or list), or ``(r, inflect)``."""
    r: Any = knob.get("r")
    if r is None:
        raise ValueError("tome knob needs 'r' (an int or a per-layer list)")
    if "inflect" in knob:
        if not isinstance(r, int):
            raise ValueError("tome 'inflect' needs an int 'r'")
        return (r, float(knob["inflect"]))
    if not isinstance(r, (int, list)):
        raise ValueError(f"tome 'r' must be an int or a list of ints, got {r!r}")
    return r


def build(model: Any, knob: dict[str, Any]) -> Any:
    from segcompress.tokens.tome import ToMe

    settings, _ = METHOD.split_knob(knob)
    return ToMe(schedule(knob), model.spec.depth, **settings.to_dict())


def cost(spec: Any, knob: dict[str, Any], model: Any = None, images: Any = None) -> Any:
    from segcompress.tokens.cost import Cost
    from segcompress.tokens.tome import tome_gmacs

    settings, _ = METHOD.split_knob(knob)
    return Cost(tome_gmacs(spec, {**knob, **settings.to_dict()}))


def r_list(r: int, j: int, depth: int) -> int | list[int]:
    """The r-list with the first ``j`` layers at r+1 and the rest at r (an int when j = 0)."""
    return r if j == 0 else [r + 1] * j + [r] * (depth - j)


def solve(problem: Any, method: Method = METHOD, gmacs: Any = None) -> Any:
    """The r-list whose closed-form GFLOPs are nearest the target (ties: fewer merges).

    ``method``/``gmacs``: another method with ToMe's schedule and cost model (ToFu)."""
    import math

    from segcompress.flops import analytic_gmacs
    from segcompress.tokens.match import finish
    from segcompress.tokens.tome import tome_gmacs

    gmacs = gmacs or tome_gmacs
    spec, target = problem.spec, problem.target
    base = method.parse_settings(problem.settings).to_dict()
    depth = spec.depth
    max_r = spec.grid[0] * spec.grid[1] // 2
    best: tuple[float, int, int, float] | None = None
    lo, hi = math.inf, -math.inf
    for s in range(depth * max_r + 1):
        r, j = divmod(s, depth)
        g = gmacs(spec, {"r": r_list(r, j, depth), **base})
        if s > 0:
            lo, hi = min(lo, g), max(hi, g)
        err = abs(g - target)
        if best is None or err < best[0] - 1e-12:
            best = (err, r, j, g)
    assert best is not None
    _, r, j, g = best
    return finish(method.name, {"r": r_list(r, j, depth), **base}, problem, g, analytic_gmacs(spec), (lo, hi))
