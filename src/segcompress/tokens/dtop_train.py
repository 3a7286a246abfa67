"""DToP's first training phase on Segmenter: the auxiliary heads on the frozen dense model.

The reference trains in two phases (``config/prune/BASE_*.py``, then ``prune_*.py``): the whole
model with the heads at threshold 1 (deep supervision, nothing exits), then a fine-tuning run with
the exits switched on. The study starts from a trained dense Segmenter, so its phase A trains only
the heads, with the dense weights frozen (the dense model stays the one every method shares, as
CTS's policy net is trained beside it); phase B is the study's fine-tuning with the method attached
(``finetune.token_methods``: the encoder, the decoder and the heads, exits on, the heads' loss
terms added by :meth:`segcompress.tokens.dtop.DToP.training_loss`).

Phase A (:func:`train_heads`): the reference's optimiser (AdamW, weight decay 0.01, the heads'
learning rate 2e-5 × 10, linear warm-up then poly 0.9) and its per-head losses
(:func:`segcompress.tokens.dtop_loss.head_loss`) on every head's canvas; the encoder runs only up
to the last head's block (the later blocks and the decoder do not reach the heads' loss).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import nn

from segcompress.data.datasets import cycle
from segcompress.tokens.dtop import DToP
from segcompress.tokens.dtop_loss import head_canvases, head_loss
from segcompress.train import Recipe, build_optimizer, loss_offset, poly_lr

def heads_recipe(data: dict[str, Any]) -> Recipe:
    """Phase A's :class:`~segcompress.train.Recipe` (AdamW) from
    :data:`segcompress.methods.dtop.POLICY_RECIPE` keys (its defaults where left out)."""
    from segcompress.methods.dtop import POLICY_RECIPE

    unknown = sorted(set(data) - set(POLICY_RECIPE))
    if unknown:
        raise ValueError(f"DToP heads recipe: unknown key(s) {', '.join(unknown)} "
                         f"(allowed: {', '.join(sorted(POLICY_RECIPE))})")
    merged = {**POLICY_RECIPE, **data}
    return Recipe.from_dict({**merged, "optimizer": "adamw", "checkpoint_every": 0}, source="DToP heads recipe")


def train_heads(model: nn.Module, method: DToP, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                recipe: Recipe, *, seed: int = 0, device: str | torch.device = "cpu",
                on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """Train ``method``'s heads on the frozen ``model`` with nothing exiting (threshold 1).

    Args:
        model: the dense Segmenter (frozen and in eval mode while the heads train; moved to
            ``device``, its weights, mode and ``requires_grad`` flags otherwise as they were).
        method: the DToP whose heads train in place (its threshold is restored afterwards).
        batches: (images (B, 3, H, W), labels (B, H, W), 255 = ignore); cycled.
        recipe: :func:`heads_recipe`.
        seed: seeds the strided loss pixels (``loss_stride`` > 1).
        on_step: called with (step, loss) after every step.

    Returns:
        The loss of every step.
    """
    was_training, frozen = model.training, [p.requires_grad for p in model.parameters()]
    threshold = method.config.threshold
    stride, last = recipe.loss_stride, method.split[-1] if method.split else 0
    losses: list[float] = []
    try:
        model.to(device).eval()
        model.requires_grad_(False)
        method.to(device).train()
        method.heads.requires_grad_(True)
        method.config.threshold = 1.0
        optimizer = build_optimizer(method.heads, recipe)
        it = cycle(batches, "DToP heads training")
        for step in range(recipe.iters if method.split else 0):
            for group in optimizer.param_groups:
                group["lr"] = poly_lr(step, recipe)
            img, labels = (t.to(device) for t in next(it))
            st = method.run(model, img, num_blocks=last)
            offset = loss_offset(seed, step, stride) if stride > 1 else (0, 0)
            loss = torch.stack([head_loss(c, p, labels, loss_stride=stride, offset=offset)
                                for c, p in zip(head_canvases(st), st.presence)]).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            if on_step is not None:
                on_step(step, losses[-1])
    finally:
        method.config.threshold = threshold
        method.last = None
        method.eval()
        model.train(was_training)
        for p, flag in zip(model.parameters(), frozen):
            p.requires_grad_(flag)
    return losses
