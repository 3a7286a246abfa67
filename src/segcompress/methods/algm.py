"""ALGM (Norouzi et al., CVPR 2024): adaptive local-then-global merging, input-dependent cost.

Knob: the local threshold ``threshold`` (τ; without one, the reference τ of the backbone width on
``dataset``) and the settings below. The algorithm: :mod:`segcompress.tokens.algm`.

Matching bisects τ until the *mean* GFLOPs over the calibration images meet the target (lower τ
merges more; each image counted at batch 1, where per-image and batch-coupled merging agree). The
global stage's threshold is automatic, so FLOPs above τ's ceiling are out of reach. Every
evaluated condition measures its own GFLOPs (the cost depends on the image).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from segcompress.methods import Method, Settings


@dataclass(frozen=True)
class ALGMSettings(Settings):
    """ALGM's settings (``methods.algm``).

    Args:
        layers: the two 1-based blocks that merge (local, then global); null = the reference's,
            1 and 5 for 12 blocks, 1 and 7 for 24.
        window: local merging window, patches per side (an int, or [rows, cols]).
        batch_coupled: the reference's batch coupling (one decision for the whole batch, its
            minimum); false decides per image, as at batch 1.
        global_scale: factor on the automatic global threshold (reference: 1).
        prop_attn: proportional attention (reference: effectively off).
        decoder_on_merged: the decoder runs on the merged tokens (reference: on).
    """

    layers: list[int] | None = None
    window: int | list[int] = 2
    batch_coupled: bool = False
    global_scale: float = 1.0
    prop_attn: bool = False
    decoder_on_merged: bool = True

    def __post_init__(self) -> None:
        window = [self.window] * 2 if isinstance(self.window, int) else list(self.window)
        if len(window) != 2 or window[0] * window[1] < 2 or min(window) < 1:
            raise ValueError(f"window must hold at least 2 patches, got {self.window!r}")
        if self.layers is not None and (len(self.layers) != 2 or self.layers[0] < 1 or self.layers[1] <= self.layers[0]):
            raise ValueError(f"layers must be two increasing 1-based block numbers, got {self.layers!r}")
        if self.global_scale <= 0:
            raise ValueError(f"global_scale must be > 0, got {self.global_scale!r}")


METHOD = Method("algm", "ALGM", "token", settings=ALGMSettings, knob_keys=frozenset({"threshold", "dataset"}),
                matched=True, input_dependent=True)


def build(model: Any, knob: dict[str, Any]) -> Any:
    from segcompress.tokens.algm import ALGM, config_from_knob

    settings, _ = METHOD.split_knob(knob)
    spec = model.spec
    return ALGM(config_from_knob(knob, spec.depth, spec.embed_dim), prop_attn=settings.prop_attn,
                decoder_on_merged=settings.decoder_on_merged)


def cost(spec: Any, knob: dict[str, Any], model: Any = None, images: Any = None) -> Any:
    """Mean and std of the GFLOPs over ``images`` (each image at batch 1)."""
    from segcompress.tokens.algm import algm_cost

    settings, _ = METHOD.split_knob(knob)
    return algm_cost(model, images, {**knob, **settings.to_dict()})


def solve(problem: Any, max_iter: int = 30) -> Any:
    """Bisect τ so that the mean GFLOPs over the calibration images meet the target
    (:func:`~segcompress.tokens.match.bisect_cost`)."""
    from segcompress.flops import analytic_gmacs
    from segcompress.tokens.algm import algm_cost, config_from_knob
    from segcompress.tokens.match import bisect_cost, finish

    base = METHOD.parse_settings(problem.settings).to_dict()
    model, images, spec = problem.model, problem.calibration(), problem.spec
    calib = {**base, "batch_coupled": False}

    def cost(tau: float) -> Any:
        return algm_cost(model, images, {**calib, "threshold": tau})

    # every window merges / none does (cosine ∈ [−1, 1])
    best_tau, best, (lo, hi) = bisect_cost(cost, -1.01, 1.01, problem, max_iter)
    config = config_from_knob(base, spec.depth, spec.embed_dim)
    knob = {**base, "layers": list(config.layers), "window": list(config.window), "threshold": best_tau}
    return finish("algm", knob, problem, best.mean, analytic_gmacs(spec), (lo.mean, hi.mean), std=best.std,
                  extra={"calibration_images": len(best.per_image)})
