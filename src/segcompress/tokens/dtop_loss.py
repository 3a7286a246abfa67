"""DToP's training losses on Segmenter: the reference's per-head ATM losses and the pixel CE on the
composed output.

The reference (``zbwxp/Dynamic-Token-Pruning``, ``loss/atm_loss.py`` and ``loss/criterion.py``)
supervises every auxiliary head with a MaskFormer-style criterion under a *fixed* matching (query
c ↔ class c), and its final SegViT head alike. Here the auxiliary heads get that criterion and the
final output, Segmenter's decoder composed with the canvas (:func:`segcompress.tokens.dtop.compose`),
gets the project's pixel cross-entropy (``train.pixel_loss_sums``, label 255 ignored).

Per head (:func:`head_loss`, weights as the reference's ``ATMLoss``):

* **Presence** ×1 (:func:`presence_loss`): 2-way cross-entropy over all B·K queries, target
  "present" (index 0) for the classes in the image's labels and "absent" (index 1) for the
  others, class weights [1, 0.1] (the reference's ``eos_coef``); PyTorch's weighted mean, i.e.
  divided by the sum of the targets' weights, as the reference's ``F.cross_entropy(..., weight)``.
* **Masks**: sigmoid focal ×20 (α 0.25, γ 2) and dice ×1 on the head's mask logits upsampled
  bilinearly (``align_corners=False``) to the label resolution, **only for the classes present in
  each image** (the reference's matched pairs), each loss **averaged over the present masks of the
  batch** (the reference divides the sum over matched masks by ``num_masks``, their count in the
  batch, at least 1). Focal of one mask: the mean over its pixels; dice of one mask:
  ``1 − (2 Σ σ·t + 1) / (Σ σ + Σ t + 1)`` (the reference's +1 smoothing).
* **The mask logits a head is judged on** are its *canvas* (B, K, N) right after it ran: its own
  logits at the patches it saw, the earlier heads' at the patches that had exited (the
  reference's ``canvas_copy``, its ``pred_masks``). The canvas is written out of place and never
  detached, so the later heads' losses and the final CE (through the composition) also train the
  exit heads, as in the reference.

Departures, where the reference does not apply or is silent:

* **Ignored pixels** (label 255) are left out of the focal and dice terms (the focal mean runs
  over the image's labelled pixels; dice sums over them). The reference keeps them, as negatives
  of every class (its ``TODO use valid to mask invalid areas``); here they change nothing.
* **An image without labelled pixels** has no present class: only its presence term (all absent)
  counts (the reference adds a dummy mask that its matching then never uses).
* **Normalisation is per process**: the reference all-reduces ``num_masks`` across GPUs, and the
  project's training divides its CE by the world's labelled pixels; :func:`dtop_loss` returns the
  local means (the CE: its sum over the local labelled pixels over their count).
* **Which canvases.** Each head is judged on the canvas as it stood right after it ran
  (:class:`~segcompress.tokens.dtop.DToPState` ``canvases``), as the reference does: the final
  canvas holds only the last head's logits at the patches it saw.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F

from segcompress.tokens.dtop import PRESENT, DToPState
from segcompress.train import IGNORE_INDEX, pixel_loss_sums, sampled_logits

ABSENT_WEIGHT = 0.1  # the reference's eos_coef
FOCAL_ALPHA = 0.25
FOCAL_GAMMA = 2.0


class HeadWeights(NamedTuple):
    """Weights of one head's terms (the reference's ``cls_weight``, ``mask_weight``, ``dice_weight``)."""

    presence: float = 1.0
    focal: float = 20.0
    dice: float = 1.0


class HeadLossTerms(NamedTuple):
    """One head's unweighted terms (0-d tensors)."""

    presence: torch.Tensor
    focal: torch.Tensor
    dice: torch.Tensor

    def total(self, weights: HeadWeights = HeadWeights()) -> torch.Tensor:
        return weights.presence * self.presence + weights.focal * self.focal + weights.dice * self.dice


# -- targets -------------------------------------------------------------------------------------
def class_presence(labels: torch.Tensor, num_classes: int,
                   ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor]:
    """(present (B, K) bool: class c labels some pixel of image b, valid (B, H, W) bool: labelled).

    Raises ``ValueError`` for a label outside [0, K) other than ``ignore_index``.
    """
    valid = labels != ignore_index
    if bool((valid & ((labels < 0) | (labels >= num_classes))).any()):
        raise ValueError(f"labels must be in [0, {num_classes}) or {ignore_index}")
    lab = torch.where(valid, labels, torch.full_like(labels, num_classes)).flatten(1).long()
    present = torch.zeros(labels.shape[0], num_classes + 1, dtype=torch.bool, device=labels.device)
    present.scatter_(1, lab, True)
    return present[:, :num_classes], valid


def class_targets(labels: torch.Tensor, num_classes: int,
                  ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-class targets of a label map (the fixed matching: query c ↔ class c).

    Args:
        labels: (B, H, W) class indices, ``ignore_index`` = unlabelled.
        num_classes: K.

    Returns:
        (present (B, K) bool, masks (B, K, H, W) float (1 where the pixel is labelled c; 0 at
        ignored pixels), valid (B, H, W) bool).
    """
    present, valid = class_presence(labels, num_classes, ignore_index)
    lab = torch.where(valid, labels, torch.zeros_like(labels)).long()
    masks = F.one_hot(lab, num_classes).movedim(-1, 1).float() * valid[:, None].float()
    return present, masks, valid


# -- the terms -----------------------------------------------------------------------------------
def presence_loss(presence_logits: torch.Tensor, present: torch.Tensor,
                  absent_weight: float = ABSENT_WEIGHT) -> torch.Tensor:
    """2-way cross-entropy of the presence logits (B, K, 2) (index 0 = present) against
    ``present`` (B, K), class weights [1, ``absent_weight``], weighted mean over the B·K queries
    (sum of weight·CE over the sum of the targets' weights), as the reference."""
    target = torch.where(present, PRESENT, 1 - PRESENT).reshape(-1)
    weight = presence_logits.new_ones(2)
    weight[1 - PRESENT] = absent_weight
    return F.cross_entropy(presence_logits.reshape(-1, 2).float(), target, weight=weight.float())


def _masked_mean_per_mask(values: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Per mask (all but the last two dims) mean over its valid pixels (0 where none)."""
    if valid is None:
        return values.mean(dim=(-2, -1))
    v = valid.expand_as(values).to(values.dtype)
    return (values * v).sum(dim=(-2, -1)) / v.sum(dim=(-2, -1)).clamp_min(1.0)


def sigmoid_focal_loss(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor | None = None,
                       alpha: float = FOCAL_ALPHA, gamma: float = FOCAL_GAMMA) -> torch.Tensor:
    """The sigmoid focal loss (RetinaNet) of binary masks, mean over the masks.

    Per pixel ``α_t (1 − p_t)^γ · BCE(logit, t)`` with ``p_t = σ·t + (1 − σ)(1 − t)``,
    ``α_t = α·t + (1 − α)(1 − t)`` (no α weighting when ``alpha`` < 0); per mask the mean over its
    valid pixels; then the mean over the masks (the reference's sum over its matched masks divided
    by their count; pass only the masks to count, e.g. the present classes').

    Args:
        logits: mask logits (..., H, W), each leading index one mask.
        targets: {0, 1} targets like ``logits``.
        valid: bool broadcastable to ``logits`` (False: pixel left out), or ``None`` (all).

    Returns:
        0-d tensor; 0 (with a graph) when there is no mask.
    """
    if logits.shape[:-2].numel() == 0:
        return logits.sum() * 0.0
    targets = targets.to(logits.dtype)
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return _masked_mean_per_mask(loss, valid).mean()


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """The dice loss of binary masks, mean over the masks.

    Per mask ``1 − (2 Σ σ·t + 1) / (Σ σ + Σ t + 1)`` over its valid pixels (the reference's +1
    smoothing), then the mean over the masks (see :func:`sigmoid_focal_loss`). A perfect
    prediction gives ≈ 0, an inverted one ≈ 1 − 1/(pixels + 1).

    Args: as :func:`sigmoid_focal_loss`.
    """
    if logits.shape[:-2].numel() == 0:
        return logits.sum() * 0.0
    targets = targets.to(logits.dtype)
    prob = logits.sigmoid()
    if valid is not None:
        v = valid.expand_as(prob).to(prob.dtype)
        prob, targets = prob * v, targets * v
    num = 2 * (prob * targets).sum(dim=(-2, -1)) + 1
    den = prob.sum(dim=(-2, -1)) + targets.sum(dim=(-2, -1)) + 1
    return (1 - num / den).mean()


# -- resolution ----------------------------------------------------------------------------------
def at_label_pixels(logits: torch.Tensor, size: Sequence[int], loss_stride: int = 1,
                    offset: Sequence[int] = (0, 0)) -> torch.Tensor:
    """``logits`` (B, C, h, w) at the loss pixels of a (H, W) = ``size`` label map.

    Logits of another size are upsampled bilinearly (``align_corners=False``) to ``size``; with
    ``loss_stride`` > 1 only the pixels ``offset + loss_stride·(i, j)`` are taken (the training's
    strided loss, ``train.sampled_logits``, without computing the others).
    """
    size = (int(size[0]), int(size[1]))
    s, (oy, ox) = int(loss_stride), (int(offset[0]), int(offset[1]))
    if tuple(logits.shape[-2:]) == size:
        return logits if s == 1 else logits[..., oy::s, ox::s]
    if s == 1:
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    return sampled_logits(logits, size, s, (oy, ox))


def _strided(labels: torch.Tensor, loss_stride: int, offset: Sequence[int]) -> torch.Tensor:
    s = int(loss_stride)
    return labels if s == 1 else labels[:, int(offset[0])::s, int(offset[1])::s]


# -- one head, the whole loss --------------------------------------------------------------------
def head_loss_terms(mask_logits: torch.Tensor, presence_logits: torch.Tensor, labels: torch.Tensor,
                    absent_weight: float = ABSENT_WEIGHT, ignore_index: int = IGNORE_INDEX,
                    loss_stride: int = 1, offset: Sequence[int] = (0, 0)) -> HeadLossTerms:
    """One head's unweighted (presence, focal, dice); see :func:`head_loss`."""
    B, K = presence_logits.shape[:2]
    if mask_logits.shape[:2] != (B, K) or mask_logits.dim() != 4:
        raise ValueError(f"mask logits {tuple(mask_logits.shape)} do not match presence logits "
                         f"{tuple(presence_logits.shape)} (want (B, K, h, w))")
    if labels.dim() != 3 or labels.shape[0] != B:
        raise ValueError(f"labels {tuple(labels.shape)} do not match batch {B} (want (B, H, W))")
    present, _ = class_presence(labels, K, ignore_index)  # on the full map: presence is per image
    pres = presence_loss(presence_logits, present, absent_weight)
    lab = _strided(labels, loss_stride, offset)
    b, c = present.nonzero(as_tuple=True)
    # only the present classes' masks (the reference's matched pairs): M masks, not B·K
    logits = at_label_pixels(mask_logits[b, c][None].float(), labels.shape[-2:], loss_stride, offset)[0]
    lab_m = lab[b]
    targets = lab_m == c[:, None, None]
    valid = lab_m != ignore_index
    return HeadLossTerms(pres, sigmoid_focal_loss(logits, targets, valid), dice_loss(logits, targets, valid))


def head_loss(mask_logits: torch.Tensor, presence_logits: torch.Tensor, labels: torch.Tensor,
              weights: HeadWeights | Sequence[float] = HeadWeights(), absent_weight: float = ABSENT_WEIGHT,
              ignore_index: int = IGNORE_INDEX, loss_stride: int = 1,
              offset: Sequence[int] = (0, 0)) -> torch.Tensor:
    """One auxiliary head's loss: presence·w₀ + focal·w₁ + dice·w₂ (reference: 1, 20, 1).

    Args:
        mask_logits: (B, K, h, w) on the patch grid (e.g. the head's canvas), upsampled bilinearly
            to the labels' size (only the present classes' masks are computed).
        presence_logits: (B, K, 2), index 0 = present.
        labels: (B, H, W) class indices, ``ignore_index`` = unlabelled.
        weights: (presence, focal, dice).
        absent_weight: the presence CE's weight of "absent".
        loss_stride, offset: the training's strided loss pixels (see :func:`at_label_pixels`);
            the presence targets always come from the whole label map.

    Returns:
        0-d tensor. Normalisation: see :func:`presence_loss`, :func:`sigmoid_focal_loss`.
    """
    w = HeadWeights(*weights)
    return head_loss_terms(mask_logits, presence_logits, labels, absent_weight, ignore_index,
                           loss_stride, offset).total(w)


def pixel_ce(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX,
             loss_stride: int = 1, offset: Sequence[int] = (0, 0)) -> torch.Tensor:
    """Mean cross-entropy over the labelled loss pixels (0 when none) of ``logits`` (B, K, h, w),
    brought to the labels' size as :func:`at_label_pixels`; ``train.pixel_loss_sums``'s sum over
    its count."""
    x = at_label_pixels(logits.float(), labels.shape[-2:], loss_stride, offset)
    ce_sum, _, count = pixel_loss_sums(x, _strided(labels, loss_stride, offset), ignore_index=ignore_index)
    return ce_sum / count.clamp(min=1.0).to(ce_sum.dtype)


def head_canvases(state: DToPState) -> list[torch.Tensor]:
    """Each head's canvas (B, K, gh, gw) right after it ran."""
    if len(state.canvases) != len(state.presence):
        raise ValueError(f"{len(state.canvases)} canvases for {len(state.presence)} heads")
    return [c.unflatten(-1, tuple(state.tokens.grid)) for c in state.canvases]


def dtop_loss_terms(state: DToPState, final_logits: torch.Tensor, labels: torch.Tensor,
                    weights: HeadWeights | Sequence[float] = HeadWeights(), absent_weight: float = ABSENT_WEIGHT,
                    ignore_index: int = IGNORE_INDEX, loss_stride: int = 1,
                    offset: Sequence[int] = (0, 0)) -> tuple[torch.Tensor, list[HeadLossTerms]]:
    """(pixel CE of the final output, each auxiliary head's unweighted terms); see :func:`dtop_loss`."""
    ce = pixel_ce(final_logits, labels, ignore_index, loss_stride, offset)
    heads = [head_loss_terms(c, p, labels, absent_weight, ignore_index, loss_stride, offset)
             for c, p in zip(head_canvases(state), state.presence)]
    return ce, heads


def dtop_loss(state: DToPState, final_logits: torch.Tensor, labels: torch.Tensor, aux_weight: float = 1.0,
              weights: HeadWeights | Sequence[float] = HeadWeights(), absent_weight: float = ABSENT_WEIGHT,
              ignore_index: int = IGNORE_INDEX, loss_stride: int = 1,
              offset: Sequence[int] = (0, 0)) -> torch.Tensor:
    """DToP's training loss: CE(final) + ``aux_weight`` · Σ_heads :func:`head_loss`.

    Args:
        state: the run's :class:`DToPState` (``method.last`` with ``keep_outputs``): each head's
            presence logits and canvas, and the grid.
        final_logits: what the model returned for the batch: ``Segmenter.forward``'s (B, K, H, W)
            (the log of the composed probabilities, upsampled), or its grid logits
            (``forward_masks``), which are upsampled here.
        labels: (B, H, W), ``ignore_index`` = unlabelled.
        aux_weight: weight of every auxiliary head (reference: 1.0).
        weights, absent_weight: per-head terms (:func:`head_loss`).
        loss_stride, offset: the training's strided loss pixels (``train.loss_offset``).

    Returns:
        0-d tensor. Gradients reach the encoder, the decoder and every head (through its own
        terms, the later heads' canvases and the composition).

    Typical use::

        method.keep_outputs = True
        logits = model(images)
        loss = dtop_loss(method.last, logits, labels)
    """
    w = HeadWeights(*weights)
    ce, heads = dtop_loss_terms(state, final_logits, labels, w, absent_weight, ignore_index, loss_stride, offset)
    return ce + aux_weight * sum((h.total(w) for h in heads), ce.new_zeros(()))
