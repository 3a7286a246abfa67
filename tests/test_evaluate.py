"""Sliding-window inference, the mIoU metric against an independent implementation, per-image
areas, per-condition cost of input-dependent methods, provenance, the verb."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from segcompress.cli import main as cli_main
from segcompress.data.datasets import build_dataset
from segcompress.evaluate import (
    SegMetric, areas_from_per_image, evaluate, miou_of, predict, slide_inference, sliding_windows, window_starts,
)
from segcompress.models.checkpoint import save_model
from segcompress.provenance import settings_hash
from tiny_segmenter import SEGMENTER_DROPOUT, tiny_model, tiny_spec

torch.set_num_threads(1)


ADE_SPEC = tiny_spec(64, num_classes=150, **SEGMENTER_DROPOUT)  # 8 px patches, width 32, 2 blocks
CITY_SPEC = tiny_spec(64, num_classes=19, **SEGMENTER_DROPOUT)


class PixelModel(nn.Module):
    """A per-pixel (1x1 conv) model: its sliding-window output must equal one pass on the image."""

    def __init__(self, k: int = 5) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(3, k, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def confusion_metrics(preds: list[np.ndarray], labels: list[np.ndarray], k: int, ignore: int = 255) -> dict:
    """Independent reference: one confusion matrix over the dataset."""
    cm = np.zeros((k, k), np.int64)
    for p, l in zip(preds, labels):
        m = l != ignore
        cm += np.bincount(l[m] * k + p[m], minlength=k * k).reshape(k, k)
    tp = np.diag(cm).astype(float)
    gt, pr = cm.sum(1), cm.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = tp / (gt + pr - tp)
        acc = tp / gt
    return {"miou": np.nanmean(iou), "aacc": tp.sum() / cm.sum(), "macc": np.nanmean(acc), "iou": iou}


def test_window_starts() -> None:
    assert window_starts(10, 4, 3) == [0, 3, 6]
    assert window_starts(10, 4, 4) == [0, 4, 6]
    assert window_starts(64, 64, 32) == [0]
    with pytest.raises(ValueError, match="stride"):
        window_starts(10, 4, 5)


def test_slide_equals_plain_forward_when_image_is_the_crop() -> None:
    model = tiny_model(ADE_SPEC)
    img = torch.randn(3, 64, 64)
    with torch.inference_mode():
        ref = model(img[None])[0]
    assert torch.allclose(slide_inference(model, img, 64, 48), ref, atol=1e-5)
    assert torch.equal(predict(model, img, (64, 64), 64, 48), ref.argmax(0))


def test_prediction_takes_the_first_class_of_tied_logits() -> None:
    """Logits with few levels tie across many classes at every pixel; the prediction is the
    first maximal class, as argmax gives it (one window, resized to its own size: exact)."""
    model = tiny_model(ADE_SPEC)
    img = torch.randn(3, 64, 64)
    quantised = lambda x: model(x).mul(0.5).floor()  # noqa: E731
    with torch.inference_mode():
        ref = quantised(img[None])[0]
        pred = predict(quantised, img, (64, 64), 64, 48)
    ties = (ref == ref.amax(0)).sum(0)
    assert (ties > 1).float().mean() > 0.5
    assert torch.equal(pred, ref.argmax(0))
    # both paths of first_max_class: NumPy's on the class-last layout, torch's max on any other
    from segcompress.evaluate import first_max_class

    class_last = ref.permute(1, 2, 0).contiguous().permute(2, 0, 1)
    class_first = ref.contiguous()
    assert not class_first.permute(1, 2, 0).is_contiguous()  # torch's path, with the same ties
    assert torch.equal(first_max_class(class_last), ref.argmax(0))
    assert torch.equal(first_max_class(class_first), ref.argmax(0))
    assert first_max_class(class_last).dtype == torch.int64
    nan = class_last.clone()
    nan[3, 5, 7] = float("nan")
    assert first_max_class(nan)[5, 7] == 3 == first_max_class(nan.contiguous())[5, 7]
    threads = torch.get_num_threads()
    try:  # above NUMPY_ARGMAX_MAX_THREADS threads, torch's parallel max, the same classes
        torch.set_num_threads(3)
        assert torch.equal(first_max_class(class_last), ref.argmax(0))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("size", [(64, 150), (100, 70), (40, 50)])  # wide, overlapping both ways, smaller than crop
def test_slide_of_a_per_pixel_model_is_one_pass(size: tuple[int, int]) -> None:
    model = PixelModel()
    img = torch.randn(3, *size)
    with torch.inference_mode():
        ref = model(img[None])[0]
    out = slide_inference(model, img, 64, 24, batch_size=3)
    assert out.shape == ref.shape and torch.allclose(out, ref, atol=1e-5)


def test_slide_averages_overlaps_and_batching_does_not_matter() -> None:
    model = tiny_model(ADE_SPEC, 3)
    img = torch.randn(3, 64, 112)
    with torch.inference_mode():
        left, right = model(img[None, :, :, :64])[0], model(img[None, :, :, 48:])[0]
    out = slide_inference(model, img, 64, 48, batch_size=1)
    assert torch.allclose(out[:, :, :48], left[:, :, :48], atol=1e-5)
    assert torch.allclose(out[:, :, 48:64], (left[:, :, 48:] + right[:, :, :16]) / 2, atol=1e-5)
    assert torch.allclose(out[:, :, 64:], right[:, :, 16:], atol=1e-5)
    assert torch.allclose(slide_inference(model, img, 64, 16, batch_size=1),
                          slide_inference(model, img, 64, 16, batch_size=8), atol=1e-5)


def test_metric_equals_confusion_matrix() -> None:
    rng = np.random.default_rng(0)
    k = 7
    preds, labels = [], []
    metric = SegMetric(k)
    for h, w in [(20, 30), (17, 9), (40, 40)]:
        label = rng.integers(0, k - 1, size=(h, w))  # class k-1 never in the ground truth
        label[rng.random((h, w)) < 0.2] = 255
        pred = np.where(rng.random((h, w)) < 0.6, np.where(label == 255, 0, label), rng.integers(0, k - 2, (h, w)))
        preds.append(pred)
        labels.append(label)
        metric.update(torch.from_numpy(pred), torch.from_numpy(label))
    got, ref = metric.compute(), confusion_metrics(preds, labels, k)
    # per image: sparse (no class without union), ints, and summing to the dataset's areas
    assert len(metric.per_image) == 3
    assert all(k - 1 not in e["classes"] and all(isinstance(v, int) for v in e["intersect"] + e["label"])
               for e in metric.per_image)
    areas = areas_from_per_image(metric.per_image, k)
    assert areas.shape == (3, 4, k) and areas.dtype == np.int64
    assert np.array_equal(areas.sum(0), metric.areas.numpy())
    assert miou_of(areas) == pytest.approx(got["miou"], rel=1e-12)
    assert got["miou"] == pytest.approx(ref["miou"], abs=1e-12)
    assert got["aacc"] == pytest.approx(ref["aacc"], abs=1e-12)
    assert got["macc"] == pytest.approx(ref["macc"], abs=1e-12)
    assert got["iou"][k - 1] is None and np.isnan(ref["iou"][k - 1])  # absent everywhere: not counted
    assert np.allclose([v for v in got["iou"] if v is not None], ref["iou"][~np.isnan(ref["iou"])])


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8])
def test_areas_equal_mmsegs_intersect_and_union(dtype: torch.dtype) -> None:
    """The confusion-matrix areas are mmseg's histograms', also for labels and predictions outside
    the classes (counted in no class) and the ignore label."""
    from mmseg.evaluation import IoUMetric

    from segcompress.evaluate import intersect_and_union

    g = torch.Generator().manual_seed(0)
    k = 9
    for h, w in [(37, 51), (1, 1), (64, 3)]:
        label = torch.randint(0, k + 3, (h, w), generator=g)  # k, k+1, k+2: outside the classes
        label[torch.rand((h, w), generator=g) < 0.15] = 255
        other = torch.randint(0, k + 2, (h, w), generator=g)
        pred = torch.where(torch.rand((h, w), generator=g) < 0.5, label % k, other)
        if dtype == torch.int64:
            label[0, 0], pred[-1, -1] = -1, -1  # negative: outside too
        ref = torch.stack([a.to(torch.float64) for a in IoUMetric.intersect_and_union(pred.to(dtype), label.to(dtype),
                                                                                      k, 255)])
        got = intersect_and_union(pred.to(dtype), label.to(dtype), k, 255)
        assert got.dtype == torch.float64 and torch.equal(got, ref)
    assert intersect_and_union(torch.zeros(2, 2, dtype=torch.int64), torch.full((2, 2), 255), k, 255).sum() == 0


def test_window_tiles_count_the_windows_over_each_segment() -> None:
    from segcompress.evaluate import window_tiles

    assert window_tiles([0, 26], 128) == [(0, 26, 1), (26, 128, 2), (128, 154, 1)]
    assert window_tiles([0, 3, 6], 4) == [(0, 3, 1), (3, 4, 2), (4, 6, 1), (6, 7, 2), (7, 10, 1)]
    assert window_tiles([0, 2, 4], 8) == [(0, 2, 1), (2, 4, 2), (4, 8, 3), (8, 10, 2), (10, 12, 1)]
    assert window_tiles([0], 64) == [(0, 64, 1)]


@pytest.mark.parametrize("size, crop, stride, deepest", [
    ((100, 147), 64, 16, 20), ((100, 147), 64, 24, 12), ((100, 147), 64, 48, 4),  # up to 4 × 5 windows deep
    ((100, 147), 64, 64, 4),  # stride = crop: overlaps only where the last windows align to the border
    ((50, 40), 64, 32, 1),  # smaller than the crop: padded, one window
    ((100, 147), (64, 48), (40, 16), 8),  # rectangular crop and stride
])
def test_slide_equals_zeroed_sums_divided_by_counts(size, crop, stride, deepest) -> None:
    """Tile by tile, the averaged logits equal the plain accumulation (zeroed sums, every window
    added in order, divided by a count map) exactly, not just to a tolerance; a batch of 5 splits
    tiles' windows across forward passes."""
    torch.manual_seed(3)
    model = PixelModel(150)
    wrapped = lambda x: model(x) + x.mean(dim=(1, 2, 3), keepdim=True)  # noqa: E731  (each window its own logits)
    img = torch.randn(3, *size)
    ch, cw = (crop, crop) if isinstance(crop, int) else crop
    with torch.inference_mode():
        padded, boxes = sliding_windows(img, crop, stride)
        sums, count = torch.zeros(150, *padded.shape[-2:]), torch.zeros(1, *padded.shape[-2:])
        crops = [padded[:, :, y:y + ch, x:x + cw] for y, x in boxes]
        outs = torch.cat([wrapped(torch.cat(crops[i:i + 5])) for i in range(0, len(crops), 5)])  # batched alike
        for (y, x), o in zip(boxes, outs):
            sums[:, y:y + ch, x:x + cw] += o
            count[:, y:y + ch, x:x + cw] += 1
        assert count.max() == deepest
        ref = (sums / count)[:, :size[0], :size[1]]
        assert torch.equal(slide_inference(wrapped, img, crop, stride, batch_size=5), ref)


def test_metric_counts_a_predicted_but_absent_class_as_zero() -> None:
    metric = SegMetric(3)
    metric.update(torch.tensor([[0, 2], [1, 1]]), torch.tensor([[0, 1], [1, 255]]))
    got = metric.compute()
    assert got["iou"] == [1.0, 0.5, 0.0] and got["miou"] == pytest.approx(0.5)


def test_areas_from_per_image_and_miou_of_by_hand() -> None:
    per_image = [
        {"name": "a", "classes": [0, 2], "intersect": [3, 1], "union": [4, 2], "label": [4, 1], "pred": [3, 2]},
        {"name": "b", "classes": [2], "intersect": [1], "union": [2], "label": [2], "pred": [1]},
        {"name": "c", "classes": [], "intersect": [], "union": [], "label": [], "pred": []},
    ]
    areas = areas_from_per_image(per_image, 3)
    assert areas[0].tolist() == [[3, 0, 1], [4, 0, 2], [3, 0, 2], [4, 0, 1]]  # intersect, union, pred, label
    assert not areas[2].any()
    # summed: class 0 IoU 3/4, class 2 IoU 2/4, class 1 absent (not counted)
    assert miou_of(areas) == pytest.approx((3 / 4 + 2 / 4) / 2)
    assert miou_of(areas[1]) == pytest.approx(0.5)  # one image, (4, classes)
    assert np.isnan(miou_of(areas[2]))
    with pytest.raises(ValueError, match="class index outside 0..1"):
        areas_from_per_image(per_image, 2)
    with pytest.raises(ValueError, match="differ in length"):
        areas_from_per_image([{**per_image[1], "pred": [1, 2]}], 3)
    with pytest.raises(ValueError, match=r"\(\.\.\., 4, classes\)"):
        miou_of(np.zeros((3, 5)))


@pytest.fixture(scope="module")
def city(synthetic_cityscapes: Path) -> Path:
    """The session's synthetic Cityscapes (read only); these tests read its 3 val images."""
    return synthetic_cityscapes


def test_evaluate_on_dataset_matches_independent_metric(city: Path) -> None:
    model = tiny_model(CITY_SPEC)
    ds = build_dataset("cityscapes", city, "val", "test", 64, (256, 96))
    result = evaluate(model, ds, 64, 40, num_classes=19, batch_size=4, progress=False)
    preds, labels = [], []
    for i in range(len(ds)):
        item = ds[i]
        preds.append(predict(model, item["image"], item["label"].shape, 64, 40).numpy())
        labels.append(item["label"].numpy())
    ref = confusion_metrics(preds, labels, 19)
    assert result["num_images"] == 3 and result["seconds"] > 0
    assert result["miou"] == pytest.approx(ref["miou"], abs=1e-12)
    assert result["aacc"] == pytest.approx(ref["aacc"], abs=1e-12)
    assert result["macc"] == pytest.approx(ref["macc"], abs=1e-12)
    assert [e["name"] for e in result["per_image"]] == [ds[i]["name"] for i in range(len(ds))]
    assert_per_image_gives_the_metrics(result, 19)


def assert_per_image_gives_the_metrics(row: dict, num_classes: int) -> None:
    """Summed over images, a row's per-image areas give its mIoU, aAcc and mAcc."""
    areas = areas_from_per_image(row["per_image"], num_classes)
    assert areas.shape == (row["num_images"], 4, num_classes)
    intersect, _, _, label = areas.sum(0).astype(float)
    assert miou_of(areas) == pytest.approx(row["miou"], rel=1e-12)
    assert intersect.sum() / label.sum() == pytest.approx(row["aacc"], rel=1e-12)
    assert np.mean(intersect[label > 0] / label[label > 0]) == pytest.approx(row["macc"], rel=1e-12)


def test_evaluate_verb_writes_a_row(city: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "dense.safetensors"
    save_model(tiny_model(CITY_SPEC), ckpt)
    match = tmp_path / "match.json"
    match.write_text(json.dumps({"knob": {}, "target_fraction": 0.5, "achieved_gflops": 0.01, "target_gflops": 0.011}))
    out = tmp_path / "results/raw/cityscapes/vit/dense/clean/0.json"
    args = ["evaluate", "--model", str(ckpt), "--layout", "cityscapes", "--root", str(city), "--img-scale", "256", "96",
            "--stride", "40", "--out", str(out), "--no-progress", "--tag", "seed=0", "--tag", "backbone=vit_tiny_p8",
            "--tag", "severity=0", "--tag", "category=clean", "--match", str(match), "--allocator", "default"]
    assert cli_main(args) == 0
    row = json.loads(out.read_text())
    assert row["dataset"] == "cityscapes" and row["method"] == "dense" and row["knob"] == "{}"
    assert row["corruption"] == "clean" and row["severity"] == 0 and row["seed"] == 0
    assert row["backbone"] == "vit_tiny_p8" and row["target_fraction"] == 0.5 and row["achieved_gflops"] == 0.01
    assert 0 <= row["miou"] <= 1 and 0 <= row["aacc"] <= 1 and row["num_images"] == 3
    assert len(row["per_class_iou"]) == 19 and row["torch"] == torch.__version__ and row["timm"]
    assert row["params_m"] > 0 and row["crop"] == [64, 64] and row["stride"] == 40
    assert_per_image_gives_the_metrics(row, 19)
    # an input-independent method keeps the match file's cost
    assert row["gflops_source"] == "match" and row["calibration_gflops"] == 0.01 and row["gflops_std"] is None
    # same model, same data: same numbers through the Python API
    ref = evaluate(tiny_model(CITY_SPEC), build_dataset("cityscapes", city, "val", "test", 64, (256, 96)), 64, 40, 19,
                   progress=False)
    assert row["miou"] == pytest.approx(ref["miou"], abs=1e-12)


def test_evaluate_verb_runs_several_conditions_in_one_process(city: Path, tmp_path: Path) -> None:
    """--condition: one row per condition, each equal to a separate single-condition run."""
    import shutil

    ckpt = tmp_path / "dense.safetensors"
    save_model(tiny_model(CITY_SPEC), ckpt)
    # a "corrupted" set: the val images, flipped upside down, as .png under the same relative paths
    from PIL import Image

    fog = tmp_path / "city-c/fog/3"
    for src in sorted((city / "leftImg8bit/val").rglob("*.png")):
        dst = fog / src.relative_to(city).with_suffix(".png")
        dst.parent.mkdir(parents=True, exist_ok=True)
        Image.open(src).transpose(Image.Transpose.FLIP_TOP_BOTTOM).save(dst)
    base = ["evaluate", "--model", str(ckpt), "--layout", "cityscapes", "--root", str(city), "--img-scale", "256",
            "96", "--stride", "40", "--no-progress", "--tag", "seed=0", "--allocator", "default"]
    clean, foggy = tmp_path / "multi/clean/0.json", tmp_path / "multi/fog/3.json"
    assert cli_main(base + ["--condition", "clean", "0", "-", str(clean), "--condition", "fog", "3", str(fog),
                            str(foggy)]) == 0
    single = tmp_path / "single.json"
    assert cli_main(base + ["--img-root", str(fog), "--out", str(single)]) == 0
    multi_fog, single_fog = json.loads(foggy.read_text()), json.loads(single.read_text())
    assert multi_fog["miou"] == single_fog["miou"] and multi_fog["img_root"] == str(fog)
    assert (multi_fog["corruption"], multi_fog["category"], multi_fog["severity"]) == ("fog", "weather", 3)
    clean_row = json.loads(clean.read_text())
    assert (clean_row["corruption"], clean_row["category"], clean_row["severity"]) == ("clean", "clean", 0)
    assert clean_row["miou"] != multi_fog["miou"]
    with pytest.raises(SystemExit):
        cli_main(base + ["--condition", "fog", "3", str(fog)])  # four values per condition
    assert cli_main(base + ["--condition", "fog", "x", str(fog), str(foggy)]) == 2
    assert cli_main(base + ["--out", str(single), "--condition", "fog", "3", str(fog), str(foggy)]) == 2
    shutil.rmtree(fog.parents[1])


def test_evaluate_rows_carry_provenance(city: Path, tmp_path: Path) -> None:
    """Version, source revision, dirty flag, and a settings hash that follows the settings."""
    import segcompress

    ckpt = tmp_path / "dense.safetensors"
    save_model(tiny_model(CITY_SPEC), ckpt)
    base = ["evaluate", "--model", str(ckpt), "--layout", "cityscapes", "--root", str(city), "--img-scale", "256",
            "96", "--no-progress", "--tag", "seed=0", "--max-images", "1", "--allocator", "default"]
    rows = {}
    for stride in (40, 48):
        a, b = tmp_path / f"{stride}/clean/0.json", tmp_path / f"{stride}/fog/1.json"
        assert cli_main(base + ["--stride", str(stride), "--condition", "clean", "0", "-", str(a),
                                "--condition", "fog", "1", str(city), str(b)]) == 0
        rows[stride] = [json.loads(a.read_text()), json.loads(b.read_text())]
    row = rows[40][0]
    assert row["segcompress_version"] == segcompress.__version__
    revision, dirty = row["source_revision"], row["source_dirty"]
    assert re.fullmatch(r"[0-9a-f]{40}", revision) and dirty in (True, False) or (revision, dirty) == ("unknown", None)
    assert re.fullmatch(r"[0-9a-f]{16}", row["settings_hash"])
    assert rows[40][1]["settings_hash"] == row["settings_hash"]  # every condition of a variant shares it
    assert rows[48][0]["settings_hash"] != row["settings_hash"]  # another stride: other settings


def test_settings_hash_is_canonical() -> None:
    a = settings_hash({"stride": 40, "knob": {"r": 8, "prop_attn": True}})
    assert a == settings_hash({"knob": {"prop_attn": True, "r": 8}, "stride": 40}) and len(a) == 16
    assert a != settings_hash({"stride": 48, "knob": {"r": 8, "prop_attn": True}})


def test_algm_rows_measure_gflops_on_their_own_condition(city: Path, tmp_path: Path) -> None:
    """ALGM's cost depends on the image: each condition's row holds its own mean and std, the
    clean one equal to the matcher's calibration count on the same images."""
    from PIL import Image

    from segcompress.commands._model_options import calibration_images
    from segcompress.tokens.algm import algm_cost

    model = tiny_model(tiny_spec([64, 64], 8, 4, num_classes=19))
    ckpt = tmp_path / "algm.safetensors"
    save_model(model, ckpt)
    knob = {"threshold": 0.5, "layers": [1, 3]}
    match = tmp_path / "match.json"
    match.write_text(json.dumps({"knob": knob, "achieved_gflops": 0.5, "gflops_std": 0.01, "target_fraction": 0.7}))
    noise = tmp_path / "city-c/gaussian_noise/5"  # the val images with strong Gaussian noise, as .png
    rng = np.random.default_rng(0)
    for src in sorted((city / "leftImg8bit/val").rglob("*.png")):
        dst = noise / src.relative_to(city).with_suffix(".png")
        dst.parent.mkdir(parents=True, exist_ok=True)
        img = np.asarray(Image.open(src).convert("RGB"), dtype=float) / 255
        Image.fromarray((np.clip(img + rng.normal(0, 0.38, img.shape), 0, 1) * 255).astype(np.uint8)).save(dst)
    clean, noisy = tmp_path / "clean/0.json", tmp_path / "gaussian_noise/5.json"
    assert cli_main(["evaluate", "--model", str(ckpt), "--method", "algm", "--match", str(match), "--layout",
                     "cityscapes", "--root", str(city), "--img-scale", "256", "96", "--stride", "40", "--no-progress",
                     "--allocator", "default",
                     "--condition", "clean", "0", "-", str(clean), "--condition", "gaussian_noise", "5", str(noise),
                     str(noisy)]) == 0
    clean_row, noisy_row = json.loads(clean.read_text()), json.loads(noisy.read_text())
    for row in clean_row, noisy_row:
        assert row["gflops_source"] == "condition" and row["calibration_gflops"] == 0.5
        assert row["gflops_std"] > 0  # the images differ in cost
    assert noisy_row["achieved_gflops"] != pytest.approx(clean_row["achieved_gflops"], rel=1e-3)
    calib = argparse.Namespace(calib_layout="cityscapes", calib_root=city, calib_split="val", calib_images=3)
    ref = algm_cost(model, list(calibration_images(calib, model.spec)), knob)
    assert (clean_row["achieved_gflops"], clean_row["gflops_std"]) == pytest.approx((ref.mean, ref.std), rel=1e-12)


def test_evaluate_verb_errors(city: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = tmp_path / "ade.safetensors"
    save_model(tiny_model(ADE_SPEC), ckpt)
    base = ["evaluate", "--model", str(ckpt), "--root", str(city), "--img-scale", "256", "96", "--out",
            str(tmp_path / "r.json"), "--no-progress", "--allocator", "default"]
    assert cli_main(base + ["--layout", "cityscapes"]) == 2
    assert "150 classes but cityscapes has 19" in capsys.readouterr().err
    assert cli_main(base + ["--layout", "ade20k", "--crop", "128"]) == 2
    assert "--crop 128" in capsys.readouterr().err
    assert cli_main(base + ["--layout", "ade20k", "--tag", "miou=1"]) == 2
    assert "--tag miou" in capsys.readouterr().err
    assert cli_main(base + ["--layout", "ade20k"]) == 2  # a Cityscapes tree is not an ADE20K one
    err = capsys.readouterr().err
    assert str(city) in err and "ADEChallengeData2016" in err
    assert not (tmp_path / "r.json").exists()
