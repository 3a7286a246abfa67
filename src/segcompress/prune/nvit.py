"""NViT-style global structural pruning of a Segmenter encoder to a FLOPs target (docs/methods.md §5).

:class:`NViTPruner` holds the masks, the saliency and the global, FLOPs-aware ranking;
:func:`prune` runs it interleaved with training through :func:`segcompress.train.fit` and returns
the physically smaller model.

One pruning step (every ``interval`` training iterations):

1. the saliency of every unit, averaged over the step's batches, is folded into its EMA (zeroed
   right after the first step unless ``reset_saliency`` is false, as NViT does);
2. every structure offers its next group: its ``g`` lowest-scored alive units (``g`` = the kind's
   group size, never touching its floor: the best ``min_keep`` units, by default one group);
3. each group's summed saliency ``I`` is weighed against the FLOPs ``ΔF`` its removal saves
   (closed form, :func:`segcompress.flops.analytic_gmacs`, at the current widths): score
   ``I / ΔF^η`` (or NViT's subtractive form, see :class:`PruneConfig`);
4. the lowest-scored group over all structures of all blocks is pruned (masked), the candidates
   are recomputed (widths, hence ΔF, changed), and so on until the FLOPs reach the step's
   target. When the best group would undershoot the final window ``[target·(1-tol), target]``,
   each structure offers its largest group among ``g, g/2, …, 1`` that stays in the window (finer
   granularity, widths kept as aligned as possible), so the last step lands in the window.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.utils.data import Dataset

from segcompress.flops import analytic_gmacs, count_params
from segcompress.models.segmenter import Segmenter
from segcompress.models.spec import BlockDims
from segcompress.prune.config import KINDS, PruneConfig
from segcompress.prune.groups import Key, PruneSpace
from segcompress.prune.masking import MaskHooks
from segcompress.prune.saliency import Saliency
from segcompress.prune.shrink import shrink

log = logging.getLogger(__name__)

Widths = tuple[int, list[BlockDims]]


@dataclass
class Candidate:
    """A group of units one structure offers for removal.

    Args:
        key: the structure.
        units: indices of the units (in the dense structure).
        importance: summed saliency of the units.
        delta: GMACs saved by removing them at the current widths.
        score: the FLOPs-aware ranking score (lowest is pruned first).
    """

    key: Key
    units: torch.Tensor
    importance: float
    delta: float
    score: float = 0.0


class NViTPruner:
    """Masks, saliency and global ranking for one dense Segmenter.

    Args:
        model: the dense Segmenter (pruned in place by masks; never changed structurally).
        config: pruning settings.
    """

    def __init__(self, model: Segmenter, config: PruneConfig) -> None:
        self.model, self.config = model, config
        self.space = PruneSpace(model)
        device = next(model.parameters()).device
        self.masks = self.space.new_masks(device)
        kinds = tuple(k for k in KINDS if config.enabled(k))
        if not kinds:
            raise ValueError("prune config enables no structure (all prune_* are false)")
        self.keys = list(self.space.keys(kinds))
        self.group = {
            k: max(1, min(config.group_size(k.kind), self.space.sizes[k] // config.group_clamp)) for k in self.keys
        }
        # units every structure keeps: one group (NViT) unless config.min_keep says otherwise
        self.floor = {k: self.group[k] if config.min_keep is None else config.min_keep for k in self.keys}
        self.saliency = Saliency(model, self.space, config, self.keys)
        self.dense_gmacs = self.gmacs(self._dense_widths())
        self.history: list[dict[str, Any]] = []

    # ------------------------------------------------------------------------ FLOPs

    def _dense_widths(self) -> Widths:
        return self.space.spec.embed_dim, [dataclasses.replace(d) for d in self.space.dims]

    def widths(self) -> Widths:
        """(E, per-block dims) of the masked model now."""
        return self.space.widths(self.masks)

    def gmacs(self, widths: Widths | None = None) -> float:
        """Closed-form GMACs of the model with ``widths`` (default: the current ones)."""
        return analytic_gmacs(self.space.spec_for(*(widths if widths is not None else self.widths())))

    def min_gmacs(self) -> float:
        """The smallest FLOPs pruning can reach (every enabled structure down to its floor)."""
        E, blocks = self._dense_widths()
        for key in self.keys:
            E, blocks = _reduce((E, blocks), key, self._prunable(key, dense=True))
        return self.gmacs((E, blocks))

    # ------------------------------------------------------------------------ steps

    def hooks(self) -> MaskHooks:
        """Forward hooks that apply the masks (use as a context manager)."""
        return MaskHooks(self.model, self.space, self.masks)

    def accumulate(self) -> None:
        """Add the current batch's saliency (after ``backward``)."""
        self.saliency.accumulate()

    def step(self, step_target: float, final_target: float) -> dict[str, Any]:
        """End of a pruning step: update the saliency, then prune down to ``step_target`` GMACs
        (after the first step, the saliency's running average is zeroed if ``reset_saliency``)."""
        self.saliency.update(self.masks)
        before = self.gmacs()
        pruned = self.prune_to(step_target, final_target * (1.0 - self.config.tolerance))
        E, blocks = self.widths()
        record = {
            "step": len(self.history) + 1,
            "target_gflops": step_target,
            "gflops_before": before,
            "gflops": self.gmacs(),
            "pruned": pruned,
            "embed_dim": E,
            "blocks": [dataclasses.asdict(b) for b in blocks],
        }
        self.history.append(record)
        if record["step"] == 1 and self.config.reset_saliency:
            self.saliency.reset()  # NViT: the average restarts on the pruned network
        log.info("prune step %d: %.4f -> %.4f GFLOPs (target %.4f), pruned %s", record["step"], before,
                 record["gflops"], step_target, pruned or "nothing")
        return record

    def prune_to(self, target: float, lower: float) -> dict[str, int]:
        """Prune the lowest-scored groups until the FLOPs are ≤ ``target``, never below ``lower``.

        Returns:
            units pruned per structure (``"heads.3": 2``).
        """
        if self.saliency.scores is None:
            raise RuntimeError("no saliency yet: accumulate() over some batches, then step()")
        scores = {k: v.detach().double().cpu() for k, v in self.saliency.scores.items()}
        pruned: dict[str, int] = {}
        widths = self.widths()
        current = self.gmacs(widths)
        while current > target:
            groups = self._candidates(scores, widths, current)
            if not groups:
                log.warning("nothing left to prune at %.4f GFLOPs (target %.4f)", current, target)
                break
            best = min(groups, key=lambda c: c.score)
            if current - best.delta < lower:  # the group would undershoot the window: finer granularity
                best = self._fine_candidate(scores, widths, current, lower)
            self.masks.remove(best.key, best.units)
            for s in (scores, self.saliency.scores):
                s[best.key] = s[best.key].clone()
                s[best.key][best.units.to(s[best.key].device)] = 0.0
            pruned[str(best.key)] = pruned.get(str(best.key), 0) + len(best.units)
            widths = self.widths()
            current = self.gmacs(widths)
        return pruned

    def shrink(self) -> Segmenter:
        """The physically smaller Segmenter (CPU) the current masks describe."""
        return shrink(self.model, self.space, self.masks)

    # ------------------------------------------------------------------------ ranking

    def _prunable(self, key: Key, dense: bool = False) -> int:
        n = self.space.sizes[key] if dense else self.masks.count(key)
        return max(0, n - self.floor[key])

    def _candidate(self, key: Key, scores: dict[Key, torch.Tensor], widths: Widths, current: float,
                   k: int) -> Candidate | None:
        """The ``k`` lowest-scored alive units of ``key`` (unscored), or None if they save nothing."""
        alive = self.masks.keep_index(key)
        values, order = torch.sort(scores[key][alive], stable=True)
        delta = current - self.gmacs(_reduce(widths, key, k))
        if delta <= 0:
            return None
        return Candidate(key, alive[order[:k]], float(values[:k].sum()), delta)

    def _candidates(self, scores: dict[Key, torch.Tensor], widths: Widths, current: float) -> list[Candidate]:
        """The next group of every structure, scored."""
        out = []
        for key in self.keys:
            n = self._prunable(key)
            if n > 0 and (c := self._candidate(key, scores, widths, current, min(self.group[key], n))) is not None:
                out.append(c)
        return self._score(out, scores)

    def _fine_candidate(self, scores: dict[Key, torch.Tensor], widths: Widths, current: float, lower: float) -> Candidate:
        """Finer granularity near the target: every structure offers its largest group size among
        ``g, g/2, g/4, ..., 1`` that keeps the FLOPs ≥ ``lower`` (so widths stay as aligned as the
        window allows); the best-scored offer wins, E only if no per-block structure fits."""
        offers: list[Candidate] = []
        smallest: Candidate | None = None
        for key in self.keys:
            n = self._prunable(key)
            k = min(self.group[key], n)
            while k >= 1:
                c = self._candidate(key, scores, widths, current, k)
                if c is not None and k == 1 and (smallest is None or c.delta < smallest.delta):
                    smallest = c
                if c is not None and current - c.delta >= lower:
                    offers.append(c)
                    break
                k //= 2
        offers = [c for c in offers if c.key.kind != "emb"] or offers
        if offers:
            return min(self._score(offers, scores), key=lambda c: c.score)
        if smallest is None:
            raise RuntimeError("no prunable unit left")
        log.warning("no unit lands in the target window; undershooting by %.4f GFLOPs", lower - (current - smallest.delta))
        return smallest

    def _score(self, cands: list[Candidate], scores: dict[Key, torch.Tensor]) -> list[Candidate]:
        """Set each candidate's FLOPs-aware score (lower = pruned first)."""
        if self.config.flops_mode == "ratio":
            for c in cands:
                c.score = c.importance / c.delta ** self.config.eta
        else:
            total = float(sum(scores[k][self.masks[k].cpu()].sum() for k in self.keys)) or 1.0
            for c in cands:
                c.score = c.importance / total - self.config.eta * c.delta / self.dense_gmacs
        return cands


def _reduce(widths: Widths, key: Key, k: int) -> Widths:
    """``widths`` with ``k`` fewer units in structure ``key``."""
    E, blocks = widths
    if key.kind == "emb":
        return E - k, blocks
    assert key.block is not None
    blocks = list(blocks)
    b = blocks[key.block]
    field_name = {"heads": "num_heads", "qk": "qk_dim", "v": "v_dim", "mlp": "mlp_hidden"}[key.kind]
    blocks[key.block] = dataclasses.replace(b, **{field_name: getattr(b, field_name) - k})
    return E, blocks


# ------------------------------------------------------------------------------ driver


@dataclass
class PruneResult:
    """Outcome of :func:`prune`.

    Args:
        model: the physically smaller Segmenter (the dense model itself when nothing was pruned).
        dense_gmacs, target_gmacs, achieved_gmacs: closed-form GMACs (fvcore convention).
        steps: one record per pruning step (FLOPs before/after, units pruned, widths).
        pruned_units: indices of the pruned units of every structure that lost some.
        dense_params: parameters of the dense model.
    """

    model: Segmenter
    dense_gmacs: float
    target_gmacs: float
    achieved_gmacs: float
    dense_params: int
    steps: list[dict[str, Any]] = field(default_factory=list)
    pruned_units: dict[str, list[int]] = field(default_factory=dict)

    def report(self) -> dict[str, Any]:
        """JSON-ready summary: FLOPs (GFLOPs = GMACs, the project's convention), params, per-block widths."""
        spec = self.model.spec
        return {
            "dense_gflops": self.dense_gmacs,
            "target_gflops": self.target_gmacs,
            "achieved_gflops": self.achieved_gmacs,
            "achieved_fraction": self.achieved_gmacs / self.dense_gmacs,
            "dense_params": self.dense_params,
            "params": count_params(self.model),
            "embed_dim": spec.embed_dim,
            "blocks": [dataclasses.asdict(spec.block_dims(i)) for i in range(spec.depth)],
            "attn_scale": spec.attn_scale,
            "num_steps": len(self.steps),
            "steps": self.steps,
            "pruned_units": self.pruned_units,
        }


def prune(
        model: Segmenter,
        dataset: Dataset,
        target_gmacs: float,
        config: PruneConfig,
        *,
        seed: int,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        device: str | torch.device | None = None,
) -> PruneResult:
    """Prune ``model`` to ``target_gmacs`` while training on ``dataset``; returns the smaller model.

    Runs :func:`segcompress.train.fit` for ``steps·interval`` iterations with the masks applied,
    the saliency accumulated after every backward and a pruning step every ``interval``
    iterations (per-pixel KL to a frozen copy of the dense model when ``kd_weight > 0``). A target
    at or above the dense FLOPs returns ``model`` unchanged (no training either). ``model``
    itself is trained in place (pass a copy to keep the dense weights).

    Raises:
        ValueError: the target is below what pruning can reach (every structure at its floor).
    """
    from segcompress.train import Callbacks, Distillation, Recipe, Runtime, fit

    dense_params = count_params(model)
    dense = analytic_gmacs(model.spec)
    if target_gmacs >= dense:
        log.info("target %.4f GFLOPs >= dense %.4f: nothing to prune", target_gmacs, dense)
        return PruneResult(model, dense, target_gmacs, dense, dense_params)
    pruner = NViTPruner(model, config)
    reachable = pruner.min_gmacs()
    if target_gmacs < reachable:
        floor = "one group each (min_keep: null)" if config.min_keep is None else f"min_keep={config.min_keep}"
        raise ValueError(
            f"target {target_gmacs:.4f} GFLOPs is below the smallest prunable model ({reachable:.4f} GFLOPs, "
            f"every enabled structure at its floor, {floor}); raise the target, enable more structures "
            f"or lower the prune config's min_keep"
        )
    steps, interval = config.steps, config.interval
    schedule = [dense - (dense - target_gmacs) * s / steps for s in range(1, steps + 1)]
    schedule[-1] = target_gmacs
    recipe = Recipe.from_dict({**config.recipe, "iters": steps * interval}, source="prune config 'recipe'")
    teacher = copy.deepcopy(model).eval() if config.kd_weight > 0 else None

    def on_grad(info: Any) -> None:
        pruner.accumulate()

    def on_step(info: Any) -> bool:
        if info.step % interval:
            return False
        s = info.step // interval
        pruner.step(schedule[s - 1], target_gmacs)
        if config.student_eval:
            info.model.eval()
        return s >= steps

    log.info("pruning %.4f -> %.4f GFLOPs in %d steps of %d iterations (%s)", dense, target_gmacs, steps, interval,
             ", ".join(f"{k}: group {pruner.group[k]}" for k in pruner.keys if k.block in (None, 0)))
    with pruner.hooks():
        fit(model, dataset, recipe, seed=seed,
            distill=None if teacher is None else Distillation(teacher, config.kd_weight, config.kd_temperature),
            callbacks=Callbacks(on_grad, on_step), collate_fn=collate_fn, runtime=Runtime(device=device))
    achieved = pruner.gmacs()
    small = pruner.shrink().eval()
    return PruneResult(small, dense, target_gmacs, achieved, dense_params, pruner.history, pruner.masks.state())
