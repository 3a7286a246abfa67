"""DepGraph structural pruning (Fang et al., CVPR 2023) through torch-pruning: a smaller model per target.

``segcompress prune --method depgraph`` takes Taylor gradients of the segmentation loss on
training crops, then prunes the dense model one-shot (heads, head dimensions, MLP widths and the
embedding width E, ranked globally in isomorphic scopes) at the channel ratio whose GFLOPs meet
the target (bisection). It does not train while pruning, so its fine-tuning gets the whole
post-compression budget (NViT's pruning plus fine-tuning iterations). The pruned model is then
evaluated as it is (``applies="dense"``). The algorithm: :mod:`segcompress.prune.depgraph`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from segcompress.methods import Method
from segcompress.settings import Settings

#: Importance criteria (torch-pruning's ``GroupTaylorImportance`` and ``GroupMagnitudeImportance``).
IMPORTANCES: tuple[str, ...] = ("taylor", "magnitude")


@dataclass(frozen=True)
class DepGraphSettings(Settings):
    """Settings of DepGraph pruning (defaults: the Isomorphic-Pruning DeiT recipe, one knob ``p``).

    Ranking:
        importance: ``"taylor"`` (Σ|w·∂L/∂w| over the calibration batches, the examples'
            recommendation for ViTs) or ``"magnitude"`` (L2 norm of the weights, no data).
        global_pruning: rank channels across layers (heads across all blocks).
        isomorphic: give each family of groups of the same topology its own scope (E alone, all
            MLPs, all head-dim groups), so each removes exactly its ratio; needs global_pruning.
    Ratios (for a channel ratio ``p``):
        head_ratio_scale: heads removed = ``p · head_ratio_scale`` of all heads; 0 keeps every head.
        head_dim_scope: head dimensions removed = ``p · head_dim_scope`` of the dims of all
            blocks; 0 keeps the head widths (heads can still be removed).
        round_to: kept channels of a group are a multiple of this (the library rounds a head
            group against the whole ``proj`` width, so keep it at most 2).
        prune_embedding: prune the residual width E; false keeps E (the patch embedding is
            ignored, which protects the whole E group).
    Taylor gradients:
        calibration_batches: batches of training crops whose segmentation loss gradients are
            accumulated (NViT's saliency uses the same data).
        batch_size: crops per calibration batch.
    Target search (:func:`prune_to_target`):
        tolerance: relative window under the target, ``[target·(1-tol), target]`` (NViT's 1%).
        max_ratio: the largest ``p`` tried (bisection on ``[0, max_ratio]``).
        max_bisection_steps: candidates pruned after the one at ``max_ratio``.
    """

    what = "depgraph settings"

    importance: str = "taylor"
    global_pruning: bool = True
    isomorphic: bool = True
    head_ratio_scale: float = 1.0
    head_dim_scope: float = 0.5
    round_to: int = 2
    prune_embedding: bool = True
    calibration_batches: int = 10
    batch_size: int = 8
    tolerance: float = 0.01
    max_ratio: float = 0.9
    max_bisection_steps: int = 20

    def __post_init__(self) -> None:
        super().__post_init__()
        checks = [
            (self.importance in IMPORTANCES, "importance", " or ".join(repr(v) for v in IMPORTANCES)),
            (self.global_pruning or not self.isomorphic, "isomorphic", "false when global_pruning is false"),
            (0.0 < self.max_ratio < 1.0, "max_ratio", "in (0, 1)"),
            (0.0 <= self.head_ratio_scale and self.head_ratio_scale * self.max_ratio < 1.0, "head_ratio_scale",
             ">= 0 with head_ratio_scale * max_ratio < 1"),
            (0.0 <= self.head_dim_scope and self.head_dim_scope * self.max_ratio < 1.0, "head_dim_scope",
             ">= 0 with head_dim_scope * max_ratio < 1"),
            (self.round_to >= 1, "round_to", ">= 1"),
            (self.calibration_batches >= 1, "calibration_batches", ">= 1"),
            (self.batch_size >= 1, "batch_size", ">= 1"),
            (0.0 <= self.tolerance < 1.0, "tolerance", "in [0, 1)"),
            (self.max_bisection_steps >= 1, "max_bisection_steps", ">= 1"),
        ]
        self.require(checks)


METHOD = Method("depgraph", "DepGraph", "structural", settings=DepGraphSettings, pruned=True, applies="dense")


def cost(spec: Any, knob: dict[str, Any], model: Any = None, images: Any = None) -> Any:
    """A pruned model's GFLOPs: its own spec's, in closed form."""
    from segcompress.methods import nvit

    return nvit.cost(spec, knob)


def pruning_iters(settings: DepGraphSettings) -> int:
    """Training iterations spent while pruning: none (one-shot)."""
    return 0


def prune(model: Any, dataset: Any, target_gmacs: float, settings: DepGraphSettings, *, seed: int,
          collate_fn: Any = None, device: Any = None) -> Any:
    """Prune ``model`` to ``target_gmacs``: Taylor gradients on ``calibration_batches`` batches of
    ``dataset`` (order and augmentation drawn from ``seed``), then
    :func:`segcompress.prune.depgraph.prune_to_target`."""
    import itertools

    import torch
    from torch.utils.data import DataLoader

    from segcompress.prune.depgraph import prune_to_target
    from segcompress.seeding import seed_everything

    if len(dataset) == 0:
        raise ValueError("depgraph: the training set is empty; its Taylor importance needs images")
    seed_everything(seed)  # the augmentation draws from the global generators
    model = model.to(device) if device is not None else model
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(dataset, batch_size=settings.batch_size, shuffle=True, generator=generator,
                        collate_fn=collate_fn, drop_last=len(dataset) >= settings.batch_size)
    batches = []
    while len(batches) < settings.calibration_batches:  # a small dataset is cycled
        batches += list(itertools.islice(loader, settings.calibration_batches - len(batches)))
    batches = [tuple(t.to(next(model.parameters()).device) for t in b) for b in batches]
    return prune_to_target(model, target_gmacs, settings, batches)
