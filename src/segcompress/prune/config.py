"""Settings of NViT-style structural pruning (docs/methods.md §5), with the reference values documented.

Every knob has a default that is either the NViT reference value (``NVlabs/NViT``, DeiT-B with 12
blocks of width 768) or its generalisation to any ViT, and every default is stated here, in one
place, so a preset can override it by name (``segcompress prune --config-json '{...}'``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Self

from segcompress.settings import Settings

#: Kinds of prunable structure, in the order they are listed and tie-broken.
#: ``emb`` is global (the residual width E shared by every block); the others are per block.
KINDS: tuple[str, ...] = ("emb", "heads", "qk", "v", "mlp")

#: What an EMB channel's saliency sums over (:class:`PruneConfig` ``emb_saliency``).
EMB_SALIENCY: tuple[str, ...] = ("reference", "group")

#: Recommended ``prune_share`` for prune-then-merge (NViT, then ToMe): prune to sqrt(target).
PTM_PRUNE_SHARE = 0.5


@dataclass(frozen=True)
class PruneConfig(Settings):
    """Settings of one pruning run.

    Structures (NViT's ``create_pruning_structure_vit`` flags):
        prune_emb, prune_heads, prune_qk, prune_v, prune_mlp: which kinds may be pruned.

    Group sizes. Units of one structure are ranked by saliency and removed in groups of this many
    (NViT's hard-coded ``group_criteria``: EMB 16, heads 2, QK 8, V 8, MLP 16). A group never holds
    more than ``n // group_clamp`` units of a structure that started with ``n`` (and at least 1),
    so small models are pruned finely: with the default 4, ViT-S (6 heads) and ViT-T (3 heads)
    prune heads one at a time, ViT-B keeps the reference 2.
        group_emb, group_heads, group_qk, group_v, group_mlp, group_clamp.

    Saliency (NViT method 23): per unit ``(Σ_{w in unit} w·∂L/∂w / c)²`` per mini-batch, averaged
    over the ``interval`` batches of a pruning step, then smoothed across steps with an EMA.
        momentum: EMA coefficient (reference ``pruning_momentum`` 0.9; 0 = no smoothing).
        reset_saliency: zero the EMA right after the first pruning step, so the later steps rank
            by saliency measured on the pruned network only (reference: NViT's training loop
            zeroes it when the student turns to eval mode after the first prune). ``false``
            keeps the first step's average in the EMA.
        emb_saliency: which slices of the E group an EMB channel's ``Σ w·∂L/∂w`` runs over.
            ``"reference"`` (default, NViT's ``compute_criteria_from``): the patch embedding's
            output, every block's ``proj`` and ``fc2`` output rows and ``qkv`` and ``fc1`` input
            columns. ``"group"``: every slice pruned with the channel, i.e. also every LayerNorm
            weight and bias, the class and position tokens and the decoder's input projection.
        scale_emb, scale_heads, scale_qk, scale_v, scale_mlp: the divisors ``c`` (applied before
            squaring), which make the kinds comparable. Reference: EMB 12, heads 12 (6 for the
            head flag times 2 for the Q/V slices), QK 2, V 2, MLP 1. The reference EMB divisor is
            the number of DeiT-B blocks (an E channel's sum runs over every block), so
            ``scale_emb=None`` means ``depth`` here; the others are used as published.

    FLOPs-aware ranking (replaces NViT's latency look-up table). Each candidate group's saliency
    ``I`` (sum over its units) is weighed against the FLOPs ``ΔF`` it saves, from the closed-form
    count (:func:`segcompress.flops.analytic_gmacs` on the current widths minus the group):
        flops_mode: ``"ratio"`` (default): score ``I / ΔF^eta``, the saliency lost per GMAC saved,
            a greedy knapsack; ``eta = 0`` ranks by saliency alone, ``eta = 1`` by saliency per
            GMAC. ``"subtract"``: NViT's form ``I' = I - eta·ΔLat`` with both terms made
            dimensionless, ``I/ΣI - eta·ΔF/F_dense`` (ΣI over all alive units); ``eta = 0`` is
            again saliency alone. NViT's latency ``eta`` (5e-4 per ms) has no FLOPs equivalent.
        eta: the regulariser η (default 1.0 with ``"ratio"``).

    Schedule. Pruning is iterative and interleaved with training (:func:`segcompress.train.fit`):
    every ``interval`` iterations is one pruning step, ``steps`` steps in all. Step ``s`` prunes
    the globally lowest-scored groups until the closed-form FLOPs reach
    ``F_dense - (F_dense - target)·s/steps`` (linear in FLOPs); the last step reaches the target.
    No step goes below ``target·(1 - tolerance)``: when the next group would, each structure offers
    its largest group among ``g, g/2, …, 1`` that fits (finer granularity; E only if nothing else
    fits), so the result lands in ``[target·(1-tol), target]`` with widths kept aligned.
        steps: pruning steps (NViT: 2 groups every 100 iterations until the latency target).
        interval: training iterations per step, over which the saliency is averaged (NViT 100).
        tolerance: relative window under the target (1%).
        min_keep: units every structure keeps. ``None`` (default): one group of that structure,
            as NViT ("at least one group per layer is kept"), so with the reference sizes a block
            keeps ≥ 8 QK and V dims per head and ≥ 16 MLP channels and E ≥ 16; an integer ≥ 1
            sets one floor for all (1: a block never loses all heads, QK/V dims or MLP channels).
        student_eval: switch the student to eval mode after the first pruning step (NViT's
            ``--student_eval``; no dropout / drop-path while the saliency is measured).

    Training while pruning (through :func:`segcompress.train.fit`, Segmenter's SGD + poly recipe):
        recipe: :class:`segcompress.train.Recipe` keys for the pruning phase; ``iters`` is set to
            ``steps·interval``. NViT used AdamW at 1e-4·batch/512; the default here is SGD at a
            tenth of Segmenter's training lr (1e-4).
        kd_weight, kd_temperature: per-pixel KL to the dense model (the pruning starts from it),
            NViT style; 0 switches it off. Before the first pruning step the student equals the
            teacher, so the term is ~0, as NViT's switched-off KD.

    Prune-then-merge (docs/methods.md §6):
        prune_share: the share ``s`` of the log-FLOPs reduction done by pruning: for an overall
            target fraction ``F`` the model is pruned to ``F**s`` of the dense FLOPs, and ToMe's
            ``r`` is then solved on the pruned model for the overall target (``segcompress match
            --method tome --model pruned.safetensors``). ``1.0`` = pure NViT (default);
            :data:`PTM_PRUNE_SHARE` = 0.5 for prune-then-merge (see ``docs/pruning.md``).
    """

    what = "prune config"

    prune_emb: bool = True
    prune_heads: bool = True
    prune_qk: bool = True
    prune_v: bool = True
    prune_mlp: bool = True

    group_emb: int = 16
    group_heads: int = 2
    group_qk: int = 8
    group_v: int = 8
    group_mlp: int = 16
    group_clamp: int = 4

    momentum: float = 0.9
    reset_saliency: bool = True
    emb_saliency: str = "reference"
    scale_emb: float | None = None
    scale_heads: float = 12.0
    scale_qk: float = 2.0
    scale_v: float = 2.0
    scale_mlp: float = 1.0

    flops_mode: str = "ratio"
    eta: float = 1.0

    steps: int = 10
    interval: int = 10
    tolerance: float = 0.01
    min_keep: int | None = None
    student_eval: bool = True

    recipe: dict[str, Any] = field(default_factory=lambda: {"lr": 1e-4, "min_lr": 1e-6, "batch_size": 8})
    kd_weight: float = 1.0
    kd_temperature: float = 1.0

    prune_share: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        checks = [
            (all(self.group_size(k) >= 1 for k in KINDS), "group_*", ">= 1"),
            (self.group_clamp >= 1, "group_clamp", ">= 1"),
            (0.0 <= self.momentum < 1.0, "momentum", "in [0, 1)"),
            (self.emb_saliency in EMB_SALIENCY, "emb_saliency", " or ".join(repr(v) for v in EMB_SALIENCY)),
            (all(s > 0 for s in (self.scale_heads, self.scale_qk, self.scale_v, self.scale_mlp)), "scale_*", "> 0"),
            (self.scale_emb is None or self.scale_emb > 0, "scale_emb", "> 0 or null"),
            (self.flops_mode in ("ratio", "subtract"), "flops_mode", "'ratio' or 'subtract'"),
            (self.eta >= 0, "eta", ">= 0"),
            (self.steps >= 1, "steps", ">= 1"),
            (self.interval >= 1, "interval", ">= 1"),
            (0.0 <= self.tolerance < 1.0, "tolerance", "in [0, 1)"),
            (self.min_keep is None or self.min_keep >= 1, "min_keep", "an integer >= 1 or null"),
            (self.kd_weight >= 0, "kd_weight", ">= 0"),
            (self.kd_temperature > 0, "kd_temperature", "> 0"),
            (0.0 < self.prune_share <= 1.0, "prune_share", "in (0, 1]"),
        ]
        self.require(checks)
        if "iters" in self.recipe:
            raise ValueError("prune config 'recipe' must not set 'iters' (it is steps * interval)")

    def enabled(self, kind: str) -> bool:
        """Whether structures of ``kind`` may be pruned."""
        return bool(getattr(self, f"prune_{kind}"))

    def group_size(self, kind: str) -> int:
        """Reference group size of ``kind`` (before clamping to the model's width)."""
        return int(getattr(self, f"group_{kind}"))

    def scale(self, kind: str, depth: int) -> float:
        """Saliency divisor of ``kind`` (applied before squaring); EMB defaults to ``depth``."""
        if kind == "emb":
            return float(depth if self.scale_emb is None else self.scale_emb)
        return float(getattr(self, f"scale_{kind}"))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, source: str | None = None) -> Self:
        """Build from a mapping (e.g. the config's ``prune`` section); unknown keys are rejected by
        name. A ``recipe`` given is merged over the default one."""
        if isinstance(data, Mapping) and isinstance(data.get("recipe"), dict):
            data = {**data, "recipe": {**cls().recipe, **data["recipe"]}}
        return super().from_dict(data, source)


def prune_target_gmacs(dense_gmacs: float, overall_target_gmacs: float, prune_share: float) -> float:
    """FLOPs the pruning stage aims at when it does ``prune_share`` of the (log) reduction.

    ``dense · (target/dense) ** share``: share 1 prunes all the way to the target; share 0.5 prunes
    to the geometric mean of dense and target, leaving the same factor to token merging.
    """
    if dense_gmacs <= 0 or overall_target_gmacs <= 0:
        raise ValueError("FLOPs must be positive")
    fraction = min(1.0, overall_target_gmacs / dense_gmacs)
    return dense_gmacs * fraction ** prune_share
