"""Corrupted val sets, one (corruption, severity) folder per run as the workflow's jobs:
per-image determinism (any order, any number of processes), all 19 corruptions at both layouts'
aspects, labels never copied, reruns skip finished outputs.

Tiny images (64x48 ADE-like, 96x48 Cityscapes-like). glass_blur's numba JIT is compiled once in
this process and once in the pool's forkserver (its workers inherit it) per test session.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segcompress import corrupt as C
from segcompress.cli import main as cli_main

ADE_SIZE = (48, 64)  # (H, W), 4:3 like ADE20K
CITY_SIZE = (48, 96)  # 1:2 like Cityscapes
# One corruption per source of randomness: numpy global (gaussian_noise, frost: image choice and
# crop), skimage's own rng (impulse_noise), numba's rng (glass_blur), none (jpeg_compression).
RNG_MIX = ["gaussian_noise", "impulse_noise", "glass_blur", "frost", "jpeg_compression"]
DETERMINISTIC = {"defocus_blur", "gaussian_blur", "zoom_blur", "brightness", "contrast", "saturate",
                 "jpeg_compression", "pixelate"}


def _texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([np.sin(xx / 5 + c) * 60 + np.cos(yy / 7 - c) * 60 + 128 for c in range(3)], -1)
    return np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)


def _make_ade(root: Path, n: int = 3) -> None:
    rng = np.random.default_rng(1)
    for i in range(1, n + 1):
        for split in ("training", "validation"):
            name = f"ADE_{'val' if split == 'validation' else 'train'}_{i:08d}"
            (root / "images" / split).mkdir(parents=True, exist_ok=True)
            (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
            Image.fromarray(_texture(rng, *ADE_SIZE)).save(root / "images" / split / f"{name}.jpg", quality=90)
            Image.fromarray(rng.integers(0, 151, ADE_SIZE, dtype=np.uint8)).save(
                root / "annotations" / split / f"{name}.png"
            )


def _make_cityscapes(root: Path) -> None:
    rng = np.random.default_rng(2)
    for city, idx in (("frankfurt", 1), ("frankfurt", 2), ("lindau", 7)):
        stem = f"{city}_{idx:06d}_000019"
        img_dir, gt_dir = root / "leftImg8bit" / "val" / city, root / "gtFine" / "val" / city
        img_dir.mkdir(parents=True, exist_ok=True)
        gt_dir.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_texture(rng, *CITY_SIZE)).save(img_dir / f"{stem}_leftImg8bit.png")
        for suffix in ("labelIds", "labelTrainIds"):
            Image.fromarray(rng.integers(0, 34, CITY_SIZE, dtype=np.uint8)).save(gt_dir / f"{stem}_gtFine_{suffix}.png")


def _tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def jit() -> None:
    """Compile glass_blur in this process while the pools' forkserver compiles it too (its
    workers inherit the kernel): the two compiles overlap instead of adding up."""
    import multiprocessing as mp
    from multiprocessing import forkserver

    if "forkserver" in mp.get_all_start_methods():
        mp.get_context("forkserver").set_forkserver_preload(["segcompress.corrupt", "segcompress._corrupt_warm"])
        forkserver.ensure_running()
    C.warm_up()


@pytest.fixture(scope="module")
def ade(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data") / "ade"
    _make_ade(root)
    return root


@pytest.fixture(scope="module")
def city(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data") / "city"
    _make_cityscapes(root)
    return root


def _generate(root: Path, out: Path, layout: str = "ade20k", corruptions: list[str] = RNG_MIX,
              severities: tuple[int, ...] = (1, 3), **kw) -> list[C.CorruptReport]:
    """Every (corruption, severity) folder, one ``generate`` call each (one workflow job each)."""
    return [C.generate(layout, root, out, layout, c, s, progress=False, **kw) for c in corruptions for s in severities]


def _sum(reports: list[C.CorruptReport], field: str) -> int:
    return sum(getattr(r, field) for r in reports)


# ----------------------------------------------------------------------------- protocol


def test_protocol_lists() -> None:
    assert len(C.KAMANN_CORRUPTIONS) == 16 and len(C.ALL_CORRUPTIONS) == 19
    from imagecorruptions import get_corruption_names

    assert set(C.ALL_CORRUPTIONS) == set(get_corruption_names("all")) == set(C.CATEGORY_OF)
    assert C.corruption_category("speckle_noise") == "noise" and C.corruption_category("spatter") == "weather"
    with pytest.raises(ValueError, match="unknown corruption 'fogg'"):
        C.check_corruption("fogg")


def test_bad_corruption_or_severity_is_refused(ade: Path, tmp_path: Path) -> None:
    for corruption, severity, match in (("fogg", 3, "unknown corruption 'fogg'"), ("clean", 3, "'clean'"),
                                        ("fog", 0, "severity: 0 .*1..5"), ("fog", 6, "severity: 6 .*1..5")):
        with pytest.raises(ValueError, match=match):
            C.generate("ade20k", ade, tmp_path / "o", "ade20k", corruption, severity, progress=False)
    assert not (tmp_path / "o").exists()


def test_image_subsets() -> None:
    images = [f"images/validation/ADE_val_{i:08d}.jpg" for i in range(50)]
    sub = C.select_images(images, 5, seed=0, dataset="ade")
    assert sub == sorted(sub) and sub == C.select_images(list(reversed(images)), 5, seed=0, dataset="ade")
    assert set(sub) <= set(C.select_images(images, 9, seed=0, dataset="ade"))
    assert sub != C.select_images(images, 5, seed=1, dataset="ade")


@pytest.mark.parametrize("shape", [(*ADE_SIZE, 3), (ADE_SIZE[1], ADE_SIZE[0], 3), (*CITY_SIZE, 3)],
                         ids=["ade-landscape", "ade-portrait", "cityscapes"])
def test_every_corruption_runs_and_is_seeded(jit: None, shape: tuple[int, int, int]) -> None:
    img = _texture(np.random.default_rng(0), *shape[:2])
    for name in C.ALL_CORRUPTIONS:
        for severity in C.SEVERITIES:
            seed = C.ImageSeed.derive("ds", "a.jpg", name, severity, 0)
            out = C.corrupt_array(img, name, severity, seed)
            assert out.shape == img.shape and out.dtype == np.uint8, name
            # Reset the global RNG in between: only our per-image seeding may matter.
            np.random.seed(12345)
            again = C.corrupt_array(img, name, severity, seed)
            assert np.array_equal(out, again), f"{name} {severity} not reproducible"
        other = C.corrupt_array(img, name, 5, C.ImageSeed.derive("ds", "b.jpg", name, 5, 0))
        assert np.array_equal(out, other) == (name in DETERMINISTIC), f"{name}: seed has the wrong effect"


# ----------------------------------------------------------------------------- the generator


@pytest.fixture(scope="module")
def ade_c(jit: None, ade: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[C.CorruptReport]]:
    """The reference output: one process, in-process."""
    out = tmp_path_factory.mktemp("out") / "ade-c"
    return out, _generate(ade, out, processes=1)


def test_layout_and_manifest(ade: Path, ade_c: tuple[Path, list[C.CorruptReport]]) -> None:
    out, reports = ade_c
    assert _sum(reports, "generated") == 3 * len(RNG_MIX) * 2 and _sum(reports, "skipped") == 0
    assert len({r.manifest for r in reports}) == len(RNG_MIX) * 2 and all(r.manifest.is_file() for r in reports)
    assert sorted(p.name for p in out.iterdir()) == sorted(RNG_MIX)  # only what was asked for
    man = json.loads((out / "glass_blur" / "3" / "manifest.json").read_text())
    assert man["category"] == "blur" and man["severity"] == 3 and man["num_images"] == 3
    for entry in man["images"]:
        data = (out / "glass_blur" / "3" / entry["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"]
        assert entry["path"] == entry["source"].replace(".jpg", ".png")
        with Image.open(out / "glass_blur" / "3" / entry["path"]) as im:
            assert im.format == "PNG" and im.size == (ADE_SIZE[1], ADE_SIZE[0])


def test_labels_untouched(ade: Path, ade_c: tuple[Path, list[C.CorruptReport]]) -> None:
    out, _ = ade_c
    before = _tree(ade)
    files = [p.relative_to(out) for p in out.rglob("*") if p.is_file()]
    assert files and all(p.name == "manifest.json" or p.parts[2:4] == ("images", "validation") for p in files)
    assert not any("annotations" in p.parts or p.name.startswith(".") for p in files)
    _generate(ade, out, processes=1)
    assert _tree(ade) == before


def test_same_bytes_with_two_processes_and_any_order(ade: Path, ade_c: tuple[Path, list[C.CorruptReport]],
                                                     tmp_path: Path) -> None:
    ref, _ = ade_c
    two = tmp_path / "two"
    _generate(ade, two, processes=2)
    assert _tree(two) == _tree(ref)  # images and manifests
    # One folder at a time, in reverse order, one image at a time: still the same bytes.
    images = C.list_val_images("ade20k", ade)
    for name in reversed(RNG_MIX):
        for severity in (3, 1):
            for rel in reversed(images):
                data = C.corrupt_file(ade / rel, rel, "ade20k", name, severity, seed=0)
                assert data == (ref / name / str(severity) / C.output_relpath(rel)).read_bytes(), (name, severity, rel)
    single = tmp_path / "single"
    C.generate("ade20k", ade, single, "ade20k", "frost", 3, processes=1, progress=False)
    assert _tree(single / "frost") == {k[len("frost/"):]: v for k, v in _tree(ref).items() if k.startswith("frost/3/")}


def test_seed_and_dataset_name_change_the_images(ade: Path, ade_c: tuple[Path, list[C.CorruptReport]],
                                                 tmp_path: Path) -> None:
    ref, _ = ade_c
    rel = C.list_val_images("ade20k", ade)[0]
    base = C.corrupt_file(ade / rel, rel, "ade20k", "gaussian_noise", 3, seed=0)
    assert base != C.corrupt_file(ade / rel, rel, "ade20k", "gaussian_noise", 3, seed=1)
    assert base != C.corrupt_file(ade / rel, rel, "other", "gaussian_noise", 3, seed=0)


def test_rerun_skips_and_repairs(ade: Path, tmp_path: Path, ade_c: tuple[Path, list[C.CorruptReport]]) -> None:
    ref, _ = ade_c
    out = tmp_path / "ade-c"
    _generate(ade, out, processes=1)
    stamp = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    again = _generate(ade, out, processes=2)
    assert _sum(again, "generated") == 0 and _sum(again, "skipped") == 30 and len({r.manifest for r in again}) == 10
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == stamp  # nothing rewritten

    folder = out / "impulse_noise" / "3" / "images" / "validation"
    victims = sorted(folder.glob("*.png"))
    victims[0].unlink()  # missing
    victims[1].write_bytes(victims[1].read_bytes()[:-20])  # truncated (e.g. a non-atomic copy)
    repaired = _generate(ade, out, processes=2)
    assert [r.generated for r in repaired] == [2 if r.manifest.parts[-3:-1] == ("impulse_noise", "3") else 0
                                               for r in repaired]
    assert _sum(repaired, "generated") == 2
    assert _tree(out) == _tree(ref)

    reseeded = C.generate("ade20k", ade, out, "ade20k", "gaussian_noise", 1, seed=7, processes=1, progress=False)
    assert reseeded.generated == 3  # stale provenance: regenerated, not reused


def test_max_images_subset(ade: Path, tmp_path: Path) -> None:
    out = tmp_path / "sub"
    report = C.generate("ade20k", ade, out, "ade20k", "contrast", 2, max_images=2, processes=1, progress=False)
    man = json.loads((out / "contrast" / "2" / "manifest.json").read_text())
    assert report.generated == 2 and man["num_images"] == 2 and man["max_images"] == 2
    chosen = C.select_images(C.list_val_images("ade20k", ade), 2, 0, "ade20k")
    assert [e["source"] for e in man["images"]] == chosen


def test_cityscapes_layout(jit: None, city: Path, tmp_path: Path) -> None:
    out = tmp_path / "city-c"
    reports = _generate(city, out, layout="cityscapes", corruptions=C.ALL_CORRUPTIONS, severities=(5,), processes=2)
    assert _sum(reports, "generated") == 3 * 19 and len({r.manifest for r in reports}) == 19
    files = sorted(p.relative_to(out / "snow" / "5").as_posix() for p in (out / "snow" / "5").rglob("*.png"))
    assert files == [
        "leftImg8bit/val/frankfurt/frankfurt_000001_000019_leftImg8bit.png",
        "leftImg8bit/val/frankfurt/frankfurt_000002_000019_leftImg8bit.png",
        "leftImg8bit/val/lindau/lindau_000007_000019_leftImg8bit.png",
    ]
    assert not any("gtFine" in p.parts for p in out.rglob("*"))


def test_bad_image_names_the_file_and_leaves_no_manifest(ade: Path, tmp_path: Path) -> None:
    root, out = tmp_path / "ade", tmp_path / "out"
    shutil.copytree(ade, root)
    C.generate("ade20k", root, out, "ade20k", "contrast", 1, processes=1, progress=False)
    manifest = out / "contrast" / "1" / "manifest.json"
    assert manifest.is_file()
    bad = root / "images" / "validation" / "ADE_val_00000003.jpg"
    Image.fromarray(np.zeros((20, 40, 3), np.uint8)).save(bad)
    with pytest.raises(ValueError, match=r"ADE_val_00000003\.jpg: 40x20 is too small"):
        C.generate("ade20k", root, out, "ade20k", "contrast", 1, seed=5, processes=1, progress=False)
    assert not manifest.exists()  # the folder was being rewritten: no manifest vouches for it


# ----------------------------------------------------------------------------- CLI


@pytest.mark.parametrize(("corruption", "processes"), [("impulse_noise", "1"), ("glass_blur", "2")])
def test_cli_one_folder(ade: Path, tmp_path: Path, ade_c: tuple[Path, list[C.CorruptReport]],
                        corruption: str, processes: str) -> None:
    """The workflow's command (rule corrupt; --processes is the job's threads, 8 under SLURM)."""
    ref, _ = ade_c
    out = tmp_path / "cli"
    rc = cli_main(["corrupt", "--layout", "ade20k", "--root", str(ade), "--out", str(out), "--dataset-name", "ade20k",
                   "--corruption", corruption, "--severity", "3", "--seed", "0", "--processes", processes,
                   "--no-progress"])
    assert rc == 0
    assert _tree(out) == {k: v for k, v in _tree(ref).items() if k.startswith(f"{corruption}/3/")}


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["corrupt", "--layout", "ade20k", "--root", str(tmp_path), "--out", str(tmp_path / "o"),
            "--dataset-name", "x"]
    rc = cli_main(["corrupt", "--layout", "ade20k", "--root", str(tmp_path / "nope"), "--out", str(tmp_path / "o"),
                   "--dataset-name", "x", "--corruption", "fog", "--severity", "3", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "nope" in err and "segcompress data" in err
    for args, bad in ((["--corruption", "fogg", "--severity", "3"], "'fogg'"),
                      (["--corruption", "fog", "--severity", "7"], "severity: 7"),
                      (["--corruption", "fog", "--severity", "3", "--processes", "0"], "--processes: 0")):
        rc = cli_main([*base, *args, "--no-progress"])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and "\n" not in err and bad in err, err
    # one folder per run: both are required
    with pytest.raises(SystemExit) as exit_:
        cli_main([*base, "--corruption", "fog"])
    assert exit_.value.code == 2 and "--severity" in capsys.readouterr().err


def test_png_provenance_reader(tmp_path: Path) -> None:
    data = C.encode_png(np.zeros((40, 40, 3), np.uint8), "hello")
    path = tmp_path / "a.png"
    path.write_bytes(data)
    assert C.png_provenance(path) == "hello"
    path.write_bytes(data[:-1])
    assert C.png_provenance(path) is None
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(path)
    assert C.png_provenance(path) is None
    assert C.png_provenance(tmp_path / "missing.png") is None
    assert os.path.exists(path)


def test_frost_draws_among_the_original_five_textures(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fork's frost picks among 6 textures, the original among 5: the re-derived seeds keep
    every frost image on frost1-frost5, and images whose first key would pick frost6 exist."""
    import imagecorruptions.corruptions as ic

    used: list[str] = []
    imread = ic.cv2.imread
    monkeypatch.setattr(ic.cv2, "imread", lambda path, *a: used.append(Path(path).stem) or imread(path, *a))
    img = _texture(np.random.default_rng(0), 64, 64)
    names = [f"img{i}.jpg" for i in range(40)]
    first_keys = [C.ImageSeed(C._digest("image", "ds", n, "frost", 3, 0)) for n in names]
    would_pick_sixth = sum(np.random.RandomState(k.numpy_key).randint(6) == 5 for k in first_keys)
    for name, first in zip(names, first_keys):
        seed = C.ImageSeed.derive("ds", name, "frost", 3, 0)
        assert (seed == first) == (np.random.RandomState(first.numpy_key).randint(6) < 5)
        C.corrupt_array(img, "frost", 3, seed)
    assert would_pick_sixth > 0
    assert set(used) == {f"frost{i}" for i in range(1, 6)}
    assert C.ImageSeed.derive("ds", "a.jpg", "fog", 3, 0) == C.ImageSeed(C._digest("image", "ds", "a.jpg", "fog", 3, 0))
