"""Effective rank of a variant's encoder features over a dataset (docs/methods.md §9, the study's Fig. 4).

Per image, the image is cut into the evaluation's sliding windows
(:func:`segcompress.evaluate.sliding_windows`, the same crop, stride and padding as the mIoU), and
each window's final encoder features are taken *restored on the original patch grid*
(:func:`segcompress.tokens.restored_features`: every patch position carries the feature of the
token that holds it after merging or sharing; a dense or pruned model's own features otherwise).
One window gives X_w ∈ ℝ^{N×E′} (N patches of the crop, E′ the model's own width). How the
windows of one image become one number is a setting (``windows``):

* ``stack`` (default): the rows of every window are stacked into one matrix
  X ∈ ℝ^{(W·N)×E′} and its effective rank is the image's value. This is "per image, the features
  on the original token grid" of the paper when an image is one window, and the natural extension
  when it is several (patches covered twice by overlapping windows appear twice, as in the mIoU's
  averaged logits; duplicated rows cannot raise the rank).
* ``mean``: the effective rank of each window's X_w, averaged over the windows.

Each image gives a raw effective rank and a normalised one (the raw value divided as
``normalise`` says, :func:`segcompress.rank.rank_divisor`); the mean and the (population)
standard deviation over images of both are reported.

The default normalisation divides by min(rows, E_ref), E_ref the width of the study's dense model
(``reference_width``): every variant ranked on the same windows shares one divisor, so the
normalised values cannot reverse the order of the raw ones. The per-model normalisations divide by
the ranked model's own width and are kept as options; with them a pruned model whose embedding is
narrower can score above the dense model although its raw effective rank is lower.

Settings mapped from the config (``analysis.effective_rank``) onto :mod:`segcompress.rank`:

=================  ==========================================  ======================================
config key         value                                       meaning
=================  ==========================================  ======================================
``feature``        ``final_norm`` / ``last_block``             after / before the encoder's last norm
``centre``         true / false                                ``center`` of :func:`effective_rank`
``normalise``      ``reference`` -> ``reference``              erank / min(rows, E_ref) (default)
                   ``min_tokens_width`` -> ``min_dim``         erank / min(rows, E′)
                   ``width`` -> ``width``                      erank / E′
                   ``none`` -> ``none``                        raw erank
``windows``        ``stack`` / ``mean``                        see above
=================  ==========================================  ======================================

(``rows`` is W·N with ``stack`` and N with ``mean``.)
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
from torch import nn

from segcompress.rank import Normalise, effective_rank, rank_divisor

FEATURES: tuple[str, ...] = ("final_norm", "last_block")
#: The config's names of the normalisation -> :func:`segcompress.rank.rank_divisor`'s.
NORMALISE: dict[str, Normalise] = {
    "reference": "reference", "min_tokens_width": "min_dim", "width": "width", "none": "none"}
WINDOWS: tuple[str, ...] = ("stack", "mean")


@dataclass(frozen=True)
class RankSettings:
    """How the effective rank is taken (the config's ``analysis.effective_rank`` choices).

    Attributes:
        feature: ``final_norm`` (after the encoder's last LayerNorm) or ``last_block`` (before it).
        centre: subtract the mean row before the SVD.
        normalise: ``reference``, ``min_tokens_width``, ``width`` or ``none`` (see the module
            docstring).
        windows: ``stack`` or ``mean`` (see the module docstring).
        reference_width: E_ref, the dense model's width; needed by ``reference``.
    """

    feature: str = "final_norm"
    centre: bool = False
    normalise: str = "reference"
    windows: str = "stack"
    reference_width: int | None = None

    def __post_init__(self) -> None:
        if self.feature not in FEATURES:
            raise ValueError(f"effective rank: unknown feature point {self.feature!r}; choose {', '.join(FEATURES)}")
        if self.normalise not in NORMALISE:
            raise ValueError(
                f"effective rank: unknown normalisation {self.normalise!r}; choose {', '.join(NORMALISE)}")
        if self.windows not in WINDOWS:
            raise ValueError(f"effective rank: unknown window reduction {self.windows!r}; choose {', '.join(WINDOWS)}")
        if self.normalise == "reference" and (self.reference_width is None or self.reference_width < 1):
            raise ValueError("effective rank: normalise 'reference' needs reference_width, the dense model's width "
                             f"(got {self.reference_width!r})")

    @property
    def final_norm(self) -> bool:
        """Whether features are taken after the encoder's final norm."""
        return self.feature == "final_norm"

    @property
    def rank_normalise(self) -> Normalise:
        """The normalisation under :mod:`segcompress.rank`'s name."""
        return NORMALISE[self.normalise]

    def divisor(self, rows: int, width: int) -> float:
        """What the raw erank of a ``rows`` × ``width`` feature matrix is divided by."""
        return rank_divisor(rows, width, self.rank_normalise, self.reference_width)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.inference_mode()
def window_features(
        model: nn.Module,
        image: torch.Tensor,
        crop: int | Sequence[int],
        stride: int | Sequence[int],
        batch_size: int = 8,
        final_norm: bool = True,
) -> torch.Tensor:
    """Restored encoder features of every sliding window of one image, (W, N, E′) float32 on CPU.

    Args:
        model: a Segmenter, with or without a token method attached.
        image: one normalised image (3, h, w) or (1, 3, h, w) on the model's device.
        crop: window size (the model's crop).
        stride: window stride (the evaluation's).
        batch_size: windows per forward pass.
        final_norm: take the features after the encoder's last norm (else before it).
    """
    from segcompress.evaluate import _pair, sliding_windows
    from segcompress.tokens import restored_features

    ch, cw = _pair(crop)
    padded, boxes = sliding_windows(image, crop, stride)
    out = []
    for i in range(0, len(boxes), batch_size):
        chunk = boxes[i:i + batch_size]
        crops = torch.cat([padded[:, :, y:y + ch, x:x + cw] for y, x in chunk])
        out.append(restored_features(model, crops, final_norm=final_norm).float().cpu())
    return torch.cat(out)


def _check_windows(features: torch.Tensor) -> None:
    if features.dim() != 3:
        raise ValueError(f"effective rank needs window features (W, N, E), got shape {tuple(features.shape)}")


def image_raw_rank(features: torch.Tensor, settings: RankSettings) -> float:
    """The raw effective rank of one image from its windows' features (W, N, E′)."""
    _check_windows(features)
    if settings.windows == "stack":
        return effective_rank(features.reshape(-1, features.shape[-1]), center=settings.centre)
    values = [effective_rank(f, center=settings.centre) for f in features]
    return sum(values) / len(values)


def matrix_rows(features: torch.Tensor, settings: RankSettings) -> int:
    """Rows of the matrix (or matrices) whose rank is taken: W·N with ``stack``, N with ``mean``."""
    _check_windows(features)
    return features.shape[0] * features.shape[1] if settings.windows == "stack" else features.shape[1]


def image_rank(features: torch.Tensor, settings: RankSettings) -> float:
    """The normalised effective rank of one image from its windows' features (W, N, E′).

    With ``mean`` every window has the same shape, so the mean of the windows' normalised ranks is
    the mean raw rank over the one divisor.
    """
    raw = image_raw_rank(features, settings)
    return raw / settings.divisor(matrix_rows(features, settings), features.shape[-1])


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and population standard deviation (NaN, NaN for no values)."""
    if not values:
        return math.nan, math.nan
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


def rank_dataset(
        model: nn.Module,
        dataset: torch.utils.data.Dataset,
        crop: int | Sequence[int],
        stride: int | Sequence[int],
        settings: RankSettings,
        batch_size: int = 8,
        device: str | torch.device = "cpu",
        progress: str | bool = "auto",
) -> dict[str, Any]:
    """Raw and normalised effective rank of ``model``'s restored features on every image of ``dataset``.

    Args:
        dataset: test-mode items ``{"image", "label", "name"}`` (labels are not used).

    Returns:
        ``erank_mean``, ``erank_std`` (normalised as ``settings`` says; population, over images),
        ``erank_raw_mean``, ``erank_raw_std`` (raw), ``num_images``, per image
        ``erank_per_image``, ``erank_raw_per_image`` and ``names``, the matrix shape of the last
        image (``rows``, ``width``) and ``seconds``.
    """
    from segcompress.progress import track

    model.eval()
    raw: list[float] = []
    values: list[float] = []
    names: list[str] = []
    rows = width = 0
    start = time.perf_counter()
    for i in track(range(len(dataset)), len(dataset), "rank", "img", progress):
        item = dataset[i]
        feats = window_features(model, item["image"].to(device), crop, stride, batch_size, settings.final_norm)
        rows, width = matrix_rows(feats, settings), feats.shape[2]
        raw.append(image_raw_rank(feats, settings))
        values.append(raw[-1] / settings.divisor(rows, width))
        names.append(str(item.get("name", i)))
    mean, std = mean_std(values)
    raw_mean, raw_std = mean_std(raw)
    return {
        "erank_mean": mean,
        "erank_std": std,
        "erank_raw_mean": raw_mean,
        "erank_raw_std": raw_std,
        "num_images": len(values),
        "erank_per_image": values,
        "erank_raw_per_image": raw,
        "names": names,
        "rows": rows,
        "width": width,
        "seconds": time.perf_counter() - start,
    }
