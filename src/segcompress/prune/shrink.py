"""Physical removal: a smaller Segmenter built from the pruned spec and loaded with the kept weights.

The pruned model is an ordinary Segmenter whose spec lists per-block widths (and a smaller E);
``save_model``/``load_model`` write and rebuild it from the JSON spec alone, so nothing of the
pruning code is needed to use it.
"""

from __future__ import annotations

import torch

from segcompress.models.segmenter import Segmenter, build_segmenter
from segcompress.prune.groups import Masks, PruneSpace


def kept_state(model: Segmenter, space: PruneSpace, masks: Masks) -> dict[str, torch.Tensor]:
    """The dense model's state dict with the pruned rows/columns cut out (CPU tensors)."""
    index = space.keep_indices(masks)
    state = model.state_dict()
    missing = sorted(set(index) - set(state))
    if missing:
        raise RuntimeError(f"pruning indexes parameters the model does not have: {missing[:5]}")
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        t = tensor.detach().cpu()
        for dim, idx in index.get(name, {}).items():
            t = t.index_select(dim, idx)
        out[name] = t.clone().contiguous()
    return out


def shrink(model: Segmenter, space: PruneSpace, masks: Masks) -> Segmenter:
    """The physically smaller Segmenter that ``masks`` describe, on the CPU, in ``model``'s mode.

    Its output equals the masked dense model's (:class:`segcompress.prune.masking.MaskHooks`).
    """
    spec = space.pruned_spec(masks)
    small = build_segmenter(spec)
    small.load_state_dict(kept_state(model, space, masks), strict=True)
    return small.train(model.training)
