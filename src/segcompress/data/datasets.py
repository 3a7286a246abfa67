"""Dataset readers for the ADE20K and Cityscapes layouts (real or synthetic, one code path).

Reading is mmsegmentation's: its ``ADE20KDataset`` (``reduce_zero_label``: 0 -> 255, others -1)
and ``CityscapesDataset`` (``*_gtFine_labelTrainIds.png``) list the files, and its transforms
(Segmenter's recipe) load and augment them. This module only checks the layout first (one clear
line naming the path and the expected layout), names the file when an image or a label cannot be
read or holds labels outside the class range, and converts mmseg's BGR uint8 output to the
tensors of ``docs/contracts.md``: normalised RGB (mean 127.5, std 127.5) and int64 labels with
255 = ignore.

``build_dataset(..., verify=True)`` (evaluation) checks every image and label it reads against
the sha256 its folder's ``manifest.json`` records (``segcompress data`` for the dataset root,
``segcompress corrupt`` for a corrupted set): each file is hashed as the loader reads its bytes,
so a file changed after the stage that verified it stops the run with one line naming it.

mmseg's random transforms draw from numpy's global generator: seed it (``np.random.seed``) in
the training process and use :func:`seed_worker` as the DataLoader's ``worker_init_fn``.
"""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from segcompress.data import cityscapes as cs
from segcompress.data.layouts import IGNORE_INDEX, get_layout

log = logging.getLogger(__name__)

MEAN = 127.5
STD = 127.5
RATIO_RANGE = (0.5, 2.0)
CAT_MAX_RATIO = 0.75
#: The manifest ``segcompress data`` (dataset root) and ``segcompress corrupt`` (each corrupted
#: set's folder) write: every file's path relative to the folder, size and sha256.
MANIFEST = "manifest.json"
#: Names of skipped files a warning shows.
SHOWN_SKIPPED = 3


@dataclass(frozen=True)
class LayoutFiles:
    """Where a layout keeps one split's files (``{split}`` is the layout's split folder)."""

    image_dir: str
    label_dir: str
    image_suffix: str
    label_suffix: str
    source_label_suffix: str | None  # Cityscapes: the labelIds the trainIds are derived from
    expected: str  # one-line description for error messages


FILES: dict[str, LayoutFiles] = {
    "ade20k": LayoutFiles(
        "images/{split}", "annotations/{split}", ".jpg", ".png", None,
        "ADEChallengeData2016 layout: images/{training,validation}/*.jpg and "
        "annotations/{training,validation}/*.png (pass the ADEChallengeData2016 folder itself)",
    ),
    "cityscapes": LayoutFiles(
        "leftImg8bit/{split}", "gtFine/{split}", cs.IMAGE_SUFFIX, cs.TRAIN_IDS_SUFFIX, cs.LABEL_IDS_SUFFIX,
        "Cityscapes layout: leftImg8bit/{train,val}/<city>/*_leftImg8bit.png and "
        "gtFine/{train,val}/<city>/*_gtFine_labelIds.png + *_gtFine_labelTrainIds.png",
    ),
}


@dataclass(frozen=True)
class Sample:
    """One image and its label files.

    Args:
        name: path below the split folder without the image suffix (``ADE_val_00000001``,
            ``frankfurt/frankfurt_000000_000294``).
        image: the image file.
        label: the label file the reader loads (ADE ``.png``; Cityscapes ``*_labelTrainIds.png``).
        source_label: Cityscapes ``*_gtFine_labelIds.png`` (None for ADE20K).
    """

    name: str
    image: Path
    label: Path
    source_label: Path | None = None

    @property
    def files(self) -> list[Path]:
        return [self.image, self.label] + ([self.source_label] if self.source_label else [])


def split_folder(layout: str, split: str) -> str:
    """The layout's folder for ``split``: ``train``/``val`` (or the layout's own names) -> e.g. ``validation``."""
    names = get_layout(layout).splits
    canonical = {"train": names[0], "val": names[1], names[0]: names[0], names[1]: names[1]}
    try:
        return canonical[split]
    except KeyError:
        raise ValueError(f"unknown split {split!r} for {layout}; choose train or val") from None


def _root_error(layout: str, root: Path, missing: Path) -> FileNotFoundError:
    hint = ""
    if layout == "ade20k" and (root / "ADEChallengeData2016").is_dir():
        hint = f"; did you mean --root {root / 'ADEChallengeData2016'}?"
    return FileNotFoundError(f"{missing}: not found; {root} must be in the {FILES[layout].expected}{hint}")


def list_samples(layout: str, root: str | Path, split: str, require_labels: bool = True) -> list[Sample]:
    """Check one split's layout and list its samples, sorted by image path.

    Raises:
        FileNotFoundError: a folder, or an image's label, is missing (the message names the path,
            the expected layout and, for Cityscapes trainIds, the ``--prepare`` fix).
    """
    files = FILES[layout]
    root = Path(root)
    folder = split_folder(layout, split)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: dataset root not found; expected the {files.expected}")
    image_dir = root / files.image_dir.format(split=folder)
    label_dir = root / files.label_dir.format(split=folder)
    for d in (image_dir, label_dir):
        if not d.is_dir():
            raise _root_error(layout, root, d)
    found = sorted(p for p in image_dir.rglob("*") if p.is_file() and not p.name.startswith("."))
    images = [p for p in found if p.name.endswith(files.image_suffix)]
    _warn_skipped(image_dir, [p for p in found if not p.name.endswith(files.image_suffix)], files.image_suffix)
    if not images:
        raise FileNotFoundError(f"{image_dir}: no *{files.image_suffix} images; expected the {files.expected}")
    samples = []
    for img in images:
        rel = img.relative_to(image_dir).as_posix()[: -len(files.image_suffix)]
        label = label_dir / f"{rel}{files.label_suffix}"
        source = label_dir / f"{rel}{files.source_label_suffix}" if files.source_label_suffix else None
        if require_labels:
            if source is not None and not source.is_file():
                raise FileNotFoundError(f"{source}: label missing for {img}; expected the {files.expected}")
            if not label.is_file():
                if source is not None:
                    raise FileNotFoundError(
                        f"{label}: missing; run `segcompress data --layout cityscapes --root {root} --prepare` "
                        f"to write *{cs.TRAIN_IDS_SUFFIX} from *{cs.LABEL_IDS_SUFFIX}"
                    )
                raise FileNotFoundError(f"{label}: label missing for {img}; expected the {files.expected}")
        samples.append(Sample(rel, img, label, source))
    return samples


@functools.cache
def _warn_once(message: str) -> None:
    """Log ``message`` as a warning the first time only (a verb builds a split once per condition)."""
    log.warning(message)


def _warn_skipped(image_dir: Path, skipped: list[Path], suffix: str) -> None:
    """One warning line for the files of a split's image folder that are not ``*suffix`` images."""
    if not skipped:
        return
    names = ", ".join(p.relative_to(image_dir).as_posix() for p in skipped[:SHOWN_SKIPPED])
    more = f" and {len(skipped) - SHOWN_SKIPPED} more" if len(skipped) > SHOWN_SKIPPED else ""
    _warn_once(f"{image_dir}: skipped {len(skipped)} file(s) not named *{suffix} ({names}{more}); "
               f"convert or rename them to *{suffix} to use them, or remove them")


def check_layout(layout: str, root: str | Path, splits: Sequence[str] = ("train", "val")) -> dict[str, list[Sample]]:
    """:func:`list_samples` for each split (a dataset for the pipeline has train and val)."""
    get_layout(layout)
    return {split: list_samples(layout, root, split) for split in splits}


# -- content checks (used by `segcompress data`) -------------------------------------------------

@dataclass(frozen=True)
class FileRecord:
    """A file of the dataset as the manifest lists it."""

    path: str  # relative to the dataset root, POSIX separators
    bytes: int
    sha256: str


def _decode(data: bytes, path: Path, what: str) -> Any:
    from PIL import Image

    try:
        im = Image.open(io.BytesIO(data))
        im.load()  # full decode: truncated or corrupt files raise here
        return im
    except Exception as e:  # PIL raises many types for bad files
        raise ValueError(
            f"{path}: corrupt or unreadable {what} ({e}); replace the file or regenerate the dataset"
        ) from None


def _label_array(im: Any, path: Path) -> np.ndarray:
    if im.mode not in ("L", "P"):
        raise ValueError(f"{path}: label image has mode {im.mode}; expected a single-channel (L or P) PNG")
    return np.asarray(im, dtype=np.uint8)


def check_label_values(layout: str, label: np.ndarray, path: str | Path) -> None:
    """Raise ValueError naming ``path`` if a raw label file holds values outside the layout's range.

    ADE20K annotations hold 0 (other) .. 150; Cityscapes trainIds hold 0..18 or 255.
    """
    values = np.unique(label)
    if layout == "ade20k":
        bad = values[values > get_layout(layout).num_classes]
        expected = f"0..{get_layout(layout).num_classes} (0 = other)"
    else:
        bad = values[(values >= get_layout(layout).num_classes) & (values != IGNORE_INDEX)]
        expected = f"trainIds 0..{get_layout(layout).num_classes - 1} or {IGNORE_INDEX}"
    if bad.size:
        raise ValueError(f"{path}: label value(s) {bad[:5].tolist()} outside the class range ({expected})")


def check_sample(layout: str, root: str | Path, sample: Sample, decode: bool = True) -> list[FileRecord]:
    """Read a sample's files once: hash them and (``decode``) check that they decode, that image and
    label sizes agree and that labels are in range (Cityscapes: trainIds match labelIds).

    Raises:
        ValueError: naming the offending file.
    """
    root = Path(root)
    records, arrays, sizes = [], {}, {}
    for path in sample.files:
        data = path.read_bytes()
        records.append(FileRecord(path.relative_to(root).as_posix(), len(data), hashlib.sha256(data).hexdigest()))
        if not decode:
            continue
        im = _decode(data, path, "image" if path == sample.image else "label")
        sizes[path] = im.size
        if path != sample.image:
            arrays[path] = _label_array(im, path)
    if decode:
        for path, size in sizes.items():
            if size != sizes[sample.image]:
                raise ValueError(
                    f"{path}: size {size[0]}x{size[1]} differs from its image {sample.image} "
                    f"({sizes[sample.image][0]}x{sizes[sample.image][1]})"
                )
        check_label_values(layout, arrays[sample.label], sample.label)
        if sample.source_label is not None:
            ids = arrays[sample.source_label]
            cs.check_label_ids(ids, sample.source_label)
            if not np.array_equal(cs.label_ids_to_train_ids(ids), arrays[sample.label]):
                raise ValueError(
                    f"{sample.label}: does not match {sample.source_label.name} under the official id -> trainId "
                    f"mapping; rewrite it with "
                    f"`segcompress data --layout cityscapes --root {root} --prepare --overwrite`"
                )
    return records


def dataset_digest(records: Iterable[FileRecord]) -> str:
    """One sha256 over every file's relative path, size and content hash (order-independent)."""
    h = hashlib.sha256()
    for r in sorted(records, key=lambda r: r.path):
        h.update(f"{r.path}\0{r.bytes}\0{r.sha256}\n".encode())
    return "sha256:" + h.hexdigest()


# -- verification against a manifest (evaluation) -----------------------------------------------

#: The loaders' ``backend_args`` when reads are verified: mmengine's local file backend, which also
#: records the sha256 of the bytes it returns (:func:`_register_hashing_backend`).
HASHING_BACKEND = {"backend": "segcompress-hashing"}
#: sha256 of files the hashing backend read in this process that no dataset has checked yet.
_READ_SHA256: dict[str, str] = {}
#: What each stage did to the files its manifest lists, for messages.
_STAGE_VERB = {"data": "verified", "corrupt": "wrote"}


class ChangedFileError(ValueError):
    """A dataset file whose content differs from the sha256 its folder's manifest records."""


@dataclass(frozen=True)
class Expected:
    """The sha256 a manifest records for one file, and which manifest (and stage) recorded it."""

    sha256: str
    manifest: str
    stage: str  # "data" (segcompress data) or "corrupt" (segcompress corrupt)

    def check(self, path: str | Path, actual: str) -> None:
        """Raise :class:`ChangedFileError` naming ``path`` when ``actual`` (the sha256 of the bytes
        read) is not the manifest's."""
        if actual != self.sha256:
            raise ChangedFileError(
                f"{path}: changed since the {self.stage} stage {_STAGE_VERB[self.stage]} it (sha256 {actual[:16]}..., "
                f"{self.manifest} records {self.sha256[:16]}...); rerun the {self.stage} stage "
                f"(snakemake --forcerun {self.stage}) or restore the file"
            )


@dataclass(frozen=True)
class ManifestHashes:
    """The sha256 of every file a folder's ``manifest.json`` lists (paths relative to the folder)."""

    folder: Path
    manifest: Path
    stage: str
    sha256: dict[str, str]

    def expected(self, path: str | Path) -> Expected:
        """What ``path`` (a file under the folder) must hash to.

        Raises:
            ChangedFileError: the manifest does not list the file (added after the stage ran).
        """
        rel = Path(os.path.relpath(path, self.folder)).as_posix()
        if rel not in self.sha256:
            raise ChangedFileError(
                f"{path}: not in {self.manifest} (added after the {self.stage} stage {_STAGE_VERB[self.stage]} "
                f"the folder); rerun the {self.stage} stage (snakemake --forcerun {self.stage}) or remove the file"
            )
        return Expected(self.sha256[rel], str(self.manifest), self.stage)

    def check_listed(self, image_dir: Path, suffix: str, images: Sequence[Path]) -> None:
        """Raise naming the manifest if an image it lists under ``image_dir`` is no longer there."""
        prefix = Path(os.path.relpath(image_dir, self.folder)).as_posix() + "/"
        present = {Path(os.path.relpath(p, self.folder)).as_posix() for p in images}
        gone = sorted(r for r in self.sha256 if r.startswith(prefix) and r.endswith(suffix) and r not in present)
        if gone:
            raise ChangedFileError(
                f"{self.manifest}: {len(gone)} image(s) it lists are gone (first: {gone[0]}); restore them or "
                f"rerun the {self.stage} stage (snakemake --forcerun {self.stage})"
            )


def read_manifest_hashes(folder: str | Path) -> ManifestHashes | None:
    """The per-file sha256 of ``folder/manifest.json`` (None when there is none).

    A dataset root's manifest (``segcompress data``) lists its files under ``files``; a corrupted
    set's (``segcompress corrupt``, which also records the corruption) under ``images``.

    Raises:
        ValueError: the manifest is not JSON or lists no sha256 per file (an older format).
    """
    folder = Path(folder)
    path = folder / MANIFEST
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return _read_manifest_hashes(folder, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4)
def _read_manifest_hashes(folder: Path, mtime_ns: int, size: int) -> ManifestHashes:
    """:func:`read_manifest_hashes` of a manifest as of its (mtime, size): parsed once per
    process, though a verb builds the split once per condition."""
    from segcompress.io import read_json

    path = folder / MANIFEST
    manifest = read_json(path)
    stage = "corrupt" if isinstance(manifest, dict) and "corruption" in manifest else "data"
    try:
        sha256 = {e["path"]: e["sha256"] for e in manifest["images" if stage == "corrupt" else "files"]}
    except (TypeError, KeyError):
        raise ValueError(
            f"{path}: lists no sha256 per file (an older or foreign manifest); rerun the {stage} stage "
            f"(snakemake --forcerun {stage}) to rewrite it"
        ) from None
    return ManifestHashes(folder, path, stage, sha256)


def _manifest_or_warn(folder: Path, what: str) -> ManifestHashes | None:
    """:func:`read_manifest_hashes`, logging one warning when the folder has no manifest."""
    hashes = read_manifest_hashes(folder)
    if hashes is None:
        _warn_once(f"{folder / MANIFEST}: not found; reading the {what} without checking their content "
                   "(a folder that `segcompress data` or `segcompress corrupt` did not write)")
    return hashes


@functools.cache
def _register_hashing_backend() -> None:
    """Register :data:`HASHING_BACKEND` with mmengine (once per process, workers included): its
    local file backend, recording the sha256 of each file's bytes in ``_READ_SHA256`` as it
    returns them, so the file is read once."""
    from mmengine.fileio import LocalBackend, register_backend

    class HashingBackend(LocalBackend):
        def get(self, filepath: str | Path) -> bytes:
            data = super().get(filepath)
            _READ_SHA256[os.path.normpath(filepath)] = hashlib.sha256(data).hexdigest()
            return data

    register_backend(HASHING_BACKEND["backend"], HashingBackend, force=True)


# -- readers -------------------------------------------------------------------------------------

def normalize(img_bgr: torch.Tensor) -> torch.Tensor:
    """mmseg's uint8 BGR (3, H, W) -> float32 RGB normalised with mean 127.5, std 127.5."""
    return (img_bgr.flip(0).float() - MEAN) / STD


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(v, int):
        return v, v
    v = tuple(int(x) for x in v)
    if len(v) != 2:
        raise ValueError(f"expected one size or (H, W), got {v}")
    return v  # type: ignore[return-value]


def build_pipeline(mode: str, crop: int | Sequence[int], img_scale: Sequence[int], hashed: bool = False,
                   photometric: bool = True) -> list:
    """mmseg transforms of Segmenter's recipe (``mode``: ``train`` or ``test``); with ``hashed``
    the loaders read through :data:`HASHING_BACKEND`; ``photometric=False`` leaves out the training
    pipeline's PhotoMetricDistortion (its hue and saturation jitter changes what tells the
    synthetic scenes' classes apart)."""
    from mmcv.transforms import LoadImageFromFile, RandomResize
    from mmseg.datasets.transforms import (
        LoadAnnotations, PackSegInputs, PhotoMetricDistortion, RandomCrop, RandomFlip, Resize,
    )

    scale = tuple(int(s) for s in img_scale)
    if len(scale) != 2:
        raise ValueError(f"img_scale must be (long, short), got {img_scale}")
    backend_args = None
    if hashed:
        _register_hashing_backend()
        backend_args = dict(HASHING_BACKEND)
    if mode == "train":
        return [
            LoadImageFromFile(backend_args=backend_args),
            LoadAnnotations(backend_args=backend_args),
            RandomResize(scale=scale, ratio_range=RATIO_RANGE, resize_type="mmseg.Resize", keep_ratio=True),
            RandomCrop(crop_size=_pair(crop), cat_max_ratio=CAT_MAX_RATIO),
            RandomFlip(prob=0.5),
            *([PhotoMetricDistortion()] if photometric else []),
            PackSegInputs(),
        ]
    if mode == "test":
        return [LoadImageFromFile(backend_args=backend_args), Resize(scale=scale, keep_ratio=True),
                LoadAnnotations(backend_args=backend_args), PackSegInputs()]
    raise ValueError(f"unknown dataset mode {mode!r}; choose train or test")


class SegDataset(torch.utils.data.Dataset):
    """An mmseg dataset seen through the contract of ``docs/contracts.md``.

    ``mode="train"``: ``(image (3, cH, cW) float32, label (cH, cW) int64)`` after augmentation,
    padded to the crop with 0 (the normalised mean) and 255. ``mode="test"``: ``{"image": (3, h, w)
    resized keep-ratio to img_scale, "label": (H0, W0) original size, "name": str}``.

    ``expected`` (files by normalised path -> their manifest's sha256; the pipeline's loaders read
    through :data:`HASHING_BACKEND`): each image and label is checked as it is read, and a changed
    one raises :class:`ChangedFileError`. None: nothing is checked.
    """

    def __init__(self, mm_dataset: Any, layout: str, mode: str, crop: int | Sequence[int],
                 expected: dict[str, Expected] | None = None) -> None:
        self.mm = mm_dataset
        self.layout = layout
        self.mode = mode
        self.crop = _pair(crop)
        self.num_classes = get_layout(layout).num_classes
        self.expected = expected

    def __len__(self) -> int:
        return len(self.mm)

    @property
    def names(self) -> list[str]:
        return [self.mm.get_data_info(i)["name"] for i in range(len(self))]

    def _run_pipeline(self, info: dict) -> dict:
        from mmseg.datasets.transforms import LoadAnnotations

        results = dict(info)
        img_path, seg_path = info["img_path"], info["seg_map_path"]
        for t in self.mm.pipeline.transforms:
            culprit = seg_path if isinstance(t, LoadAnnotations) else img_path
            try:
                out = t(results)
            except FileNotFoundError:
                raise FileNotFoundError(f"{culprit}: file not found") from None
            except Exception as e:  # decoders raise many types; name the file
                self._verify(culprit, read=False)  # a changed file explains a failed decode best
                what = "label" if culprit == seg_path else "image"
                raise ValueError(
                    f"{culprit}: cannot read {what} ({type(e).__name__}: {e}); "
                    "replace the file or regenerate the dataset"
                ) from e
            if out is None:
                raise ValueError(f"{img_path}: {type(t).__name__} returned nothing")
            results = out
        self._verify(img_path)
        self._verify(seg_path)
        return results

    def _verify(self, path: str, read: bool = True) -> None:
        """Check the sha256 the hashing backend recorded for ``path`` against its manifest (a no-op
        for an unverified dataset or a folder without a manifest); ``read``: the loader has read it."""
        if self.expected is None:
            return
        key = os.path.normpath(path)
        actual = _READ_SHA256.pop(key, None)
        expected = self.expected.get(key)
        if expected is None or (actual is None and not read):
            return
        if actual is None:
            raise RuntimeError(f"{path}: read without its sha256; build the dataset with build_dataset(verify=True)")
        expected.check(path, actual)

    def _check_label(self, label: torch.Tensor, path: str) -> None:
        bad = (label >= self.num_classes) & (label != IGNORE_INDEX)
        if bool(bad.any()):
            v = int(label[bad][0])
            if self.layout == "ade20k":
                shown = f"{v + 1} (raw; 0..{self.num_classes} allowed)"
            else:
                shown = f"{v} (0..{self.num_classes - 1} or {IGNORE_INDEX} allowed)"
            raise ValueError(f"{path}: label value {shown} outside the class range")

    def __getitem__(self, idx: int):
        if self.expected is not None:
            _register_hashing_backend()  # once per process: a worker started by spawn has not yet
        info = self.mm.get_data_info(idx)
        results = self._run_pipeline(info)
        image = normalize(results["inputs"])
        label = results["data_samples"].gt_sem_seg.data[0].long()
        self._check_label(label, info["seg_map_path"])
        if self.mode == "test":
            return {"image": image, "label": label, "name": info["name"]}
        ch, cw = self.crop
        h, w = label.shape
        if h < ch or w < cw:
            image = F.pad(image, (0, cw - w, 0, ch - h), value=0.0)
            label = F.pad(label, (0, cw - w, 0, ch - h), value=IGNORE_INDEX)
        return image, label


def cycle(batches: Iterable[Any], what: str = "training") -> Iterator[Any]:
    """``batches`` over and over (a data loader: a new epoch each time); none at all is refused."""
    while True:
        empty = True
        for b in batches:
            empty = False
            yield b
        if empty:
            raise ValueError(f"{what} got no batches")


def collate_train(batch: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack training items into ``(images (B, 3, cH, cW), labels (B, cH, cW))``."""
    images, labels = zip(*batch)
    return torch.stack(images), torch.stack(labels)


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seed numpy and random (mmseg's transforms) from torch's seed."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def corrupted_image_path(img_root: str | Path, rel: str | Path) -> Path:
    """Where a corrupted copy of the clean image ``rel`` (relative to the dataset root) lives."""
    return (Path(img_root) / rel).with_suffix(".png")


def build_dataset(
        layout: str,
        root: str | Path,
        split: str,
        mode: str,
        crop: int | Sequence[int],
        img_scale: Sequence[int],
        img_root: str | Path | None = None,
        max_images: int | None = None,
        verify: bool = False,
        photometric: bool = True,
) -> SegDataset:
    """A dataset of ``layout`` under ``root`` (real or synthetic; see :class:`SegDataset` for items).

    Args:
        layout: ``ade20k`` or ``cityscapes``.
        root: dataset root (the ADEChallengeData2016 folder, or the Cityscapes root).
        split: ``train`` or ``val`` (or the layout's folder names).
        mode: ``train`` (augmented crops) or ``test`` (resized images, original-size labels).
        crop: training crop ``S`` or ``(H, W)``.
        img_scale: ``(long, short)`` resize scale (ADE20K: (2048, 512), Cityscapes: (2048, 1024)).
        img_root: read images from this folder instead (corrupted sets): same paths relative to
            the root, ``.png`` suffix; labels still from ``root``.
        max_images: use only the first N images (sorted by path).
        verify: check every image and label as it is read against its folder's manifest
            (``root``'s, and ``img_root``'s for the images), and up front that each file is listed
            and that no listed image is gone; a folder without a manifest is read unchecked, with
            one warning.
        photometric: ``train`` mode: include the photometric distortion (see :func:`build_pipeline`).

    Raises:
        ChangedFileError: (``verify``) a file the manifest does not list, a listed image that is
            gone, or (when read) a file whose content changed.
    """
    from mmseg.datasets import ADE20KDataset, CityscapesDataset

    get_layout(layout)
    files = FILES[layout]
    root = Path(root)
    folder = split_folder(layout, split)
    samples = list_samples(layout, root, split)  # layout check with clear messages
    clean = _manifest_or_warn(root, "dataset's images and labels") if verify else None
    if clean is not None:
        clean.check_listed(root / files.image_dir.format(split=folder), files.image_suffix, [s.image for s in samples])
    if max_images is not None:
        if max_images < 1:
            raise ValueError(f"max_images must be >= 1, got {max_images}")
        samples = samples[:max_images]
    cls = ADE20KDataset if layout == "ade20k" else CityscapesDataset
    mm = cls(
        data_root=str(root),
        data_prefix=dict(
            img_path=files.image_dir.format(split=folder), seg_map_path=files.label_dir.format(split=folder),
        ),
        pipeline=build_pipeline(mode, crop, img_scale, hashed=verify, photometric=photometric),
        indices=max_images,
        serialize_data=False,
        test_mode=False,
    )
    if len(mm) != len(samples):
        raise ValueError(f"{root}: mmseg lists {len(mm)} {split} images but the layout has {len(samples)}")
    by_image = {os.path.normpath(s.image): s for s in samples}
    for info in mm.data_list:
        sample = by_image.get(os.path.normpath(info["img_path"]))
        if sample is None:
            raise ValueError(f"{info['img_path']}: listed by mmseg but not in the {files.expected}")
        info["name"] = sample.name
        if img_root is not None:
            info["img_path"] = str(corrupted_image_path(img_root, sample.image.relative_to(root)))
    if img_root is not None:
        missing = [i["img_path"] for i in mm.data_list if not os.path.isfile(i["img_path"])]
        if missing:
            raise FileNotFoundError(
                f"{missing[0]}: corrupted image not found ({len(missing)} of {len(mm)} missing under {img_root}); "
                "expected the clean images' paths relative to the dataset root with a .png suffix"
            )
    expected = None
    if verify:
        images = clean if img_root is None else _manifest_or_warn(Path(img_root), "images")
        expected = {}
        for info in mm.data_list:
            for path, hashes in ((info["img_path"], images), (info["seg_map_path"], clean)):
                if hashes is not None:
                    expected[os.path.normpath(path)] = hashes.expected(path)
    return SegDataset(mm, layout, mode, crop, expected)
