"""NViT's Hessian-aware saliency of every prunable unit (docs/methods.md §5.2, NViT method 23).

For a unit S (a channel, head or dim), after a backward pass::

    I_S = (Σ_{w in S} w · ∂L/∂w  /  c_kind)²

the squared first-order change of the loss when S is removed, i.e. the Fisher approximation of the
second-order (Hessian) term ½·E[(gᵀw_S)²] (the first-order term vanishes at convergence). It is
averaged over the mini-batches of one pruning step and smoothed across steps with an EMA
(momentum 0.9), which NViT zeroes once, right after the first prune (:meth:`Saliency.reset`);
pruned units score 0.

Which parameters a unit sums over follows NViT's ``compute_criteria_from``:

* ``emb``: NViT's slices of the E group (found by DepGraph): the patch embedding's output, the
  ``proj`` and ``fc2`` output rows and the ``qkv`` and ``fc1`` input columns of every block; with
  ``emb_saliency: group``, every slice of the group (also the LayerNorms, the class and position
  tokens and the decoder's input projection);
* ``heads``: the head's Q, K and V rows of ``qkv`` (weights and biases);
* ``qk``: the Q rows of that dim in every head;
* ``v``: the V rows of that dim in every head;
* ``mlp``: the ``fc1`` row and bias.
"""

from __future__ import annotations

import torch
from torch import nn

from segcompress.prune.config import PruneConfig
from segcompress.prune.groups import Key, Masks, ParamSlice, PruneSpace


class Saliency:
    """Accumulates per-unit saliency over batches and smooths it across pruning steps.

    Args:
        model: the dense Segmenter being pruned (its parameters' ``.grad`` are read).
        space: its prunable structures.
        config: scale constants and momentum.
        keys: the structures to score.
    """

    def __init__(self, model: nn.Module, space: PruneSpace, config: PruneConfig, keys: list[Key]) -> None:
        self.space = space
        self.keys = list(keys)
        self.params = dict(model.named_parameters())
        self.divisor = {k: config.scale(k.kind, space.depth) for k in self.keys}
        self.momentum = config.momentum
        self.all_emb_slices = config.emb_saliency == "group"
        self._sum: dict[Key, torch.Tensor] = {}
        self._batches = 0
        self.scores: dict[Key, torch.Tensor] | None = None

    def unit_sums(self) -> dict[Key, torch.Tensor]:
        """Σ w·∂L/∂w per unit of every structure, from the current gradients."""
        out: dict[Key, torch.Tensor] = {}
        wanted = set(self.keys)
        if Key("emb") in wanted:
            out[Key("emb")] = self._sum_slices(self.space.emb_slices, self.space.spec.embed_dim, self.all_emb_slices)
        for i, d in enumerate(self.space.dims):
            if Key("mlp", i) in wanted:
                out[Key("mlp", i)] = self._sum_slices(self.space.mlp_slices[i], d.mlp_hidden)
            if not wanted & {Key("heads", i), Key("qk", i), Key("v", i)}:
                continue
            prefix = f"encoder.blocks.{i}.attn.qkv"
            rows = self._wg(self.params[f"{prefix}.weight"]).sum(dim=1)
            if f"{prefix}.bias" in self.params:
                rows = rows + self._wg(self.params[f"{prefix}.bias"])
            h, dq, dv = d.num_heads, d.qk_dim, d.v_dim
            q, k, v = rows.split([h * dq, h * dq, h * dv])
            q, k, v = q.view(h, dq), k.view(h, dq), v.view(h, dv)
            out[Key("heads", i)] = q.sum(1) + k.sum(1) + v.sum(1)
            out[Key("qk", i)] = q.sum(0)
            out[Key("v", i)] = v.sum(0)
        return {k: v for k, v in out.items() if k in wanted}

    def accumulate(self) -> None:
        """Add this batch's ``(Σ w·g / c)²`` per unit (call after ``backward``)."""
        for key, value in self.unit_sums().items():
            term = (value.detach().double() / self.divisor[key]).pow(2)
            self._sum[key] = self._sum[key] + term if key in self._sum else term
        self._batches += 1

    def update(self, masks: Masks) -> dict[Key, torch.Tensor]:
        """End of a pruning step: batch mean, EMA across steps, 0 for pruned units; resets the sums."""
        if self._batches == 0:
            raise RuntimeError("no saliency accumulated since the last pruning step (call accumulate after backward)")
        scores: dict[Key, torch.Tensor] = {}
        for key in self.keys:
            mean = self._sum[key] / self._batches
            if self.scores is not None and self.momentum > 0:
                mean = self.momentum * self.scores[key] + (1.0 - self.momentum) * mean
            scores[key] = torch.where(masks[key].to(mean.device), mean, torch.zeros_like(mean))
        self.scores = scores
        self._sum, self._batches = {}, 0
        return scores

    def reset(self) -> None:
        """Zero the running average (NViT, right after the first prune): the next :meth:`update`
        is ``(1 - momentum)`` times its batch mean, so the ranking restarts from the pruned network."""
        if self.scores is not None:
            self.scores = {k: torch.zeros_like(v) for k, v in self.scores.items()}

    # ----------------------------------------------------------------------------- helpers

    @staticmethod
    def _wg(p: nn.Parameter) -> torch.Tensor:
        if p.grad is None:
            return torch.zeros_like(p, dtype=torch.float32)
        return p.detach().float() * p.grad.detach().float()

    def _sum_slices(self, slices: list[ParamSlice], units: int, every: bool = False) -> torch.Tensor:
        """Σ w·g per unit over the saliency sources among ``slices`` (``every``: all of them)."""
        total: torch.Tensor | None = None
        for s in slices:
            if not (s.source or every):
                continue
            wg = self._wg(self.params[s.name])
            part = wg.movedim(s.dim, 0).reshape(units, -1).sum(dim=1)
            total = part if total is None else total + part
        if total is None:
            raise RuntimeError("a structure has no saliency source")
        return total
