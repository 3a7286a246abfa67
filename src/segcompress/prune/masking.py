"""Masked forward of a Segmenter while it is being pruned: the pruned units compute nothing.

Forward hooks (removable, no module is replaced, parameter names stay the same) make the dense
model compute exactly what the physically smaller model will compute:

* ``qkv`` outputs are multiplied by the head × QK × V mask: a pruned head has q = k = 0 and v = 0,
  so its attention output is 0; a pruned QK dim adds nothing to q·k; a pruned V dim feeds 0 to
  ``proj``. The attention scale is fixed, so this equals the smaller module.
* the MLP activation output is multiplied by the hidden mask (exact for any activation).
* every LayerNorm of the residual stream normalises over the *alive* channels only and outputs 0
  on the pruned ones. So the pruned channels of the residual stream are never read (not by a
  LayerNorm, hence not by any block, nor by the decoder behind the final norm), and the result
  equals a LayerNorm of width E' on the kept channels. (NViT zeroes the LayerNorm weights but
  keeps the statistics over all E channels, so its masked model differs from the pruned one
  until fine-tuning; here they are the same, which the tests check.)

Because the pruned units get no signal, their weights get zero gradients, their saliency is 0,
and whatever the optimizer does to them does not matter: they are cut out at the end.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from segcompress.models.segmenter import Segmenter
from segcompress.prune.groups import Key, Masks, PruneSpace


def masked_layer_norm(x: torch.Tensor, ln: nn.LayerNorm, alive: torch.Tensor) -> torch.Tensor:
    """LayerNorm over the channels where ``alive`` (bool or 0/1) is set; 0 on the others."""
    dtype = x.dtype
    xf = x.float()
    m = alive.to(device=x.device, dtype=torch.float32)
    n = m.sum()
    mean = (xf * m).sum(-1, keepdim=True) / n
    xc = (xf - mean) * m
    var = (xc * xc).sum(-1, keepdim=True) / n
    y = xc * torch.rsqrt(var + ln.eps)
    if ln.weight is not None:
        y = y * ln.weight.float()
    if ln.bias is not None:
        y = y + ln.bias.float()
    return (y * m).to(dtype)


class MaskHooks:
    """Forward hooks that apply ``masks`` to ``model`` until :meth:`remove` (or the ``with`` block ends).

    Args:
        model: the dense Segmenter the masks index.
        space: its prunable structures.
        masks: alive units; read at every forward, so pruning steps take effect at once.
    """

    def __init__(self, model: Segmenter, space: PruneSpace, masks: Masks) -> None:
        self.model, self.space, self.masks = model, space, masks
        self._handles: list[Any] = []
        self._cache: dict[tuple[tuple[str, int], torch.device], tuple[int, torch.Tensor | None]] = {}

    def __enter__(self) -> "MaskHooks":
        self.attach()
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def attach(self) -> None:
        if self._handles:
            return
        enc = self.model.encoder
        norms = {s.name.rsplit(".", 1)[0] for s in self.space.emb_slices}
        for name, module in self.model.named_modules():
            if isinstance(module, nn.LayerNorm) and name in norms:
                self._handles.append(module.register_forward_hook(self._ln_hook()))
        for i, blk in enumerate(enc.blocks):
            self._handles.append(blk.attn.qkv.register_forward_hook(self._mul_hook(("qkv", i))))
            self._handles.append(blk.mlp.act.register_forward_hook(self._mul_hook(("mlp", i))))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _vector(self, what: tuple[str, int], device: torch.device) -> torch.Tensor | None:
        """The multiplier for ``what`` on ``device`` (cached per mask version), ``None`` when nothing is pruned."""
        hit = self._cache.get((what, device))
        if hit is not None and hit[0] == self.masks.version:
            return hit[1]
        kind, i = what
        if kind == "qkv":
            full = all(self.masks.is_full(Key(k, i)) for k in ("heads", "qk", "v"))
            vec = None if full else self.space.qkv_mask(i, self.masks)
        elif kind == "mlp":
            key = Key("mlp", i)
            vec = None if self.masks.is_full(key) else self.masks[key].float()
        else:  # the residual channels
            key = Key("emb")
            vec = None if self.masks.is_full(key) else self.masks[key].float()
        vec = vec.to(device) if vec is not None else None
        self._cache[(what, device)] = (self.masks.version, vec)
        return vec

    def _mul_hook(self, what: tuple[str, int]):  # noqa: ANN202
        def hook(module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor | None:
            vec = self._vector(what, out.device)
            if vec is None:
                return None
            return out * vec.to(out.dtype)

        return hook

    def _ln_hook(self):  # noqa: ANN202
        def hook(module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor | None:
            alive = self._vector(("emb", -1), out.device)
            if alive is None:
                return None
            return masked_layer_norm(args[0], module, alive)  # type: ignore[arg-type]

        return hook
