"""Prune-then-merge: NViT pruning to part of the budget, then ToMe (off the shelf) for the rest.

The pruning stage aims at ``target ** prune_share`` of the dense GFLOPs
(:func:`segcompress.prune.config.prune_target_gmacs`); ToMe's knob is then solved on the pruned
model for the whole target, with ToMe's settings (``methods.tome``): the variant is evaluated as
ToMe on the pruned checkpoint (``applies="tome"``).
"""

from __future__ import annotations

from dataclasses import dataclass

from segcompress.methods import Method, Settings


@dataclass(frozen=True)
class NViTToMeSettings(Settings):
    """Prune-then-merge's settings (``methods.nvit_tome``).

    Args:
        prune_share: how the budget is split: prune to target**prune_share of the dense GFLOPs,
            then ToMe takes the rest (0.5: equal log-shares; 1.0: pruning alone).
    """

    prune_share: float = 0.5

    def __post_init__(self) -> None:
        if not 0 < self.prune_share <= 1:
            raise ValueError(f"prune_share must be in (0, 1], got {self.prune_share!r}")

    def prune_fraction(self, target: float) -> float:
        """The pruning stage's FLOPs fraction for an overall ``target`` fraction."""
        return float(target) ** self.prune_share


METHOD = Method("nvit_tome", "NViT+ToMe", "hybrid", settings=NViTToMeSettings, matched=True, pruned=True,
                applies="tome", pruner="nvit")
