"""Sliding-window inference and dataset-level mIoU (Segmenter's single-scale protocol).

Each test image (already resized keep-ratio to ``img_scale`` by the reader) is padded with 0 (the
normalised mean) when it is smaller than the crop, covered by windows of the crop size at the
given stride (the last window in a row or column is aligned to the border), and the windows'
logits are averaged where they overlap. The averaged logits are bilinearly resized to the
original label size and the argmax is the prediction.

Metrics are accumulated over the whole dataset as mmseg's ``IoUMetric`` does (per-class
intersection / union / prediction / label areas, ignore label 255: its ``intersect_and_union``'s
counts, :func:`intersect_and_union` here; its ``total_area_to_metrics``), without its
2-decimal rounding: mIoU and mAcc are the nanmean over classes (classes absent from both the
ground truth and the predictions do not count), aAcc is the pixel accuracy. All are fractions
in [0, 1] (the report scales them to percent).

The dataset areas are also kept per image (:attr:`SegMetric.per_image`, sparse: the classes with a
nonzero union only), so a report can resample images (bootstrap) or pair two models image by image;
:func:`areas_from_per_image` turns them back into a dense array and :func:`miou_of` computes the
mIoU of summed areas.
"""

from __future__ import annotations

import math
import platform
import time
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from segcompress.data.layouts import IGNORE_INDEX


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(v, int):
        return v, v
    a, b = (int(x) for x in v)
    return a, b


def window_starts(size: int, crop: int, stride: int) -> list[int]:
    """Window offsets along one axis of length ``size >= crop``: 0, stride, ..., and size - crop last."""
    if stride < 1 or stride > crop:
        raise ValueError(f"stride must be in 1..crop ({crop}) so windows cover the image, got {stride}")
    starts = list(range(0, size - crop + 1, stride))
    if starts[-1] + crop < size:
        starts.append(size - crop)
    return starts


def sliding_windows(
        image: torch.Tensor,
        crop: int | Sequence[int],
        stride: int | Sequence[int],
) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """The padded image (1, 3, ph, pw) and the top-left corners of its windows, row by row.

    The one windowing of the project (evaluation, effective rank, qualitative panels): an image
    smaller than the crop is padded with 0 (the normalised mean) at the bottom and right; windows
    of the crop size start every ``stride`` pixels, the last one in a row or column aligned to the
    border (:func:`window_starts`).
    """
    (ch, cw), (sh, sw) = _pair(crop), _pair(stride)
    if image.dim() == 3:
        image = image[None]
    if image.shape[0] != 1:
        raise ValueError(f"sliding windows are taken on one image, got a batch of {image.shape[0]}")
    h, w = image.shape[-2:]
    ph, pw = max(h, ch), max(w, cw)
    if (ph, pw) != (h, w):
        image = F.pad(image, (0, pw - w, 0, ph - h), value=0.0)
    return image, [(y, x) for y in window_starts(ph, ch, sh) for x in window_starts(pw, cw, sw)]


def window_tiles(starts: Sequence[int], crop: int) -> list[tuple[int, int, int]]:
    """The segments ``(lo, hi, windows)`` that windows of length ``crop`` at ``starts`` cut one axis
    into, each with the number of windows that cover it (segments no window covers are left out)."""
    edges = sorted(set(starts) | {s + crop for s in starts})
    tiles = [(lo, hi, sum(s <= lo and hi <= s + crop for s in starts)) for lo, hi in zip(edges, edges[1:])]
    return [t for t in tiles if t[2]]


@torch.inference_mode()
def slide_inference(
        model: nn.Module,
        image: torch.Tensor,
        crop: int | Sequence[int],
        stride: int | Sequence[int],
        batch_size: int = 8,
) -> torch.Tensor:
    """Averaged window logits (K, h, w) for one normalised image (3, h, w) or (1, 3, h, w).

    The windows' logits are summed in window order and divided by the number of windows that cover
    a pixel, tile by tile: the tiles are the rectangles that the windows' edges cut the image into,
    so a tile's first window is copied (no zeroed buffer to add it to), later ones are added, and
    a tile is divided once its last window is in (right after its last addition). The same numbers
    as zeroing a sum, adding every window and dividing by a count map (up to the sign of a zero):
    the divisor is a tensor on the logits' device, since CUDA divides by a Python number as a
    multiplication by its reciprocal.

    Args:
        model: maps crops (B, 3, cH, cW) to logits (B, K, cH, cW).
        image: the normalised image on the model's device.
        crop: window size ``S`` or ``(H, W)``; the model's crop.
        stride: window stride ``T`` or ``(H, W)``, at most the crop.
        batch_size: windows per forward pass.
    """
    (ch, cw) = _pair(crop)
    h, w = image.shape[-2:]
    image, boxes = sliding_windows(image, crop, stride)
    ph, pw = image.shape[-2:]
    rows = window_tiles(sorted({y for y, _ in boxes}), ch)
    cols = window_tiles(sorted({x for _, x in boxes}), cw)
    seen: dict[tuple[int, int], int] = {}
    divisors: dict[int, torch.Tensor] = {}
    # Sums are kept class-last (ph, pw, K), the memory layout of Segmenter's logits.
    logits: torch.Tensor | None = None
    for i in range(0, len(boxes), batch_size):
        chunk = boxes[i:i + batch_size]
        out = model(torch.cat([image[:, :, y:y + ch, x:x + cw] for y, x in chunk]))
        if logits is None:
            logits = torch.empty((ph, pw, out.shape[1]), device=image.device)
        for (y, x), o in zip(chunk, out.movedim(1, -1)):  # copy_ and add_ convert a low-precision window exactly
            for r0, r1, nr in (t for t in rows if y <= t[0] and t[1] <= y + ch):
                for c0, c1, nc in (t for t in cols if x <= t[0] and t[1] <= x + cw):
                    tile, window = logits[r0:r1, c0:c1], o[r0 - y:r1 - y, c0 - x:c1 - x]
                    n = seen[r0, c0] = seen.get((r0, c0), 0) + 1
                    if n == 1:
                        tile.copy_(window)
                    else:
                        tile.add_(window)
                    if n == nr * nc > 1:
                        if n not in divisors:
                            divisors[n] = torch.tensor(float(n), device=tile.device)
                        tile.div_(divisors[n])
    assert logits is not None
    return logits[:h, :w].movedim(-1, 0)


@torch.inference_mode()
def predict(
        model: nn.Module,
        image: torch.Tensor,
        out_size: Sequence[int],
        crop: int | Sequence[int],
        stride: int | Sequence[int],
        batch_size: int = 8,
) -> torch.Tensor:
    """Label map (H0, W0) int64: slide inference, bilinear resize to ``out_size``, argmax."""
    return first_max_class(resize_logits(slide_inference(model, image, crop, stride, batch_size), out_size))


def resize_logits(logits: torch.Tensor, out_size: Sequence[int]) -> torch.Tensor:
    """Averaged logits (K, h, w), classes fastest in memory, bilinearly resized to ``out_size``:
    (K, H0, W0), classes still fastest (the layout CPU upsampling is fastest on)."""
    logits = logits.movedim(0, -1)[None].permute(0, 3, 1, 2)  # (1, K, h, w), a channels-last view
    return F.interpolate(logits, size=tuple(int(s) for s in out_size), mode="bilinear", align_corners=False)[0]


#: Up to this many torch threads, the CPU class index is NumPy's argmax (single-threaded) rather
#: than torch's max, which runs in parallel over the pixels (:func:`first_max_class`).
NUMPY_ARGMAX_MAX_THREADS = 2


def first_max_class(logits: torch.Tensor) -> torch.Tensor:
    """The first maximal class (K, H, W) -> (H, W) int64, as ``argmax(0)`` gives it.

    On CPU, with the classes fastest in memory (Segmenter's layout) and at most
    :data:`NUMPY_ARGMAX_MAX_THREADS` torch threads, NumPy's argmax over the contiguous class axis
    runs it with SIMD: per image of the default study (150 classes, 178×214, one Emerald Rapids
    core) 3.5-5.8 ms against 13-16 ms for torch's ``max(0).indices`` (18 ms for its ``argmax``);
    at two threads 5.3 against 8.4 ms. NumPy's argmax also returns the first maximum on ties
    (and the first NaN).
    """
    class_last = logits.detach().permute(1, 2, 0)
    if (logits.device.type == "cpu" and logits.dtype == torch.float32 and class_last.is_contiguous()
            and torch.get_num_threads() <= NUMPY_ARGMAX_MAX_THREADS):
        return torch.from_numpy(np.argmax(class_last.numpy(), axis=-1).astype(np.int64, copy=False))
    # max's indices are argmax's (the first maximal class on ties, as documented for both), faster on CPU
    return logits.max(0).indices


# Rows of SegMetric.areas and of areas_from_per_image's arrays.
AREA_ROWS = ("intersect", "union", "pred", "label")


def intersect_and_union(pred: torch.Tensor, label: torch.Tensor, num_classes: int,
                        ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """One image's areas (4, K) float64, rows :data:`AREA_ROWS`: mmseg's
    ``IoUMetric.intersect_and_union`` from one confusion matrix.

    Pixels labelled ``ignore_index`` are left out; a label or prediction outside 0..K-1 counts in
    no class, as in mmseg's histograms. One NumPy ``bincount`` over (label, prediction) pairs
    instead of mmseg's three ``histc``: the same counts, a third of the time on CPU (0.3 against
    1.0 ms for a 178×214 map of 150 classes). One exception: with a single class mmseg's
    ``histc(min=0, max=0)`` takes the data's own range instead, and counts values outside the
    class; here they count in no class, as for any other number of classes.
    """
    lab, prd = label.cpu().numpy(), pred.cpu().numpy()
    valid = lab != ignore_index
    lab = lab[valid].astype(np.int64, copy=False)
    prd = prd[valid].astype(np.int64, copy=False)
    k = num_classes
    lab = np.where((lab >= 0) & (lab < k), lab, k)  # row and column k: outside the classes
    prd = np.where((prd >= 0) & (prd < k), prd, k)
    confusion = np.bincount(lab * (k + 1) + prd, minlength=(k + 1) ** 2).reshape(k + 1, k + 1)
    intersect = confusion.diagonal()[:k]
    area_pred, area_label = confusion[:, :k].sum(0), confusion[:k].sum(1)
    areas = np.stack([intersect, area_pred + area_label - intersect, area_pred, area_label])
    return torch.from_numpy(areas.astype(np.float64))


class SegMetric:
    """Dataset-level confusion areas per class (:func:`intersect_and_union`), in float64.

    Attributes:
        areas: (4, K) float64, rows :data:`AREA_ROWS`, summed over the images so far.
        per_image: one entry per image, in update order (:func:`sparse_areas`).
    """

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.areas = torch.zeros((4, num_classes), dtype=torch.float64)  # intersect, union, pred, label
        self.per_image: list[dict[str, Any]] = []

    def update(self, pred: torch.Tensor, label: torch.Tensor, name: str = "") -> None:
        """Add one image, named ``name`` in :attr:`per_image`: ``pred`` and ``label`` (H, W)
        integer maps of the same size."""
        if pred.shape != label.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and label {tuple(label.shape)} differ in size")
        image = intersect_and_union(pred, label, self.num_classes, self.ignore_index)
        self.areas += image
        self.per_image.append(sparse_areas(name, image))

    def compute(self) -> dict[str, Any]:
        """``miou``, ``aacc``, ``macc`` and per-class ``iou`` / ``acc`` (fractions in [0, 1]; None = NaN)."""
        from mmseg.evaluation import IoUMetric

        m = IoUMetric.total_area_to_metrics(*self.areas, metrics=["mIoU"])
        iou, acc = torch.as_tensor(m["IoU"]), torch.as_tensor(m["Acc"])
        return {
            "miou": _float(torch.nanmean(iou)),
            "aacc": _float(torch.as_tensor(m["aAcc"])),
            "macc": _float(torch.nanmean(acc)),
            "iou": [_float(v) for v in iou],
            "acc": [_float(v) for v in acc],
        }


def sparse_areas(name: str, areas: torch.Tensor) -> dict[str, Any]:
    """One image's entry of a row's ``per_image``: its (4, K) areas (rows :data:`AREA_ROWS`) on
    the classes with a nonzero union, as ints.

    A class with no union has no intersection, prediction or label either, so nothing is lost.
    """
    classes = torch.nonzero(areas[1] > 0).flatten()
    kept = areas[:, classes].round().to(torch.int64).tolist()
    intersect, union, pred, label = kept
    return {"name": name, "classes": classes.tolist(), "intersect": intersect, "union": union, "label": label,
            "pred": pred}


def areas_from_per_image(per_image: Sequence[dict[str, Any]], num_classes: int) -> np.ndarray:
    """A row's ``per_image`` as a dense int64 array (images, 4, classes), rows :data:`AREA_ROWS`
    (intersect, union, pred, label); classes an image does not list are 0.

    Raises:
        ValueError: an entry whose class index is outside 0..num_classes-1, or whose lists differ
            in length from its ``classes``.
    """
    out = np.zeros((len(per_image), 4, num_classes), dtype=np.int64)
    for i, entry in enumerate(per_image):
        classes = np.asarray(entry["classes"], dtype=np.int64)
        if classes.size and (classes.min() < 0 or classes.max() >= num_classes):
            raise ValueError(f"per_image[{i}] ({entry.get('name')!r}): class index outside 0..{num_classes - 1}; "
                             f"pass the dataset's number of classes")
        rows = [entry[key] for key in AREA_ROWS]
        if any(len(r) != classes.size for r in rows):
            raise ValueError(f"per_image[{i}] ({entry.get('name')!r}): its area lists and 'classes' differ in length")
        out[i][:, classes] = np.asarray(rows, dtype=np.int64).reshape(4, classes.size)
    return out


def miou_of(areas: np.ndarray) -> float:
    """mIoU of areas (..., 4, classes), rows :data:`AREA_ROWS`, summed over every leading axis:
    the mean of intersect / union over the classes whose summed union is > 0 (NaN if none)."""
    areas = np.asarray(areas, dtype=np.float64)
    if areas.ndim < 2 or areas.shape[-2] != 4:
        raise ValueError(f"areas must have shape (..., 4, classes), got {areas.shape}")
    total = areas.reshape(-1, 4, areas.shape[-1]).sum(axis=0)
    present = total[1] > 0
    if not present.any():
        return math.nan
    return float(np.mean(total[0, present] / total[1, present]))


def _float(v: torch.Tensor) -> float | None:
    x = float(v)
    return None if math.isnan(x) else x


def evaluate(
        model: nn.Module,
        dataset: torch.utils.data.Dataset,
        crop: int | Sequence[int],
        stride: int | Sequence[int],
        num_classes: int,
        batch_size: int = 8,
        device: str | torch.device = "cpu",
        num_workers: int = 0,
        progress: str | bool = "auto",
) -> dict[str, Any]:
    """mIoU of ``model`` over a test-mode dataset (items ``{"image", "label", "name"}``).

    Returns:
        :meth:`SegMetric.compute`'s dict plus ``num_images``, ``seconds`` (wall time) and
        ``per_image`` (:attr:`SegMetric.per_image`, in dataset order).
    """
    from segcompress.progress import track

    model.eval()
    metric = SegMetric(num_classes)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, shuffle=False, num_workers=num_workers)
    start = time.perf_counter()
    n = 0
    for item in track(loader, len(dataset), "evaluate", "img", progress):
        label = item["label"].to(device)
        pred = predict(model, item["image"].to(device), label.shape, crop, stride, batch_size)
        metric.update(pred, label, item["name"])
        n += 1
    result = metric.compute()
    result.update(num_images=n, seconds=time.perf_counter() - start, per_image=metric.per_image)
    return result


def environment(device: str | torch.device) -> dict[str, Any]:
    """Hardware and software columns of a results row, and the code that produced it
    (:func:`segcompress.provenance.code_provenance`). timm's version is read from its package
    metadata: importing timm costs seconds (torchvision) that no evaluation needs."""
    from importlib.metadata import version

    from segcompress.provenance import code_provenance

    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"
    return {"device": name, "torch": torch.__version__, "timm": version("timm"), "python": platform.python_version(),
            **code_provenance()}
