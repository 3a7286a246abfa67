"""ToFu, token fusion (Kim et al., WACV 2024): ToMe's matching, pruning early and MLERP merging late.

Knob: ``r`` as ToMe's (an int or a per-block list; ``inflect`` with an int), plus the settings
below. The algorithm: :mod:`segcompress.tokens.tofu`. Its token counts and GFLOPs are ToMe's at
the same r, so matching is ToMe's exact scan (:func:`segcompress.methods.tome.solve`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from segcompress.methods import Method, Settings
from segcompress.methods import tome


@dataclass(frozen=True)
class ToFuSettings(Settings):
    """ToFu's settings (``methods.tofu``).

    Args:
        switch: the first 0-based block that merges with MLERP; the blocks before it prune (drop
            the matched token, keep its partner). null = depth // 2 + 1 (blocks 0–6 of 12 prune):
            the paper publishes no code, this split is the choice made here.
        prop_attn: proportional attention (as ToMe's default).
        decoder_on_merged: the decoder runs on the merged tokens (as the study's ToMe).
    """

    switch: int | None = None
    prop_attn: bool = True
    decoder_on_merged: bool = True

    def __post_init__(self) -> None:
        if self.switch is not None and self.switch < 0:
            raise ValueError(f"switch must be a block number >= 0, got {self.switch!r}")


METHOD = Method("tofu", "ToFu", "token", settings=ToFuSettings, knob_keys=frozenset({"r", "inflect"}), matched=True)


def build(model: Any, knob: dict[str, Any]) -> Any:
    from segcompress.tokens.tofu import ToFu

    settings, _ = METHOD.split_knob(knob)
    return ToFu(tome.schedule(knob), model.spec.depth, **settings.to_dict())


def cost(spec: Any, knob: dict[str, Any], model: Any = None, images: Any = None) -> Any:
    from segcompress.tokens.cost import Cost
    from segcompress.tokens.tofu import tofu_gmacs

    settings, _ = METHOD.split_knob(knob)
    return Cost(tofu_gmacs(spec, {**knob, **settings.to_dict()}))


def solve(problem: Any) -> Any:
    from segcompress.tokens.tofu import tofu_gmacs

    return tome.solve(problem, METHOD, tofu_gmacs)
