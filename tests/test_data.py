"""Synthetic scenes, layout checks, readers (label mappings, img_root) and the `data` verb."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from segcompress.cli import main as cli_main
from segcompress.data import cityscapes as cs
from segcompress.data.datasets import (
    build_dataset, check_layout, check_sample, collate_train, corrupted_image_path, list_samples,
)
from segcompress.data.synthetic import ADE, CS, generate

torch.set_num_threads(1)
SCALE = {"ade20k": (256, 64), "cityscapes": (256, 128)}


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def ade(synthetic_dataset) -> Path:
    """ADE20K by ``segcompress data --synthetic``: 3 train, 3 val images, seed 0 (the session's; read only)."""
    return synthetic_dataset("ade20k", 3, 3, manifest=True)


@pytest.fixture(scope="module")
def city(synthetic_dataset) -> Path:
    """Cityscapes by ``segcompress data --synthetic``: 3 train, 4 val images, seed 0 (the session's; read only)."""
    return synthetic_dataset("cityscapes", 3, 4, manifest=True)


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


# -- synthetic scenes ----------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["ade20k", "cityscapes"])
def test_same_seed_same_bytes(layout: str, tmp_path: Path) -> None:
    generate(layout, tmp_path / "a", 3, 2, seed=7, progress=False)
    generate(layout, tmp_path / "b", 3, 2, seed=7, progress=False)
    generate(layout, tmp_path / "c", 3, 2, seed=8, progress=False)
    generate(layout, tmp_path / "d", 5, 2, seed=7, progress=False)
    a, b, c, d = (_files(tmp_path / x) for x in "abcd")
    assert a == b
    assert a.keys() == c.keys() and all(a[k] != c[k] for k in a if "leftImg8bit" in k or "images/" in k)
    assert all(d[k] == v for k, v in a.items())  # more training images leave the others unchanged


def test_synthetic_layout_names_and_sizes(ade: Path, city: Path) -> None:
    assert (ade / "images/training/ADE_train_00000001.jpg").is_file()
    assert (ade / "annotations/validation/ADE_val_00000003.png").is_file()
    sizes = {Image.open(p).size for p in (ade / "images").rglob("*.jpg")}
    assert len(sizes) > 1 and all(128 <= s <= 224 for wh in sizes for s in wh)
    stem = city / "gtFine/val/frankfurt/frankfurt_000000_000019"
    assert (city / "leftImg8bit/val/frankfurt/frankfurt_000000_000019_leftImg8bit.png").is_file()
    assert Image.open(f"{stem}_gtFine_labelIds.png").size == (256, 128)
    assert (city / "leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png").is_file()


def test_scenes_have_void_small_and_thin_things(ade: Path, city: Path) -> None:
    ids = np.concatenate([np.asarray(Image.open(p)).ravel() for p in (city / "gtFine").rglob("*_labelIds.png")])
    present = set(np.unique(ids).tolist())
    assert {CS["road"], CS["sky"], CS["ego vehicle"], CS["rectification border"]} <= present
    assert CS["pole"] in present or CS["polegroup"] in present
    raw = np.concatenate([np.asarray(Image.open(p)).ravel() for p in (ade / "annotations").rglob("*.png")])
    assert 0 in raw and raw.max() <= 150 and len(np.unique(raw)) > 10


def test_every_class_has_its_own_colour() -> None:
    from segcompress.data.synthetic import _WRITERS, appearance_table

    def min_gap(colors: np.ndarray) -> float:
        return float((np.linalg.norm(colors[:, None] - colors[None], axis=-1) + np.eye(len(colors)) * 1e9).min())

    for layout, (_, classes, ignored) in _WRITERS.items():
        table = appearance_table(classes, layout, ignored)
        assert sorted(table) == sorted(classes)
        evaluated = np.array([app.color for cid, app in table.items() if cid not in ignored])
        # evaluated classes: further apart than any texture or per-image jitter moves a class
        assert min_gap(evaluated) >= 86
        assert min_gap(np.array([app.color for app in table.values()])) >= 50  # every id still its own
        assert table == appearance_table(classes, layout, ignored)


def test_thin_structures_are_narrower_than_a_patch(city: Path) -> None:
    runs = []
    for p in (city / "gtFine").rglob("*_labelIds.png"):
        pole = np.isin(np.asarray(Image.open(p)), [CS["pole"], CS["polegroup"]])
        for row in pole:  # horizontal runs of pole pixels
            edges = np.flatnonzero(np.diff(np.r_[0, row.astype(np.int8), 0]))
            runs += (edges[1::2] - edges[::2]).tolist()
    assert 3 <= np.median(runs) <= 6  # thinner than one 8-pixel patch, yet wider than a pixel or two


def test_ade_class_ids_match_mmseg() -> None:
    from mmseg.datasets import ADE20KDataset

    names = [c.strip() for c in ADE20KDataset.METAINFO["classes"]]
    for name, cid in ADE.items():
        assert names[cid - 1] == name


# -- readers -------------------------------------------------------------------------------------

def test_ade_reader_reduces_zero_label(ade: Path) -> None:
    ds = build_dataset("ade20k", ade, "val", "test", 64, SCALE["ade20k"])
    assert len(ds) == 3 and ds.names == ["ADE_val_00000001", "ADE_val_00000002", "ADE_val_00000003"]
    item = ds[0]
    raw = np.asarray(Image.open(ade / "annotations/validation/ADE_val_00000001.png")).astype(np.int64)
    expected = np.where(raw == 0, 255, raw - 1)
    assert item["label"].dtype == torch.int64 and np.array_equal(item["label"].numpy(), expected)
    assert item["image"].dtype == torch.float32 and item["image"].shape[0] == 3
    assert min(item["image"].shape[1:]) == 64  # keep-ratio resize to (256, 64)


def test_cityscapes_reader_maps_label_ids_to_train_ids(city: Path) -> None:
    lut = cs.label_id_lut()
    assert (lut[7], lut[26], lut[33], lut[9], lut[1], lut[0]) == (0, 13, 18, 255, 255, 255)
    ds = build_dataset("cityscapes", city, "val", "test", 64, SCALE["cityscapes"])
    assert ds.names[0] == "frankfurt/frankfurt_000000_000019"
    item = ds[0]
    ids = np.asarray(Image.open(city / "gtFine/val/frankfurt/frankfurt_000000_000019_gtFine_labelIds.png"))
    assert np.array_equal(item["label"].numpy(), lut[ids].astype(np.int64))
    assert set(np.unique(item["label"].numpy())) - {255} <= set(range(19))
    # image read at its own size: the normalised RGB image is the file's pixels (mmseg loads BGR)
    rgb = np.asarray(Image.open(city / "leftImg8bit/val/frankfurt/frankfurt_000000_000019_leftImg8bit.png"))
    back = (item["image"] * 127.5 + 127.5).round().permute(1, 2, 0).numpy().astype(np.uint8)
    assert np.array_equal(back, rgb)


def test_train_items_are_padded_crops(ade: Path) -> None:
    np.random.seed(0)
    ds = build_dataset("ade20k", ade, "train", "train", 96, (128, 32))  # resized images smaller than the crop
    images, labels = collate_train([ds[i] for i in range(3)])
    assert images.shape == (3, 3, 96, 96) and images.dtype == torch.float32
    assert labels.shape == (3, 96, 96) and labels.dtype == torch.int64
    assert (labels[:, -1, -1] == 255).all() and (images[:, :, -1, -1] == 0).all()
    assert images.abs().max() <= 1.0
    assert set(torch.unique(labels).tolist()) - {255} <= set(range(150))


def test_train_mode_cityscapes_and_max_images(city: Path) -> None:
    np.random.seed(1)
    ds = build_dataset("cityscapes", city, "train", "train", [64, 96], SCALE["cityscapes"], max_images=2)
    assert len(ds) == 2
    image, label = ds[0]
    assert image.shape == (3, 64, 96) and label.shape == (64, 96)


def test_img_root_reads_corrupted_images_and_clean_labels(city: Path, tmp_path: Path) -> None:
    img_root = tmp_path / "fog" / "3"
    for s in list_samples("cityscapes", city, "val"):
        out = corrupted_image_path(img_root, s.image.relative_to(city))
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(255 - np.asarray(Image.open(s.image))).save(out)
    clean = build_dataset("cityscapes", city, "val", "test", 64, SCALE["cityscapes"])[1]
    bad = build_dataset("cityscapes", city, "val", "test", 64, SCALE["cityscapes"], img_root=img_root)[1]
    assert torch.allclose(bad["image"], -clean["image"]) and torch.equal(bad["label"], clean["label"])
    assert bad["name"] == clean["name"]
    missing = next(img_root.rglob("*.png"))
    missing.unlink()
    with pytest.raises(FileNotFoundError, match=str(missing)):
        build_dataset("cityscapes", city, "val", "test", 64, SCALE["cityscapes"], img_root=img_root)


def test_ade_img_root_uses_png_suffix(ade: Path, tmp_path: Path) -> None:
    s = list_samples("ade20k", ade, "val")[0]
    out = corrupted_image_path(tmp_path, s.image.relative_to(ade))
    assert out == tmp_path / "images/validation/ADE_val_00000001.png"


# -- errors name the file ------------------------------------------------------------------------

def test_missing_root_and_folders_name_the_path(ade: Path, city: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'nope'}.*ADEChallengeData2016 layout"):
        build_dataset("ade20k", tmp_path / "nope", "val", "test", 64, (256, 64))
    with pytest.raises(FileNotFoundError, match=r"did you mean --root .*ADEChallengeData2016"):
        list_samples("ade20k", ade.parent, "val")
    root = _copy(city, tmp_path)
    shutil.rmtree(root / "gtFine/val")
    with pytest.raises(FileNotFoundError, match=f"{root / 'gtFine/val'}.*Cityscapes layout"):
        check_layout("cityscapes", root)


def test_missing_train_ids_asks_for_prepare_and_prepare_restores_them(city: Path, tmp_path: Path) -> None:
    root = _copy(city, tmp_path)
    before = {p: p.read_bytes() for p in root.rglob(f"*{cs.TRAIN_IDS_SUFFIX}")}
    for p in before:
        p.unlink()
    with pytest.raises(FileNotFoundError, match=r"labelTrainIds\.png: missing; run .*--prepare"):
        list_samples("cityscapes", root, "val")
    assert cs.prepare_cityscapes(root, progress=False) == len(before)
    assert all(p.read_bytes() == b for p, b in before.items())
    assert cs.prepare_cityscapes(root, progress=False) == 0  # only where missing


def test_corrupt_image_is_named(ade: Path, tmp_path: Path) -> None:
    root = _copy(ade, tmp_path)
    bad = root / "images/validation/ADE_val_00000002.jpg"
    bad.write_bytes(b"not a jpeg at all")
    ds = build_dataset("ade20k", root, "val", "test", 64, (256, 64))
    ds[0]
    with pytest.raises(ValueError, match=f"{bad}: cannot read image"):
        ds[1]
    with pytest.raises(ValueError, match=f"{bad}: corrupt or unreadable image"):
        check_sample("ade20k", root, list_samples("ade20k", root, "val")[1])


def test_label_out_of_range_is_named(ade: Path, city: Path, tmp_path: Path) -> None:
    root = _copy(ade, tmp_path)
    path = root / "annotations/validation/ADE_val_00000001.png"
    label = np.asarray(Image.open(path)).copy()
    label[0, 0] = 200
    Image.fromarray(label).save(path)
    with pytest.raises(ValueError, match=f"{path}: label value 200 .*outside the class range"):
        build_dataset("ade20k", root, "val", "test", 64, (256, 64))[0]
    with pytest.raises(ValueError, match=rf"{path}: label value\(s\) \[200\] outside"):
        check_sample("ade20k", root, list_samples("ade20k", root, "val")[0])
    croot = _copy(city, tmp_path)
    ids = next((croot / "gtFine/val").rglob("*_labelIds.png"))
    arr = np.asarray(Image.open(ids)).copy()
    arr[0, 0] = 77
    Image.fromarray(arr).save(ids)
    sample = next(s for s in list_samples("cityscapes", croot, "val") if s.source_label == ids)
    with pytest.raises(ValueError, match=f"{ids}: contains value.*77.*not Cityscapes labelIds"):
        check_sample("cityscapes", croot, sample)


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["data", "--layout", "cityscapes", "--root", str(tmp_path / "none"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(tmp_path / "none") in err and "leftImg8bit" in err


# -- the data verb ---------------------------------------------------------------------------------

def test_manifest(ade: Path, city: Path) -> None:
    m = json.loads((ade / "manifest.json").read_text())
    assert m["layout"] == "ade20k" and m["counts"] == {"train": 3, "val": 3}
    assert m["split_folders"] == {"train": "training", "val": "validation"}
    assert {f["path"] for f in m["files"]} == {
        p.relative_to(ade).as_posix() for p in ade.rglob("*") if p.suffix in (".jpg", ".png")
    }
    assert all(f["bytes"] == (ade / f["path"]).stat().st_size for f in m["files"])
    assert m["digest"].startswith("sha256:") and m["synthetic"] == {"seed": 0, "num_train": 3, "num_val": 3}
    c = json.loads((city / "manifest.json").read_text())
    assert c["counts"] == {"train": 3, "val": 4} and len(c["files"]) == 3 * 7


def test_regenerate_is_identical_and_verify_real_matches(city: Path, tmp_path: Path) -> None:
    root = _copy(city, tmp_path)
    digest = json.loads((root / "manifest.json").read_text())["digest"]
    (root / "gtFine/train/aachen/stale_000000_000019_gtFine_labelIds.png").write_bytes(b"x")
    args = ["data", "--layout", "cityscapes", "--root", str(root), "--no-progress"]
    assert cli_main(args + ["--synthetic", "--num-train", "3", "--num-val", "4"]) == 0  # clears old files
    assert json.loads((root / "manifest.json").read_text())["digest"] == digest
    assert cli_main(args) == 0  # verify as a real dataset: same files, same digest
    m = json.loads((root / "manifest.json").read_text())
    assert m["digest"] == digest and m["synthetic"] is None


def test_crash_leaves_no_manifest(city: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import segcompress.data.synthetic as synthetic

    root = _copy(city, tmp_path)

    def boom(*args, **kwargs):
        raise ValueError("disk full")

    monkeypatch.setattr(synthetic, "generate", boom)
    assert cli_main(["data", "--layout", "cityscapes", "--root", str(root), "--synthetic", "--no-progress"]) == 2
    assert not (root / "manifest.json").exists()


def test_synthetic_refuses_to_overwrite_real_data(city: Path, tmp_path: Path) -> None:
    root = _copy(city, tmp_path)
    (root / ".segcompress-synthetic").unlink()
    with pytest.raises(ValueError, match="did not generate"):
        cli_main(["data", "-v", "--layout", "cityscapes", "--root", str(root), "--synthetic", "--no-progress"])
    assert (root / "leftImg8bit").is_dir()


def test_photometric_distortion_can_be_left_out() -> None:
    from segcompress.data.datasets import build_pipeline

    def names(**kw) -> list[str]:
        return [type(t).__name__ for t in build_pipeline("train", 32, (64, 32), **kw)]

    assert "PhotoMetricDistortion" in names()  # Segmenter's recipe by default
    without = names(photometric=False)
    assert "PhotoMetricDistortion" not in without and without == [n for n in names() if n != "PhotoMetricDistortion"]
