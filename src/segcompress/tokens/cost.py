"""GFLOPs of a token method: the :class:`Cost` type and the images input-dependent methods count.

Each method computes its own cost (``segcompress.methods.<name>.cost``) through
:func:`segcompress.flops.analytic_gmacs`, the project's fvcore convention (docs/methods.md §7.1):
input-independent methods (ToMe, CTS) in closed form from the knob; input-dependent ones (ALGM)
from per-block token counts measured on images, one crop each (:func:`image_crops`): the
calibration images of ``segcompress match`` / ``flops``, or the images of an evaluated condition.
The result is a mean, a standard deviation and the per-image values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from segcompress.models.spec import SegmenterSpec

NUM_PREFIX = 1  # Segmenter: one class token


@dataclass
class Cost:
    """GFLOPs of a method at a knob: ``mean`` (the matched number), ``std`` and per-image values."""

    mean: float
    std: float = 0.0
    per_image: list[float] = field(default_factory=list)


def decoder_tokens(spec: SegmenterSpec, final_tokens: float, decoder_on_merged: bool) -> float:
    n = spec.grid[0] * spec.grid[1]
    return final_tokens - NUM_PREFIX if decoder_on_merged else n


def image_crops(layout: str, root: str | Path, split: str, crop: Sequence[int], max_images: int | None = None,
                img_root: str | Path | None = None) -> Iterator[torch.Tensor]:
    """The images of a dataset split as FLOPs inputs: one normalised crop (1, 3, H, W) per image.

    As ALGM's FLOPs script: every image is resized (aspect distorted) to crop×crop, batch 1.
    ``img_root``: read the images from there (a corrupted set), as the test dataset does.
    """
    from segcompress.data.datasets import build_dataset  # the data stage's reader

    h, w = (int(c) for c in crop)
    ds = build_dataset(layout, root, split, mode="test", crop=(h, w), img_scale=(4 * max(h, w), min(h, w)),
                       img_root=img_root, max_images=max_images)
    for i in range(len(ds) if max_images is None else min(len(ds), max_images)):
        img = ds[i]["image"]
        yield F.interpolate(img[None].float(), size=(h, w), mode="bilinear", align_corners=False)
