"""Seeded, resumable corrupted validation sets (ADE20K-C, Cityscapes-C) after Kamann & Rother.

One call of :func:`generate` (one ``segcompress corrupt`` job of the workflow) writes one
(corruption, severity) folder: ``<out>/<corruption>/<severity>/<relpath>.png`` where
``<relpath>`` is the clean val image's path relative to the dataset root (suffix ``.png``,
lossless); labels are never copied, readers take them from the clean root. The folder gets
``manifest.json`` (docs/contracts.md) once all of its images exist.

Determinism. Every output image is a pure function of (dataset name, relative image path,
corruption, severity, global seed) and the clean image, whatever the order, the number of
processes or which other images are generated. imagecorruptions-imaug 1.1.5 draws randomness
from three places, and each is seeded per image from one SHA-256 digest of those five values:

* NumPy's legacy global ``RandomState`` (gaussian/shot/speckle noise, motion_blur angle, snow,
  spatter, fog's plasma fractal, frost's image choice and crop, elastic_transform): reseeded with
  ``np.random.seed(<128-bit key>)`` before every call.
* ``impulse_noise``: ``skimage.util.random_noise(rng=seed)``, its own Generator, via ``seed=``.
* ``glass_blur``: numba's internal per-thread ``np.random`` inside the jitted pixel shuffle,
  seeded by ``seed=`` (numba keeps the low 32 bits); without ``seed=`` it would draw fresh OS
  entropy from ``np.random.default_rng()``.

Frost. The original imagecorruptions (and ImageNet-C) draws its frost texture among 5 images
(``np.random.randint(5)``); the installed imagecorruptions-imaug fork draws among 6 (it adds
``frost6.jpg``). The reference's 5 are kept by choosing the seed, not by changing the library: a
frost image's key is re-derived (a chain of digests) until the fork's first draw, the texture
index, falls among the first 5 (:func:`frost_seed`). The texture is then uniform over the
original's 5 and the crop is drawn by the library as usual.

Every corruption whose function accepts ``seed=`` gets one (found by signature, so a library
update that adds ``seed=`` elsewhere is still seeded). The rest (defocus/gaussian/zoom blur,
brightness, contrast, saturate, jpeg, pixelate) are deterministic.

Each PNG carries its provenance in a ``tEXt`` chunk; a rerun skips an output that is complete
(ends with ``IEND``) and has the expected provenance, so a changed seed or library version
regenerates instead of silently reusing stale images.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import multiprocessing as mp
import os
import struct
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from segcompress.io import atomic_write_bytes, atomic_write_text

log = logging.getLogger(__name__)

PROTOCOL = "segcompress-corrupt/1"
PNG_TEXT_KEY = "segcompress-corrupt"
MANIFEST_NAME = "manifest.json"
SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)
#: zlib level of the PNGs. Level 1 encodes 2-7x faster than PIL's default 6 (which can cost more
#: than the corruption itself on smooth images such as fog) for files ~10-20% larger; lossless at
#: every level, and the level is not part of an image's provenance (its pixels do not change).
DEFAULT_COMPRESS_LEVEL = 1

#: Kamann & Rother's 16 corruptions in their 4 categories (docs/methods.md §8).
CATEGORIES: dict[str, tuple[str, ...]] = {
    "blur": ("motion_blur", "defocus_blur", "glass_blur", "gaussian_blur"),
    "noise": ("gaussian_noise", "impulse_noise", "shot_noise", "speckle_noise"),
    "digital": ("brightness", "contrast", "saturate", "jpeg_compression"),
    "weather": ("snow", "spatter", "fog", "frost"),
}
KAMANN_CORRUPTIONS: tuple[str, ...] = tuple(c for names in CATEGORIES.values() for c in names)
#: The 3 geometric / resolution-changing corruptions the protocol leaves out (ImageNet-C groups).
EXTRA_CORRUPTIONS: dict[str, str] = {
    "zoom_blur": "blur",
    "elastic_transform": "digital",
    "pixelate": "digital",
}
ALL_CORRUPTIONS: tuple[str, ...] = KAMANN_CORRUPTIONS + tuple(EXTRA_CORRUPTIONS)
CATEGORY_OF: dict[str, str] = {
    **{c: cat for cat, names in CATEGORIES.items() for c in names},
    **EXTRA_CORRUPTIONS,
}

_VAL_IMAGES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    # layout: (folder under root, glob below it, accepted suffixes)
    "ade20k": ("images/validation", "*", (".jpg", ".jpeg", ".png")),
    "cityscapes": ("leftImg8bit/val", "*/*_leftImg8bit.png", (".png",)),
}
_MIN_SIDE = 32  # imagecorruptions refuses smaller images
_PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- protocol


def check_corruption(name: str) -> str:
    """``name`` if it is one of the 19 corruptions, else a ValueError naming it."""
    if name not in CATEGORY_OF:
        raise ValueError(f"unknown corruption {name!r}; choose from {', '.join(ALL_CORRUPTIONS)}")
    return name


def corruption_category(name: str) -> str:
    """The category (blur, noise, digital, weather) of a corruption; ``clean`` for ``clean``."""
    return "clean" if name == "clean" else CATEGORY_OF[check_corruption(name)]


# ----------------------------------------------------------------------------- images


def list_val_images(layout: str, root: str | Path) -> list[str]:
    """Relative POSIX paths (to ``root``) of the clean validation images, sorted."""
    if layout not in _VAL_IMAGES:
        raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(_VAL_IMAGES)}")
    root = Path(root)
    folder, pattern, suffixes = _VAL_IMAGES[layout]
    base = root / folder
    if not base.is_dir():
        raise FileNotFoundError(
            f"{base}: no such folder; is {root} a {layout}-layout dataset root "
            f"(run `segcompress data` first or fix --root/--layout)?"
        )
    rels = sorted(
        p.relative_to(root).as_posix()
        for p in base.glob(pattern)
        if p.is_file() and p.suffix.lower() in suffixes
    )
    if not rels:
        raise FileNotFoundError(f"{base}: no validation images matching {pattern}; fix --root/--layout")
    outs = [output_relpath(r) for r in rels]
    if len(set(outs)) != len(outs):
        raise ValueError(f"{base}: two images differ only by suffix (e.g. .jpg and .png); keep one")
    return rels


def select_images(images: Sequence[str], max_images: int | None, seed: int, dataset: str) -> list[str]:
    """A fixed seeded subset of ``max_images`` images (nested in ``max_images``), sorted by path."""
    if max_images is None or max_images >= len(images):
        return sorted(images)
    if max_images < 1:
        raise ValueError(f"max_images: {max_images} must be >= 1 (or omitted for all images)")
    ranked = sorted(images, key=lambda rel: _digest("image-subset", dataset, seed, rel))
    return sorted(ranked[:max_images])


def output_relpath(relpath: str) -> str:
    """The corrupted image's path: same relative path, ``.png`` suffix."""
    p = Path(relpath)
    return p.with_suffix(".png").as_posix()


def read_rgb(path: str | Path) -> np.ndarray:
    """An image file as a (H, W, 3) uint8 RGB array (grayscale, palette and CMYK converted)."""
    from PIL import Image

    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    if min(arr.shape[:2]) < _MIN_SIDE:
        h, w = arr.shape[:2]
        raise ValueError(f"{path}: {w}x{h} is too small; imagecorruptions needs >= {_MIN_SIDE} px per side")
    return arr


# ----------------------------------------------------------------------------- seeding


def _digest(*keys: object) -> bytes:
    text = "\x1f".join(str(k) for k in (PROTOCOL, *keys))
    return hashlib.sha256(text.encode("utf-8")).digest()


@dataclass(frozen=True)
class ImageSeed:
    """The seeds for one (dataset, image, corruption, severity, global seed)."""

    digest: bytes

    @classmethod
    def derive(cls, dataset: str, relpath: str, corruption: str, severity: int, seed: int) -> ImageSeed:
        image_seed = cls(_digest("image", dataset, relpath, corruption, int(severity), int(seed)))
        return frost_seed(image_seed) if corruption == "frost" else image_seed

    @property
    def numpy_key(self) -> list[int]:
        """128-bit key for the legacy global ``np.random.seed`` (MT19937 init_by_array)."""
        return list(struct.unpack("<4I", self.digest[:16]))

    @property
    def kwarg(self) -> int:
        """Value for a corruption's own ``seed=`` (32 bits: numba's ``np.random.seed`` keeps 32)."""
        return int.from_bytes(self.digest[16:20], "little")

    @property
    def hex(self) -> str:
        return self.digest[:16].hex()


#: Frost textures the original imagecorruptions draws among (frost1-frost5); the fork has 6.
FROST_IMAGES = 5
#: How many textures the installed fork's ``frost`` draws its index among (``np.random.randint(6)``).
_FORK_FROST_IMAGES = 6


def frost_seed(seed: ImageSeed) -> ImageSeed:
    """``seed``, or the first of its re-derived successors whose legacy ``np.random`` stream makes
    the fork's ``frost`` pick one of the original's :data:`FROST_IMAGES` textures (its first draw
    is the texture index). Unchanged when that draw is already one of them (5 in 6 images)."""
    while np.random.RandomState(seed.numpy_key).randint(_FORK_FROST_IMAGES) >= FROST_IMAGES:
        seed = ImageSeed(_digest("frost-redraw", seed.digest.hex()))
    return seed


# ----------------------------------------------------------------------------- corrupting


@lru_cache(maxsize=None)
def _takes_seed(corruption: str) -> bool:
    from imagecorruptions import corruption_dict

    return "seed" in inspect.signature(corruption_dict[corruption]).parameters


@lru_cache(maxsize=1)
def library_version() -> str:
    """The installed imagecorruptions distribution and version (part of every provenance)."""
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("imagecorruptions-imaug", "imagecorruptions"):
        try:
            return f"{dist} {version(dist)}"
        except PackageNotFoundError:
            continue
    raise ImportError("imagecorruptions is not installed; install imagecorruptions-imaug (envs/requirements.txt)")


def corrupt_array(image: np.ndarray, corruption: str, severity: int, seed: ImageSeed) -> np.ndarray:
    """Corrupt one (H, W, 3) uint8 image; the result depends only on its arguments."""
    from imagecorruptions import corrupt

    np.random.seed(seed.numpy_key)
    kwargs = {"seed": seed.kwarg} if _takes_seed(corruption) else {}
    out = corrupt(image, severity=int(severity), corruption_name=corruption, **kwargs)
    if out.shape != image.shape:
        raise ValueError(f"{corruption} severity {severity} changed the image shape {image.shape} -> {out.shape}")
    return out


def provenance(dataset: str, relpath: str, corruption: str, severity: int, seed: int) -> str:
    """The provenance string stored in each output PNG (compared on rerun)."""
    return json.dumps(
        {
            "protocol": PROTOCOL,
            "library": library_version(),
            "dataset": dataset,
            "image": relpath,
            "corruption": corruption,
            "severity": int(severity),
            "seed": int(seed),
            "image_seed": ImageSeed.derive(dataset, relpath, corruption, severity, seed).hex,
        },
        sort_keys=True,
        separators=(",", ":"),
    )


def encode_png(image: np.ndarray, text: str, compress_level: int = DEFAULT_COMPRESS_LEVEL) -> bytes:
    """Lossless PNG bytes with ``text`` in a tEXt chunk before the image data."""
    from io import BytesIO

    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text(PNG_TEXT_KEY, text)
    buf = BytesIO()
    Image.fromarray(image).save(buf, format="PNG", pnginfo=info, compress_level=compress_level)
    return buf.getvalue()


def png_provenance(path: str | Path) -> str | None:
    """The provenance of a complete PNG written by this module, else None (missing, truncated,
    foreign or unreadable)."""
    try:
        with open(path, "rb") as f:
            if f.read(8) != _PNG_SIGNATURE:
                return None
            f.seek(-12, os.SEEK_END)
            if f.read(12) != _PNG_IEND:
                return None
            f.seek(8)
            while True:
                header = f.read(8)
                if len(header) < 8:
                    return None
                length, kind = struct.unpack(">I4s", header)
                if kind in (b"IDAT", b"IEND"):
                    return None
                data = f.read(length)
                f.seek(4, os.SEEK_CUR)  # CRC
                if kind == b"tEXt":
                    key, _, value = data.partition(b"\x00")
                    if key == PNG_TEXT_KEY.encode():
                        return value.decode("latin-1")
    except OSError:
        return None


# ----------------------------------------------------------------------------- one folder


@dataclass(frozen=True)
class _Job:
    """One output image of the folder."""

    source: str  # absolute clean image path
    path: str  # absolute output path
    relpath: str  # output path relative to the folder
    provenance: str
    seed: ImageSeed
    todo: bool  # must be (re)generated: missing, incomplete or stale when planned


@dataclass(frozen=True)
class _Result:
    relpath: str
    sha256: str
    size: int
    generated: bool
    seconds: float


def _run_job(job: _Job, corruption: str, severity: int, compress_level: int) -> _Result:
    """Generate one output unless it is already there (complete, same provenance); hash it."""
    t0 = time.perf_counter()
    if job.todo and png_provenance(job.path) != job.provenance:
        image = read_rgb(job.source)
        try:
            corrupted = corrupt_array(image, corruption, severity, job.seed)
        except Exception as e:  # name the image; worker tracebacks are unreadable
            what = f"{corruption} severity {severity}"
            raise ValueError(f"{job.source}: {what} failed: {type(e).__name__}: {e}") from None
        data = encode_png(corrupted, job.provenance, compress_level)
        atomic_write_bytes(job.path, data)
        generated = True
    else:
        data = Path(job.path).read_bytes()
        generated = False
    return _Result(job.relpath, hashlib.sha256(data).hexdigest(), len(data), generated, time.perf_counter() - t0)


def _init_worker(warm_glass_blur: bool) -> None:
    """Pool initializer: one OpenCV thread per worker, and glass_blur's numba JIT paid once here."""
    import cv2

    cv2.setNumThreads(1)
    if warm_glass_blur:
        warm_up()


def warm_up() -> float:
    """Compile glass_blur's numba kernel in this process (no-op if done); returns seconds."""
    t0 = time.perf_counter()
    # Same argument types as real calls (uint8 HxWx3 C-contiguous, int seed): one compile only.
    corrupt_array(np.zeros((_MIN_SIDE, _MIN_SIDE, 3), np.uint8), "glass_blur", 1, ImageSeed(bytes(32)))
    return time.perf_counter() - t0


@dataclass
class CorruptReport:
    """What a run did: the folder's manifest, outputs generated vs. skipped, wall seconds, and the
    seconds spent on its images summed over the processes."""

    manifest: Path
    generated: int
    skipped: int
    seconds: float
    worker_seconds: float


def default_processes() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def folder_of(out: str | Path, corruption: str, severity: int) -> Path:
    """``<out>/<corruption>/<severity>``."""
    return Path(out) / corruption / str(int(severity))


def generate(
    layout: str,
    root: str | Path,
    out: str | Path,
    dataset: str,
    corruption: str,
    severity: int,
    *,
    seed: int = 0,
    processes: int | None = None,
    max_images: int | None = None,
    compress_level: int = DEFAULT_COMPRESS_LEVEL,
    progress: str | bool = "auto",
) -> CorruptReport:
    """Generate (or complete) the folder ``<out>/<corruption>/<severity>`` of ``dataset``'s val images.

    Args:
        layout: ``ade20k`` or ``cityscapes`` (which clean val images to list).
        root: clean dataset root (``data/<ds>``).
        out: corrupted set root (``data/<ds>-c``).
        dataset: dataset name that enters every image's seed (``<ds>``).
        corruption: one of :data:`ALL_CORRUPTIONS`.
        severity: 1..5.
        seed: global seed.
        processes: worker processes (None: the CPUs this process may use); 1 runs in-process.
        max_images: fixed seeded subset of the val images (None: all).
        compress_level: PNG zlib level 0..9 (lossless at every level; see DEFAULT_COMPRESS_LEVEL).
        progress: ``auto``, ``on`` or ``off`` (:mod:`segcompress.progress`).
    """
    t_start = time.perf_counter()
    check_corruption(corruption)
    if severity not in SEVERITIES:
        raise ValueError(f"severity: {severity} is not allowed; use an integer in 1..5")
    if compress_level not in range(10):
        raise ValueError(f"compress_level: {compress_level} must be in 0..9")
    severity, seed, root, folder = int(severity), int(seed), Path(root), folder_of(out, corruption, severity)
    images = select_images(list_val_images(layout, root), max_images, seed, dataset)
    jobs = []
    for rel in images:
        path, text = folder / output_relpath(rel), provenance(dataset, rel, corruption, severity, seed)
        jobs.append(_Job(str(root / rel), str(path), output_relpath(rel), text,
                         ImageSeed.derive(dataset, rel, corruption, severity, seed), png_provenance(path) != text))
    pending = sum(job.todo for job in jobs)
    if pending:  # the manifest vouches for the whole folder: remove it before touching any file there
        (folder / MANIFEST_NAME).unlink(missing_ok=True)
    workers = max(1, min(processes or default_processes(), pending))
    log.info("corrupt %s %s/%d: %d images, %d to generate, %d processes",
             dataset, corruption, severity, len(images), pending, workers)

    from segcompress.progress import Progress

    results: dict[str, _Result] = {}
    with Progress(len(jobs), f"corrupt {dataset}", "img", progress) as bar:
        if workers == 1:
            for job in jobs:
                results[job.relpath] = _run_job(job, corruption, severity, compress_level)
                bar.update(1)
        else:
            # Pending images first so the pool's time goes to work; the others only hash existing files.
            ordered = sorted(jobs, key=lambda job: not job.todo)
            with _pool(workers, warm=corruption == "glass_blur") as pool:
                futures = [pool.submit(_run_job, job, corruption, severity, compress_level) for job in ordered]
                try:
                    for future in as_completed(futures):
                        result = future.result()
                        results[result.relpath] = result
                        bar.update(1)
                except BrokenProcessPool:
                    raise RuntimeError(
                        f"corrupt {dataset}: a worker process died (out of memory?); finished images are kept, "
                        "rerun with fewer --processes to complete the rest"
                    ) from None
                finally:
                    for future in futures:
                        future.cancel()

    manifest = {
        "protocol": PROTOCOL,
        "library": library_version(),
        "dataset": dataset,
        "layout": layout,
        "corruption": corruption,
        "category": corruption_category(corruption),
        "severity": severity,
        "seed": seed,
        "max_images": max_images,
        "num_images": len(images),
        "images": [
            {"path": r.relpath, "source": rel, "sha256": r.sha256, "bytes": r.size}
            for rel, r in ((rel, results[output_relpath(rel)]) for rel in images)
        ],
    }
    path, text = folder / MANIFEST_NAME, json.dumps(manifest, indent=2) + "\n"
    if not (path.is_file() and path.read_text() == text):  # keep mtime if nothing changed
        atomic_write_text(path, text)
    generated = sum(r.generated for r in results.values())
    return CorruptReport(path, generated, len(results) - generated, time.perf_counter() - t_start,
                         sum(r.seconds for r in results.values()))


def _pool(workers: int, warm: bool) -> Any:
    """A process pool whose workers start with glass_blur compiled (when ``warm``).

    Start method ``forkserver`` where available, else ``spawn``. Plain ``fork`` is unsafe here: a
    parent that has run OpenCV holds its thread pool's condition variables, and
    ``cv2.setNumThreads`` in a forked child can then block forever (seen in tests). The forkserver
    is a fresh process that never ran OpenCV; it preloads this module and, when ``warm``, compiles
    glass_blur once (:mod:`segcompress._corrupt_warm`), so the workers forked from it inherit the
    compiled kernel. With ``spawn``, or a forkserver already started without it, each worker
    compiles it once in the initializer.
    """
    method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
    ctx = mp.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload(["segcompress.corrupt", *(["segcompress._corrupt_warm"] if warm else [])])
    return ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(warm,))


def corrupt_file(
    source: str | Path,
    relpath: str,
    dataset: str,
    corruption: str,
    severity: int,
    seed: int,
    compress_level: int = DEFAULT_COMPRESS_LEVEL,
) -> bytes:
    """The exact PNG bytes ``generate`` writes for one image (for checks and one-off regeneration)."""
    image = read_rgb(source)
    arr = corrupt_array(image, corruption, severity, ImageSeed.derive(dataset, relpath, corruption, severity, seed))
    return encode_png(arr, provenance(dataset, relpath, corruption, severity, seed), compress_level)
