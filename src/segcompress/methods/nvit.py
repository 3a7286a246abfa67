"""NViT-style global structural pruning (Yang et al., CVPR 2023): a smaller model per target.

``segcompress prune`` trains while it prunes (``steps`` × ``interval`` iterations, saliency
ranking, FLOPs-aware) until the closed-form GFLOPs meet the target, and writes the pruned model,
its spec and a report; the model is then fine-tuned and evaluated as it is (``applies="dense"``).
The settings are :class:`~segcompress.prune.config.PruneConfig` (``methods.nvit``).
"""

from __future__ import annotations

from typing import Any

from segcompress.methods import Method
from segcompress.prune.config import PruneConfig

METHOD = Method("nvit", "NViT", "structural", settings=PruneConfig, pruned=True, applies="dense")


def cost(spec: Any, knob: dict[str, Any], model: Any = None, images: Any = None) -> Any:
    """A pruned model's GFLOPs: its own spec's, in closed form."""
    from segcompress.flops import analytic_gmacs
    from segcompress.tokens.cost import Cost

    if knob:
        raise ValueError(f"a pruned model takes no knob, got {knob}")
    return Cost(analytic_gmacs(spec))
