"""The dense model: the reference every method is compared with (no knob, no settings)."""

from __future__ import annotations

from typing import Any

from segcompress.methods import Method

METHOD = Method("dense", "Dense", "reference")


def cost(spec: Any, knob: dict[str, Any], model: Any = None, images: Any = None) -> Any:
    """The dense model's GFLOPs (closed form)."""
    from segcompress.flops import analytic_gmacs
    from segcompress.tokens.cost import Cost

    if knob:
        raise ValueError(f"method 'dense' takes no knob, got {knob}")
    return Cost(analytic_gmacs(spec))
