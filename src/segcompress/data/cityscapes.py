"""Cityscapes label conversion: ``*_gtFine_labelIds.png`` to ``*_gtFine_labelTrainIds.png``.

The one conversion used for real Cityscapes (``segcompress data --prepare``) and for the
synthetic scenes, so both go through the same code. The mapping is the official one (the label
table of the Cityscapes scripts, ``cityscapesscripts.helpers.labels``, written out below so the
package and its obsolete dependencies are not installed): the 19 evaluated classes get trainIds
0..18, every other id (void, and ignored classes such as parking, guard rail, caravan) gets 255.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from segcompress.data.layouts import IGNORE_INDEX
from segcompress.io import atomic_path

LABEL_IDS_SUFFIX = "_gtFine_labelIds.png"
TRAIN_IDS_SUFFIX = "_gtFine_labelTrainIds.png"
IMAGE_SUFFIX = "_leftImg8bit.png"


# labelIds 0..33 of the evaluated classes, in trainId order (road = 0 ... bicycle = 18); every
# other labelId (0-6 void, 9 parking, 10 rail track, 14 guard rail, 15 bridge, 16 tunnel,
# 18 polegroup, 29 caravan, 30 trailer) is ignored. License plate (-1) never appears in labelIds.
EVALUATED_LABEL_IDS = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)
NUM_LABEL_IDS = 34


@lru_cache(maxsize=1)
def label_id_lut() -> np.ndarray:
    """(256,) uint8 lookup table labelId -> trainId; ids that are not Cityscapes labels map to 255."""
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for train_id, label_id in enumerate(EVALUATED_LABEL_IDS):
        lut[label_id] = train_id
    return lut


@lru_cache(maxsize=1)
def valid_label_ids() -> frozenset[int]:
    """The labelIds a ``*_gtFine_labelIds.png`` may contain (0..33)."""
    return frozenset(range(NUM_LABEL_IDS))


def label_ids_to_train_ids(label_ids: np.ndarray) -> np.ndarray:
    """Map a labelIds array to trainIds (0..18, 255 = ignore)."""
    return label_id_lut()[np.asarray(label_ids, dtype=np.uint8)]


def check_label_ids(label_ids: np.ndarray, path: str | Path) -> None:
    """Raise ValueError naming ``path`` if it holds values that are not Cityscapes labelIds."""
    bad = sorted(set(np.unique(label_ids).tolist()) - valid_label_ids())
    if bad:
        raise ValueError(
            f"{path}: contains value(s) {bad[:5]} that are not Cityscapes labelIds (0..33); "
            "replace the file with the original *_gtFine_labelIds.png"
        )


def read_label_png(path: str | Path) -> np.ndarray:
    """A single-channel label PNG as a uint8 (H, W) array; ValueError naming the file otherwise."""
    from PIL import Image

    path = Path(path)
    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "P"):
                raise ValueError(f"mode {im.mode}, expected a single-channel (L or P) PNG")
            arr = np.asarray(im)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: label file not found") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable label image ({e}); replace the file") from None
    return arr.astype(np.uint8, copy=False)


def write_label_png(path: str | Path, label: np.ndarray) -> None:
    """Write a uint8 (H, W) label as a mode-L PNG, atomically."""
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(np.ascontiguousarray(label, dtype=np.uint8)).save(tmp, format="PNG")


def train_ids_path(label_ids_path: str | Path) -> Path:
    """``x_gtFine_labelIds.png`` -> ``x_gtFine_labelTrainIds.png``."""
    p = Path(label_ids_path)
    if not p.name.endswith(LABEL_IDS_SUFFIX):
        raise ValueError(f"{p}: not a Cityscapes *{LABEL_IDS_SUFFIX} file")
    return p.with_name(p.name[: -len(LABEL_IDS_SUFFIX)] + TRAIN_IDS_SUFFIX)


def write_train_ids(label_ids_path: str | Path, overwrite: bool = True) -> Path:
    """Write the ``*_gtFine_labelTrainIds.png`` beside ``label_ids_path`` (atomically) and return it.

    Args:
        label_ids_path: a ``*_gtFine_labelIds.png``.
        overwrite: rewrite an existing trainIds file (else keep it).
    """
    out = train_ids_path(label_ids_path)
    if out.exists() and not overwrite:
        return out
    label_ids = read_label_png(label_ids_path)
    check_label_ids(label_ids, label_ids_path)
    write_label_png(out, label_ids_to_train_ids(label_ids))
    return out


def prepare_cityscapes(root: str | Path, overwrite: bool = False, progress: str | bool = "auto") -> int:
    """Write every missing ``*_gtFine_labelTrainIds.png`` under ``root/gtFine``; return how many.

    This replaces cityscapesscripts' ``createTrainIdLabelImgs`` (which needs the polygon JSON
    files) by the same id -> trainId mapping applied to the ``*_labelIds.png`` images.
    """
    from segcompress.progress import track

    gt = Path(root) / "gtFine"
    if not gt.is_dir():
        raise FileNotFoundError(
            f"{gt}: folder not found; expected a Cityscapes root with gtFine/{{train,val}}/<city>/*{LABEL_IDS_SUFFIX}"
        )
    sources = sorted(p for p in gt.rglob(f"*{LABEL_IDS_SUFFIX}") if overwrite or not train_ids_path(p).exists())
    for p in track(sources, len(sources), "labelTrainIds", "file", progress):
        write_train_ids(p, overwrite=True)
    return len(sources)
