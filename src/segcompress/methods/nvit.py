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


def pruning_iters(settings: PruneConfig) -> int:
    """Training iterations spent while pruning: ``steps`` × ``interval``."""
    return int(settings.steps) * int(settings.interval)


def prune(model: Any, dataset: Any, target_gmacs: float, settings: PruneConfig, *, seed: int,
          collate_fn: Any = None, device: Any = None) -> Any:
    """Prune ``model`` to ``target_gmacs`` while training on ``dataset``
    (:func:`segcompress.prune.nvit.prune`)."""
    from segcompress.prune.nvit import prune as nvit_prune

    return nvit_prune(model, dataset, target_gmacs, settings, seed=seed, collate_fn=collate_fn, device=device)
