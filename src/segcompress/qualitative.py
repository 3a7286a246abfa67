"""Qualitative panels (the study's Fig. 3): image, ground truth and each variant's prediction,
with a zoomed crop on fine structures.

For every example image one row shows the full views (the image with the zoom box drawn, the
ground truth, then one prediction per variant), and the row below the same zoomed region of each.
The zoom box is chosen from the ground truth alone, so it is the same for every variant: the
square window (``zoom`` × the short side) with the most label boundary pixels, i.e. where thin
structures, small objects and class borders are densest — where token merging is expected to
lose detail first.

Predictions are computed with the evaluation's own :func:`segcompress.evaluate.predict` (sliding
windows, logits averaged, resized to the label size), so a panel shows what the mIoU scored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from segcompress.data.layouts import IGNORE_INDEX
from segcompress.io import atomic_path


@dataclass
class Example:
    """One image of a panel: the image (H, W, 3) uint8 at label size, the label (H, W), the
    predictions (one (H, W) map per variant) and the zoom box (y, x, h, w)."""

    name: str
    image: np.ndarray
    label: np.ndarray
    predictions: list[np.ndarray] = field(default_factory=list)
    box: tuple[int, int, int, int] = (0, 0, 1, 1)


def palette(num_classes: int, seed: int = 0) -> np.ndarray:
    """A fixed colour per class, (num_classes, 3) uint8, distinct and not too dark."""
    rng = np.random.default_rng(seed)
    return rng.integers(40, 256, size=(num_classes, 3), dtype=np.uint8)


def colorize(label: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """Label map (H, W) -> RGB (H, W, 3) uint8; the ignore label (and any label out of range) is black."""
    out = np.zeros((*label.shape, 3), np.uint8)
    valid = (label >= 0) & (label < len(colours)) & (label != IGNORE_INDEX)
    out[valid] = colours[label[valid]]
    return out


def boundaries(label: np.ndarray) -> np.ndarray:
    """Pixels whose right or lower neighbour has another label (ignore pixels excluded), bool (H, W)."""
    edge = np.zeros(label.shape, bool)
    dy = label[1:, :] != label[:-1, :]
    dx = label[:, 1:] != label[:, :-1]
    edge[:-1, :] |= dy
    edge[:, :-1] |= dx
    edge &= label != IGNORE_INDEX
    return edge


def zoom_box(label: np.ndarray, zoom: float = 0.35) -> tuple[int, int, int, int]:
    """The square (y, x, side, side), ``zoom`` × the short side, holding the most boundary pixels.

    Ties go to the first window in row-major order, so the choice is deterministic.
    """
    if not 0 < zoom <= 1:
        raise ValueError(f"zoom must be in (0, 1], got {zoom}")
    h, w = label.shape
    side = max(1, int(round(zoom * min(h, w))))
    edge = boundaries(label).astype(np.int64)
    integral = np.pad(edge.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    counts = (integral[side:, side:] - integral[:-side, side:] - integral[side:, :-side]
              + integral[:-side, :-side])
    y, x = np.unravel_index(int(np.argmax(counts)), counts.shape)
    return int(y), int(x), side, side


def denormalise(image: torch.Tensor, size: Sequence[int]) -> np.ndarray:
    """A normalised image (3, h, w) back to RGB uint8 (H, W, 3), resized to ``size`` (the label's)."""
    img = F.interpolate(image[None].float(), size=tuple(int(s) for s in size), mode="bilinear",
                        align_corners=False)[0]
    return (img * 127.5 + 127.5).clamp(0, 255).round().byte().permute(1, 2, 0).cpu().numpy()


def render(examples: Sequence[Example], titles: Sequence[str], num_classes: int, png: str | Path,
           pdf: str | Path | None = None, suptitle: str | None = None) -> None:
    """Draw the panel: per example a row of full views and a row of zoomed crops.

    Args:
        examples: the images with one prediction per entry of ``titles``.
        titles: the variants' column titles.
        num_classes: classes of the dataset (colours).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    if not examples:
        raise ValueError("no examples to draw")
    colours = palette(num_classes)
    ncol = 2 + len(titles)
    h, w = examples[0].label.shape
    cell = 2.0
    aspect = h / w
    fig = Figure(figsize=(cell * ncol, cell * (aspect + 1) * len(examples) + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    ratios = []
    for ex in examples:
        ratios += [ex.label.shape[0] / ex.label.shape[1], 1.0]
    axes = fig.subplots(2 * len(examples), ncol, squeeze=False, gridspec_kw={"height_ratios": ratios})
    for i, ex in enumerate(examples):
        y, x, bh, bw = ex.box
        views = [ex.image, colorize(ex.label, colours), *(colorize(p, colours) for p in ex.predictions)]
        heads = ["image", "ground truth", *titles]
        for j, (view, head) in enumerate(zip(views, heads)):
            full, zoomed = axes[2 * i][j], axes[2 * i + 1][j]
            full.imshow(view, interpolation="nearest")
            full.add_patch(Rectangle((x - 0.5, y - 0.5), bw, bh, fill=False, edgecolor="white", linewidth=1.2))
            zoomed.imshow(view[y:y + bh, x:x + bw], interpolation="nearest")
            if i == 0:
                full.set_title(head, fontsize=8)
            if j == 0:
                full.set_ylabel(ex.name, fontsize=6)
                zoomed.set_ylabel("zoom", fontsize=6)
            for ax in (full, zoomed):
                ax.set_xticks([])
                ax.set_yticks([])
    if suptitle:
        fig.suptitle(suptitle, fontsize=9)
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png", dpi=150, metadata={"Software": None})
    if pdf is not None:
        with atomic_path(pdf) as tmp:
            fig.savefig(tmp, format="pdf", metadata={"CreationDate": None, "Creator": None, "Producer": None})
