"""Image-level bootstrap of mIoU from per-image areas: intervals and paired comparisons.

Pure numpy, no pandas. An evaluation row's ``per_image`` entry holds, for every image (in dataset
order), the sparse per-class pixel areas ``classes``, ``intersect``, ``union`` (``label`` and
``pred`` too); :func:`dense_areas` turns one row's list into two (images, classes) arrays.

The bootstrap resamples *images* with replacement: replicate ``b`` weighs image ``i`` by how often
it was drawn, ``counts[b, i]`` (a (B, images) matrix, :func:`bootstrap_counts`; every row sums to
the number of images). The dataset-level areas of a replicate are ``counts @ areas``, and its
mIoU is the mean over the classes with union > 0 of intersection / union, exactly as
``segcompress evaluate`` computes mIoU on the whole set (:func:`miou_replicates`; the replicate of
all-ones counts is the row's own mIoU). One matrix product per array: no Python loop over
replicates.

Choices (the report states them):

* **Same draws for every variant.** The counts depend only on the number of images, ``B`` and
  the seed, so every variant evaluated on the same images is resampled with the *same* image
  draws; a difference of two variants per replicate is then a paired bootstrap
  (:func:`paired`), and the corrupted conditions of one variant share the draws too (their
  images are the same scenes, corrupted).
* **Several seeds.** The images are the same for every training seed, so one draw of images is
  applied to every seed and the replicate's value is the mean over seeds of each seed's mIoU.
  The interval is the image-sampling uncertainty of the seed-mean; the spread over training
  seeds is reported beside it (± std over seeds), not folded in (with 1–3 seeds a resampling of
  seeds would be meaningless).
* **Corrupted mIoU.** Per replicate: each condition's mIoU, the mean over severities per
  corruption, then the mean over corruptions (:func:`corrupted_replicates`), the same aggregate
  as the table's.
* **Interval and test.** 95 % percentile interval of the replicates; for a difference, it is
  significant when that interval excludes 0, and the two-sided p-value is
  ``min(1, 2·min(#(d ≤ 0) + 1, #(d ≥ 0) + 1) / (B + 1))`` (so never 0 with finite B).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import chain
from typing import Any, Mapping, Sequence

import numpy as np

#: Default number of bootstrap replicates and the seed of the image draws.
REPLICATES = 1000
SEED = 0
#: Coverage of the percentile intervals.
LEVEL = 0.95


def bootstrap_counts(n_images: int, replicates: int = REPLICATES, seed: int = SEED) -> np.ndarray:
    """(replicates, n_images) float matrix: how often each image is drawn in each replicate."""
    if n_images < 1:
        raise ValueError(f"bootstrap needs at least one image, got {n_images}")
    rng = np.random.default_rng(seed)
    return rng.multinomial(n_images, np.full(n_images, 1.0 / n_images), size=replicates).astype(np.float64)


def dense_areas(per_image: Sequence[Mapping[str, Any]], num_classes: int,
                keys: Sequence[str] = ("intersect", "union")) -> np.ndarray:
    """(len(keys), images, num_classes) float64 areas from one row's sparse ``per_image``
    (``keys`` among intersect, union, label, pred; classes an image does not list are 0)."""
    lengths = [len(img["classes"]) for img in per_image]
    total = sum(lengths)
    classes = np.fromiter(chain.from_iterable(img["classes"] for img in per_image), np.int64, total)
    if total and (classes.min() < 0 or classes.max() >= num_classes):
        bad = next(img for img in per_image if any(not 0 <= c < num_classes for c in img["classes"]))
        raise ValueError(f"per_image entry {bad.get('name')!r}: class ids outside [0, {num_classes}); "
                         "rerun `segcompress evaluate` or delete the row")
    images = np.repeat(np.arange(len(per_image)), lengths)
    out = np.zeros((len(keys), len(per_image), num_classes))
    for k, key in enumerate(keys):
        values = list(chain.from_iterable(img[key] for img in per_image))
        if len(values) != total:
            raise ValueError(f"per_image: the {key!r} lists differ in length from 'classes'; rerun `segcompress "
                             "evaluate` or delete the row")
        out[k, images, classes] = values
    return out


def _miou_inplace(inter: np.ndarray, union: np.ndarray) -> np.ndarray:
    """:func:`miou_of` overwriting its (fresh, float64) arguments: no temporary arrays, which is
    what makes a (B, classes) replicate matrix cheap."""
    n = np.count_nonzero(union, axis=-1)  # areas are >= 0: nonzero = present
    union[union == 0] = 1.0  # intersect <= union, so an absent class adds 0 / 1 = 0
    np.divide(inter, union, out=inter)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, inter.sum(axis=-1) / n, np.nan)


def miou_of(inter: np.ndarray, union: np.ndarray) -> np.ndarray:
    """mIoU over the last axis: mean of intersect / union over classes with union > 0 (NaN if none)."""
    return _miou_inplace(np.array(inter, dtype=np.float64), np.array(union, dtype=np.float64))


def miou_replicates(counts: np.ndarray, inter: np.ndarray, union: np.ndarray) -> np.ndarray:
    """(B,) mIoU of every replicate of one evaluation; ``inter``/``union`` (images, classes)."""
    seen = union.any(axis=0)  # classes with no union in any image never count: leave them out
    return _miou_inplace(counts @ inter[:, seen], counts @ union[:, seen])


def seeds_replicates(counts: np.ndarray, seeds: Sequence[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """(B,) mean over seeds of each seed's replicate mIoU, the same image draws for every seed."""
    return np.mean([miou_replicates(counts, i, u) for i, u in seeds], axis=0)


def corrupted_replicates(counts: np.ndarray, conditions: Mapping[tuple[str, int], tuple[np.ndarray, np.ndarray]]
                         ) -> np.ndarray:
    """(B,) corrupted mIoU per replicate: mean over corruptions of the mean over severities.

    ``conditions`` maps (corruption, severity) to one seed's (intersect, union) on those images.
    """
    by_corruption: dict[str, list[np.ndarray]] = {}
    for (corruption, _severity), (i, u) in sorted(conditions.items()):
        by_corruption.setdefault(corruption, []).append(miou_replicates(counts, i, u))
    if not by_corruption:
        raise ValueError("corrupted mIoU needs at least one corrupted condition")
    return np.mean([np.mean(v, axis=0) for v in by_corruption.values()], axis=0)


def interval(replicates: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """Percentile interval of the finite replicates (NaN, NaN when there are none)."""
    r = np.asarray(replicates, dtype=np.float64)
    r = r[np.isfinite(r)]
    if r.size == 0:
        return math.nan, math.nan
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(r, [tail, 100.0 - tail])
    return float(low), float(high)


@dataclass(frozen=True)
class Comparison:
    """A paired bootstrap comparison of variant A against B (difference A − B)."""

    diff: float  # point estimate: A's value − B's value
    low: float
    high: float
    p: float
    replicates: int

    level: float = LEVEL

    @property
    def significant(self) -> bool:
        """The interval of the difference excludes 0 and the two-sided p is below 1 − level: the
        percentile interval and the (+1-corrected, so slightly conservative) p can disagree at the
        edge, and then the difference is not called significant."""
        return bool((self.low > 0 or self.high < 0) and self.p < 1.0 - self.level)


def paired(a: np.ndarray, b: np.ndarray, diff: float, level: float = LEVEL) -> Comparison:
    """Compare replicates ``a`` and ``b`` drawn with the same image draws; ``diff`` = A − B on all images."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired bootstrap needs replicates of the same draws, got {a.shape} and {b.shape}")
    d = a - b
    d = d[np.isfinite(d)]
    low, high = interval(d, level)
    n = d.size
    p = min(1.0, 2.0 * min(np.sum(d <= 0) + 1, np.sum(d >= 0) + 1) / (n + 1)) if n else math.nan
    return Comparison(float(diff), low, high, float(p), int(n), level)
