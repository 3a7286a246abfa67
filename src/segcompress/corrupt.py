"""Seeded, resumable corrupted validation sets (ADE20K-C, Cityscapes-C) after Kamann & Rother.

Output layout (docs/contracts.md): ``<out>/<corruption>/<severity>/<relpath>.png`` where
``<relpath>`` is the clean val image's path relative to the dataset root (suffix ``.png``,
lossless); labels are never copied, readers take them from the clean root. Each
(corruption, severity) folder gets ``manifest.json`` once all of its images exist.

Determinism. Every output image is a pure function of (dataset name, relative image path,
corruption, severity, global seed) and the clean image, whatever the order, the number of workers
or which other images are generated. imagecorruptions-imaug 1.1.5 draws randomness from three
places, and each is seeded per image from one SHA-256 digest of those five values:

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
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
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
PRESETS: dict[str, tuple[str, ...]] = {"kamann": KAMANN_CORRUPTIONS, "all": ALL_CORRUPTIONS}

_VAL_IMAGES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    # layout: (folder under root, glob below it, accepted suffixes)
    "ade20k": ("images/validation", "*", (".jpg", ".jpeg", ".png")),
    "cityscapes": ("leftImg8bit/val", "*/*_leftImg8bit.png", (".png",)),
}
_MIN_SIDE = 32  # imagecorruptions refuses smaller images
_PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- protocol


def corruption_category(name: str) -> str:
    """The category (blur, noise, digital, weather) of a corruption; ``clean`` for ``clean``."""
    if name == "clean":
        return "clean"
    try:
        return CATEGORY_OF[name]
    except KeyError:
        raise ValueError(
            f"unknown corruption {name!r}; choose from {', '.join(ALL_CORRUPTIONS)}"
        ) from None


def resolve_corruptions(spec: str | Sequence[str]) -> tuple[str, ...]:
    """Corruption names from ``kamann``, ``all``, a comma list, or a list of names/presets."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for item in (s.strip() for s in items):
        if not item:
            continue
        for name in PRESETS.get(item, (item,)):
            corruption_category(name)  # validates
            if name not in out:
                out.append(name)
    if not out:
        raise ValueError("corruptions: empty list; pass 'kamann', 'all' or names like 'fog,snow'")
    return tuple(out)


def check_severities(severities: Iterable[int], what: str = "severities") -> tuple[int, ...]:
    """Sorted unique severities, each in 1..5."""
    out = tuple(sorted({int(s) for s in severities}))
    bad = [s for s in out if s not in SEVERITIES]
    if bad or not out:
        raise ValueError(f"{what}: {bad or 'empty'} not allowed; use integers in 1..5")
    return out


def severities_for(
    corruption: str,
    severities: Sequence[int] = SEVERITIES,
    category_severities: Mapping[str, Sequence[int]] | None = None,
) -> tuple[int, ...]:
    """Severities for one corruption: its category's override (e.g. noise 1-3) or the default."""
    override = (category_severities or {}).get(corruption_category(corruption))
    return check_severities(override if override is not None else severities)


def select_corruptions(corruptions: Sequence[str], max_corruptions: int | None, seed: int) -> tuple[str, ...]:
    """A fixed seeded subset, one category after another so small subsets cover every category.

    Subsets are nested: the subset of size n is a prefix-by-rank of the subset of size n + 1.
    """
    if max_corruptions is None or max_corruptions >= len(corruptions):
        return tuple(corruptions)
    by_cat: dict[str, list[str]] = {}
    for c in corruptions:
        by_cat.setdefault(corruption_category(c), []).append(c)
    for names in by_cat.values():
        names.sort(key=lambda c: _digest("corruption-subset", seed, c))
    picked: list[str] = []
    while len(picked) < max_corruptions:
        for names in by_cat.values():
            if names and len(picked) < max_corruptions:
                picked.append(names.pop(0))
    return tuple(c for c in corruptions if c in picked)


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


# ----------------------------------------------------------------------------- jobs


@dataclass(frozen=True)
class _Output:
    folder: tuple[str, int]  # (corruption, severity)
    path: str  # absolute output path
    relpath: str  # relative to the folder
    provenance: str
    seed: ImageSeed


@dataclass(frozen=True)
class _Task:
    source: str  # absolute clean image path
    corruption: str
    outputs: tuple[_Output, ...]
    severities: tuple[int, ...]
    todo: tuple[bool, ...]  # per output: must be (re)generated
    compress_level: int


@dataclass(frozen=True)
class _Result:
    folder: tuple[str, int]
    relpath: str
    sha256: str
    size: int
    generated: bool
    seconds: float


def _run_task(task: _Task) -> list[_Result]:
    """Generate the missing outputs of one (image, corruption) for all its severities."""
    results: list[_Result] = []
    image: np.ndarray | None = None
    for out, severity, todo in zip(task.outputs, task.severities, task.todo):
        t0 = time.perf_counter()
        if todo and png_provenance(out.path) != out.provenance:
            if image is None:
                image = read_rgb(task.source)
            try:
                corrupted = corrupt_array(image, task.corruption, severity, out.seed)
            except Exception as e:  # name the image; worker tracebacks are unreadable
                what = f"{task.corruption} severity {severity}"
                raise ValueError(f"{task.source}: {what} failed: {type(e).__name__}: {e}") from None
            data = encode_png(corrupted, out.provenance, task.compress_level)
            atomic_write_bytes(out.path, data)
            generated = True
        else:
            data = Path(out.path).read_bytes()
            generated = False
        sha = hashlib.sha256(data).hexdigest()
        results.append(_Result(out.folder, out.relpath, sha, len(data), generated, time.perf_counter() - t0))
    return results


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


# ----------------------------------------------------------------------------- the generator


@dataclass
class CorruptConfig:
    """What to generate.

    Args:
        layout: ``ade20k`` or ``cityscapes`` (which clean val images to list).
        root: clean dataset root (``data/<ds>``).
        out: corrupted set root (``data/<ds>-c``).
        dataset: dataset name that enters every image's seed (``<ds>``).
        corruptions: names or presets (``kamann``: 16, ``all``: 19).
        severities: default severities.
        category_severities: per-category override, e.g. ``{"noise": (1, 2, 3)}``.
        seed: global seed.
        workers: processes (default: the CPUs this process may use); 1 runs in-process.
        max_images: fixed seeded subset of the val images (None: all).
        max_corruptions: fixed seeded subset of the corruptions, spread over categories.
        compress_level: PNG zlib level 0..9 (lossless at every level; see DEFAULT_COMPRESS_LEVEL).
        progress: ``auto``, ``on`` or ``off`` (:mod:`segcompress.progress`).
        start_method: multiprocessing start method (default ``forkserver``; see ``_pool``).
    """

    layout: str
    root: Path
    out: Path
    dataset: str
    corruptions: Sequence[str] | str = "kamann"
    severities: Sequence[int] = SEVERITIES
    category_severities: Mapping[str, Sequence[int]] = field(default_factory=dict)
    seed: int = 0
    workers: int | None = None
    max_images: int | None = None
    max_corruptions: int | None = None
    compress_level: int = DEFAULT_COMPRESS_LEVEL
    progress: str | bool = "auto"
    start_method: str | None = None

    def plan(self) -> dict[str, tuple[int, ...]]:
        """Corruption -> severities to generate."""
        for cat in self.category_severities:
            if cat not in CATEGORIES:
                raise ValueError(f"category_severities: unknown category {cat!r}; choose from {', '.join(CATEGORIES)}")
        names = select_corruptions(resolve_corruptions(self.corruptions), self.max_corruptions, self.seed)
        return {c: severities_for(c, self.severities, self.category_severities) for c in names}


@dataclass
class CorruptReport:
    """What a run did: manifests written, outputs generated vs. skipped, seconds per corruption."""

    manifests: list[Path]
    generated: int
    skipped: int
    seconds: float
    worker_seconds: dict[str, float]
    generated_per_corruption: dict[str, int]


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def folder_of(out: str | Path, corruption: str, severity: int) -> Path:
    """``<out>/<corruption>/<severity>``."""
    return Path(out) / corruption / str(int(severity))


def generate(config: CorruptConfig) -> CorruptReport:
    """Generate (or complete) every configured (corruption, severity) folder; return a report."""
    t_start = time.perf_counter()
    plan = config.plan()
    root, out = Path(config.root), Path(config.out)
    images = select_images(list_val_images(config.layout, root), config.max_images, config.seed, config.dataset)
    if config.compress_level not in range(10):
        raise ValueError(f"compress_level: {config.compress_level} must be in 0..9")

    tasks: list[_Task] = []
    for corruption, severities in plan.items():
        for rel in images:
            outs = tuple(
                _Output(
                    folder=(corruption, s),
                    path=str(folder_of(out, corruption, s) / output_relpath(rel)),
                    relpath=output_relpath(rel),
                    provenance=provenance(config.dataset, rel, corruption, s, config.seed),
                    seed=ImageSeed.derive(config.dataset, rel, corruption, s, config.seed),
                )
                for s in severities
            )
            todo = tuple(png_provenance(o.path) != o.provenance for o in outs)
            tasks.append(_Task(str(root / rel), corruption, outs, severities, todo, config.compress_level))

    # A manifest vouches for its whole folder: remove it before touching any file there.
    for folder in {o.folder for t in tasks for o, todo in zip(t.outputs, t.todo) if todo}:
        (folder_of(out, *folder) / MANIFEST_NAME).unlink(missing_ok=True)

    pending = sum(any(t.todo) for t in tasks)
    workers = max(1, min(config.workers or default_workers(), pending))
    warm = any(t.corruption == "glass_blur" and any(t.todo) for t in tasks)
    log.info(
        "corrupt %s: %d images x %d folders, %d outputs to generate, %d workers",
        config.dataset, len(images), sum(len(s) for s in plan.values()), sum(sum(t.todo) for t in tasks), workers,
    )

    expected = {(c, s): len(images) for c, sev in plan.items() for s in sev}
    done: dict[tuple[str, int], list[_Result]] = {k: [] for k in expected}
    manifests: list[Path] = []
    worker_seconds: dict[str, float] = {c: 0.0 for c in plan}
    generated_per: dict[str, int] = {c: 0 for c in plan}

    def collect(results: list[_Result]) -> None:
        for r in results:
            done[r.folder].append(r)
            worker_seconds[r.folder[0]] += r.seconds
            generated_per[r.folder[0]] += int(r.generated)
            if len(done[r.folder]) == expected[r.folder]:
                manifests.append(_write_manifest(config, out, r.folder, images, done[r.folder]))

    total = sum(len(t.outputs) for t in tasks)
    if workers == 1:
        with _progress(total, config) as bar:
            for task in tasks:
                results = _run_task(task)
                collect(results)
                bar.update(len(results))
    else:
        # Pending tasks first so the pool's time goes to work; the others only hash existing files.
        ordered = sorted(tasks, key=lambda t: not any(t.todo))
        with _pool(workers, warm, config.start_method) as pool, _progress(total, config) as bar:
            futures = [pool.submit(_run_task, task) for task in ordered]
            try:
                for future in as_completed(futures):
                    results = future.result()
                    collect(results)
                    bar.update(len(results))
            except BrokenProcessPool:
                raise RuntimeError(
                    f"corrupt {config.dataset}: a worker process died (out of memory?); finished images are kept, "
                    "rerun with fewer --workers to complete the rest"
                ) from None
            finally:
                for future in futures:
                    future.cancel()

    generated = sum(generated_per.values())
    return CorruptReport(
        manifests=manifests,
        generated=generated,
        skipped=total - generated,
        seconds=time.perf_counter() - t_start,
        worker_seconds=worker_seconds,
        generated_per_corruption=generated_per,
    )


def _pool(workers: int, warm: bool, start_method: str | None) -> Any:
    """A process pool whose workers start with glass_blur compiled (when ``warm``).

    Default start method: ``forkserver``. Plain ``fork`` is unsafe here: a parent that has run
    OpenCV holds its thread pool's condition variables, and ``cv2.setNumThreads`` in a forked
    child can then block forever (seen in tests). The forkserver is a fresh process that never ran
    OpenCV; it preloads this module and, when ``warm``, compiles glass_blur once, so the workers
    forked from it inherit the compiled kernel. With ``spawn``, or a forkserver already started
    without it, each worker compiles it once in the initializer.
    """
    methods = mp.get_all_start_methods()
    method = start_method or ("forkserver" if "forkserver" in methods else "spawn")
    if method not in methods:
        raise ValueError(f"start_method: {method!r} is not available here; choose from {', '.join(methods)}")
    ctx = mp.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload(["segcompress.corrupt", *(["segcompress._corrupt_warm"] if warm else [])])
    return ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(warm,))


def _progress(total: int, config: CorruptConfig) -> Any:
    from segcompress.progress import Progress

    return Progress(total, f"corrupt {config.dataset}", "img", config.progress)


def _write_manifest(
    config: CorruptConfig, out: Path, folder: tuple[str, int], images: Sequence[str], results: Sequence[_Result]
) -> Path:
    """Write ``manifest.json`` of one finished folder (deterministic; untouched if unchanged)."""
    corruption, severity = folder
    by_rel = {r.relpath: r for r in results}
    manifest: dict[str, Any] = {
        "protocol": PROTOCOL,
        "library": library_version(),
        "dataset": config.dataset,
        "layout": config.layout,
        "corruption": corruption,
        "category": corruption_category(corruption),
        "severity": severity,
        "seed": config.seed,
        "max_images": config.max_images,
        "num_images": len(images),
        "images": [
            {
                "path": output_relpath(rel),
                "source": rel,
                "sha256": by_rel[output_relpath(rel)].sha256,
                "bytes": by_rel[output_relpath(rel)].size,
            }
            for rel in images
        ],
    }
    path = folder_of(out, corruption, severity) / MANIFEST_NAME
    text = json.dumps(manifest, indent=2) + "\n"
    if not (path.is_file() and path.read_text() == text):  # keep mtime if nothing changed
        atomic_write_text(path, text)
    return path


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
