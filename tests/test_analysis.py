"""The analyse phase: effective rank of restored features, the rank verb, qualitative panels, bench --match."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from segcompress.analysis import NORMALISE, RankSettings, image_rank, image_raw_rank, rank_dataset, window_features
from segcompress.cli import VERBS, main
from segcompress.data.datasets import build_dataset
from segcompress.evaluate import sliding_windows
from segcompress.methods import apply_method
from segcompress.models.checkpoint import save_model
from segcompress.qualitative import boundaries, colorize, palette, zoom_box
from segcompress.rank import effective_rank
from segcompress.tokens import restored_state
from tiny_segmenter import SEGMENTER_DROPOUT, tiny_model, tiny_spec

torch.set_num_threads(1)

SPEC = tiny_spec(64, num_classes=150, **SEGMENTER_DROPOUT)  # 8 px patches, width 32, 2 blocks


@pytest.fixture(scope="module")
def ade(synthetic_ade20k: Path) -> Path:
    """The session's synthetic ADE20K (read only); these tests read its 3 val images."""
    return synthetic_ade20k


def _dataset(root: Path, **kw):
    return build_dataset("ade20k", root, "val", "test", 64, (256, 64), **kw)


# ------------------------------------------------------------------------------ settings


def test_settings_map_the_config_onto_rank_py() -> None:
    assert NORMALISE == {"reference": "reference", "min_tokens_width": "min_dim", "width": "width", "none": "none"}
    assert RankSettings.normalise == "reference"  # the default
    s = RankSettings(feature="last_block", centre=True, normalise="min_tokens_width", windows="mean")
    assert s.rank_normalise == "min_dim" and not s.final_norm
    assert s.as_dict() == {"feature": "last_block", "centre": True, "normalise": "min_tokens_width", "windows": "mean",
                           "reference_width": None}
    for bad in ({"feature": "cls"}, {"normalise": "min_dim"}, {"windows": "max"}):
        with pytest.raises(ValueError, match="effective rank: unknown"):
            RankSettings(**bad, reference_width=32)
    with pytest.raises(ValueError, match="needs reference_width"):
        RankSettings()


def test_image_rank_stack_and_mean() -> None:
    g = torch.Generator().manual_seed(0)
    one = torch.randn(1, 64, 16, generator=g, dtype=torch.float64)
    stack, mean = RankSettings(windows="stack", reference_width=16), RankSettings(windows="mean", reference_width=16)
    assert image_rank(one, stack) == pytest.approx(image_rank(one, mean))  # one window: the same
    two = torch.cat([one, one])  # a repeated window adds no direction
    assert image_rank(two, stack) == pytest.approx(image_rank(one, stack))
    assert image_rank(two, RankSettings(normalise="none")) == pytest.approx(effective_rank(one[0]))
    with pytest.raises(ValueError, match="window features"):
        image_rank(one[0], stack)


def test_default_normalisation_ranks_images_as_their_raw_erank_whatever_the_width() -> None:
    """Window features of known rank: a dense model (E = 64, rank 24) and pruned ones (E = 16, rank 9;
    E = 32, rank 12). The default divides all by min(rows, E_dense) and keeps the raw order; the
    per-model ``min_tokens_width`` puts the (16, 9) model above the dense one."""
    def windows(rank: int, width: int) -> torch.Tensor:  # 2 windows of 64 patches, rank `rank` in all
        g = torch.Generator().manual_seed(width)
        return (torch.randn(2, 64, rank, generator=g, dtype=torch.float64)
                @ torch.randn(rank, width, generator=g, dtype=torch.float64))

    feats = [windows(24, 64), windows(9, 16), windows(12, 32)]
    raw = [image_raw_rank(f, RankSettings(normalise="none")) for f in feats]
    default = RankSettings(reference_width=64)
    normalised = [image_rank(f, default) for f in feats]
    assert raw[0] > raw[2] > raw[1]
    assert normalised[0] > normalised[2] > normalised[1]
    assert normalised == pytest.approx([r / 64 for r in raw])  # 128 stacked rows > 64: the divisor is E_dense
    own = [image_rank(f, RankSettings(normalise="min_tokens_width")) for f in feats]
    assert own[1] > own[0]  # reversed by construction


# ------------------------------------------------------------------------------ features


def test_window_features_cover_every_window(ade: Path) -> None:
    model = tiny_model(SPEC)
    item = _dataset(ade)[0]
    feats = window_features(model, item["image"], 64, 48, batch_size=2)
    _, boxes = sliding_windows(item["image"], 64, 48)
    assert feats.shape == (len(boxes), (64 // 8) ** 2, 32) and len(boxes) > 1
    # the dense model's restored features are its forward_features, window by window
    padded, _ = sliding_windows(item["image"], 64, 48)
    y, x = boxes[-1]
    with torch.inference_mode():
        ref = model.forward_features(padded[:, :, y:y + 64, x:x + 64])[0]
    assert torch.allclose(feats[-1], ref, atol=1e-6)
    before = window_features(model, item["image"], 64, 48, final_norm=False)
    assert not torch.allclose(before, feats)


def test_rank_on_a_tiny_random_model_is_in_unit_interval(ade: Path) -> None:
    result = rank_dataset(tiny_model(SPEC), _dataset(ade), 64, 48, RankSettings(reference_width=32), progress=False)
    assert result["num_images"] == 3 and len(result["erank_per_image"]) == 3
    assert all(0 < v <= 1 for v in result["erank_per_image"])
    # rows > E_ref = 32: the normalised values are the raw ones over 32
    assert result["erank_per_image"] == pytest.approx([r / 32 for r in result["erank_raw_per_image"]])
    assert result["erank_raw_mean"] == pytest.approx(32 * result["erank_mean"])
    assert result["erank_raw_std"] == pytest.approx(float(np.std(result["erank_raw_per_image"])))
    assert 0 < result["erank_mean"] <= 1 and result["erank_std"] >= 0
    assert result["erank_mean"] == pytest.approx(float(np.mean(result["erank_per_image"])))
    assert result["erank_std"] == pytest.approx(float(np.std(result["erank_per_image"])))
    assert result["width"] == 32 and result["rows"] % 64 == 0
    centred = rank_dataset(tiny_model(SPEC), _dataset(ade, max_images=1), 64, 48,
                           RankSettings(centre=True, reference_width=32), progress=False)
    assert 0 < centred["erank_mean"] <= 1 and centred["num_images"] == 1


def test_merged_features_are_capped_by_the_distinct_tokens(ade: Path) -> None:
    """Restored ToMe features repeat each merged token's row: the rank cannot exceed their number."""
    image = _dataset(ade)[0]["image"]
    crop = image[None, :, :64, :64]  # one window
    raw = RankSettings(normalise="none")
    dense = image_rank(window_features(tiny_model(SPEC), crop, 64, 64), raw)
    merged_model = apply_method(tiny_model(SPEC), "tome", {"r": 28})  # 64 patches, 2 blocks: 64 -> 36 -> 18 tokens
    state = restored_state(merged_model, crop)
    distinct = len(torch.unique(state.token_of[0]))
    merged = image_rank(window_features(merged_model, crop, 64, 64), raw)
    assert distinct < 32  # fewer tokens left than the feature width
    assert merged <= distinct + 1e-9
    assert merged < dense  # on this image the dense model has more directions than tokens left
    normalised = image_rank(window_features(merged_model, crop, 64, 64), RankSettings(reference_width=32))
    assert 0 < normalised <= distinct / 32 + 1e-9


# ------------------------------------------------------------------------------ the rank verb


def test_rank_verb_writes_an_evaluate_like_row(ade: Path, tmp_path: Path) -> None:
    assert "rank" in VERBS
    ckpt = tmp_path / "m" / "dense.safetensors"
    save_model(tiny_model(SPEC), ckpt)
    match = tmp_path / "tome-0.5.json"
    match.write_text(json.dumps({"knob": {"r": 8}, "target_fraction": 0.5, "achieved_gflops": 0.01,
                                 "target_gflops": 0.011, "gflops_std": 0.0}))
    out = tmp_path / "results/raw_rank/ade20k/vit/tome-0.5-seed0/clean/0.json"
    args = ["rank", "--model", str(ckpt), "--method", "tome", "--match", str(match), "--layout", "ade20k",
            "--root", str(ade), "--img-scale", "256", "64", "--stride", "48", "--max-images", "2", "--out", str(out),
            "--no-progress", "--tag", "seed=0", "--tag", "backbone=vit", "--tag", "variant=tome-0.5-seed0",
            "--tag", "corruption=clean", "--tag", "severity=0", "--normalise", "width", "--windows", "mean"]
    assert main(args) == 0
    row = json.loads(out.read_text())
    assert row["dataset"] == "ade20k" and row["method"] == "tome" and json.loads(row["knob"]) == {"r": 8}
    assert row["target_fraction"] == 0.5 and row["achieved_gflops"] == 0.01 and row["seed"] == 0
    assert row["corruption"] == "clean" and row["severity"] == 0 and row["backbone"] == "vit"
    assert 0 < row["erank_mean"] <= 1 and row["erank_std"] >= 0 and row["num_images"] == 2
    assert (row["normalise"], row["windows"], row["feature"], row["centre"]) == ("width", "mean", "final_norm", False)
    assert row["stride"] == 48 and row["params_m"] > 0 and len(row["erank_per_image"]) == 2
    assert row["erank_raw_mean"] == pytest.approx(32 * row["erank_mean"]) and row["reference_width"] is None
    # the default normalisation: by the width of --reference-model's spec, the raw values alike
    narrow = tmp_path / "m" / "nvit.safetensors"
    save_model(tiny_model(tiny_spec(64, num_classes=150, embed_dim=16, **SEGMENTER_DROPOUT), 1), narrow)
    assert main(["rank", "--model", str(narrow), "--reference-model", str(ckpt), "--layout", "ade20k", "--root",
                 str(ade), "--img-scale", "256", "64", "--stride", "48", "--max-images", "2", "--out", str(out),
                 "--no-progress"]) == 0
    row = json.loads(out.read_text())
    assert row["normalise"] == "reference" and row["reference_width"] == 32 and row["width"] == 16
    assert row["erank_mean"] == pytest.approx(row["erank_raw_mean"] / 32)


def test_rank_verb_errors(ade: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = tmp_path / "dense.safetensors"
    save_model(tiny_model(SPEC), ckpt)
    base = ["rank", "--model", str(ckpt), "--layout", "ade20k", "--root", str(ade), "--img-scale", "256", "64",
            "--out", str(tmp_path / "r.json"), "--no-progress"]
    for tag in ("erank_mean=1", "erank_raw_mean=1", "reference_width=8"):
        assert main(base + ["--reference-model", str(ckpt), "--tag", tag]) == 2
        assert f"--tag {tag.split('=')[0]}" in capsys.readouterr().err
    assert main(base + ["--layout", "cityscapes", "--normalise", "none"]) == 2
    assert "150 classes but cityscapes has 19" in capsys.readouterr().err
    assert main(base) == 2
    assert "--normalise reference (the default) needs --reference-model" in capsys.readouterr().err
    assert main(base + ["--reference-model", str(tmp_path / "missing.safetensors")]) == 2
    assert "missing.json: model spec not found" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


# ------------------------------------------------------------------------------ qualitative


def test_zoom_box_goes_where_boundaries_are_densest() -> None:
    label = np.zeros((40, 60), np.int64)
    label[25:35, 40:42] = 3  # a thin pole, bottom right
    label[0:5, 0:5] = 255  # ignore
    assert not boundaries(label)[0:4, 0:4].any()  # ignore pixels are not boundaries
    y, x, h, w = zoom_box(label, zoom=0.25)
    assert (h, w) == (10, 10)
    assert y <= 25 < y + h and x <= 40 < 42 <= x + w
    rgb = colorize(label, palette(5))
    assert rgb.shape == (40, 60, 3) and (rgb[0, 0] == 0).all() and (rgb[30, 40] == palette(5)[3]).all()
    with pytest.raises(ValueError, match="zoom"):
        zoom_box(label, 0)


def test_qualitative_verb_draws_a_panel(ade: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "dense.safetensors"
    save_model(tiny_model(SPEC), ckpt)
    match = tmp_path / "tome.json"
    match.write_text(json.dumps({"knob": {"r": 20}, "achieved_gflops": 0.012}))
    out = tmp_path / "q.png"
    assert main(["qualitative", "--variant", "dense", str(ckpt), "dense", "-", "--variant", "tome 0.35", str(ckpt),
                 "tome", str(match), "--layout", "ade20k", "--root", str(ade), "--img-scale", "256", "64",
                 "--images", "1", "--out", str(out), "--pdf", str(tmp_path / "q.pdf")]) == 0
    assert out.read_bytes().startswith(b"\x89PNG") and out.stat().st_size > 5000
    assert (tmp_path / "q.pdf").read_bytes().startswith(b"%PDF")


# ------------------------------------------------------------------------------ bench --match


def test_bench_takes_the_knob_of_a_match_file_and_tags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = tmp_path / "dense.safetensors"
    save_model(tiny_model(SPEC), ckpt)
    match = tmp_path / "tome-0.5.json"
    match.write_text(json.dumps({"knob": {"r": 8}, "achieved_gflops": 0.01}))
    out = tmp_path / "b.json"
    assert main(["bench", "--model", str(ckpt), "--match", str(match), "--method", "tome", "--batch", "2",
                 "--warmup", "0", "--repeats", "1", "--threads", "1", "--allocator", "default", "--tag", "method=nvit_tome",
                 "--tag", "seed=0", "--out", str(out)]) == 0
    row = json.loads(out.read_text())
    assert row["knob"] == {"r": 8} and row["method"] == "nvit_tome" and row["seed"] == 0
    assert row["images_per_s"] > 0
    assert main(["bench", "--model", str(ckpt), "--allocator", "default", "--tag", "images_per_s=1", "--out", str(out)]) == 2
    assert "--tag images_per_s" in capsys.readouterr().err
