"""Evaluation's inputs are what the stages verified: images and labels are checked against their
manifests' sha256 as they are read, a condition's name and severity against its image folder,
skipped files are reported, and bench rows carry the provenance of evaluation rows."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from PIL import Image

from segcompress.cli import main as cli_main
from segcompress.data.datasets import ChangedFileError, build_dataset, list_samples
from segcompress.models.checkpoint import save_model
from segcompress.provenance import code_provenance
from test_cli import one_line_error, run
from tiny_segmenter import SEGMENTER_DROPOUT, tiny_model, tiny_spec

torch.set_num_threads(1)

# A log record as the CLI formats it (logging.basicConfig in segcompress.cli).
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING) \S+: ")


def error_line(result: subprocess.CompletedProcess, verb: str) -> str:
    """:func:`test_cli.one_line_error` of a verb that logs its progress: the log records are left
    out, every other line of stderr counts (a traceback among them fails)."""
    kept = "".join(line for line in result.stderr.splitlines(keepends=True) if not LOG_LINE.match(line))
    assert "Traceback" not in result.stderr, result.stderr
    return one_line_error(subprocess.CompletedProcess(result.args, result.returncode, result.stdout, kept), verb)


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory, synthetic_dataset) -> Path:
    """A folder with ``city`` (a copy of the session's ``segcompress data`` set), its corrupted set
    ``city-c/gaussian_noise/3`` (``segcompress corrupt``) and a 19-class checkpoint ``m.safetensors``."""
    top = tmp_path_factory.mktemp("study")
    shutil.copytree(synthetic_dataset("cityscapes", 1, 2, manifest=True), top / "city")
    assert cli_main(["corrupt", "--layout", "cityscapes", "--root", str(top / "city"), "--out", str(top / "city-c"),
                     "--dataset-name", "cityscapes", "--corruption", "gaussian_noise", "--severity", "3",
                     "--processes", "1", "--no-progress"]) == 0
    save_model(tiny_model(tiny_spec(64, num_classes=19, **SEGMENTER_DROPOUT)), top / "m.safetensors")
    return top


@pytest.fixture
def copy(study: Path, tmp_path: Path) -> Path:
    """A copy of ``study`` to tamper with (same relative layout)."""
    shutil.copytree(study, tmp_path / "s")
    return tmp_path / "s"


def evaluate_args(top: Path, *more: str) -> list[str]:
    """``segcompress evaluate`` of ``top``'s checkpoint on ``top/city``, then ``more``."""
    return ["evaluate", "--model", str(top / "m.safetensors"), "--layout", "cityscapes", "--root", str(top / "city"),
            "--img-scale", "256", "96", "--stride", "40", "--no-progress", *more]


def val_images(root: Path) -> list[Path]:
    return sorted((root / "leftImg8bit/val").rglob("*.png"))


def mirror(path: Path) -> None:
    """Rewrite an image left-right flipped: still a valid image, other bytes."""
    Image.open(path).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(path)


def test_data_manifest_lists_each_files_sha256(study: Path) -> None:
    manifest = json.loads((study / "city/manifest.json").read_text())
    assert len(manifest["files"]) == 3 * 3
    for entry in manifest["files"]:
        assert entry["sha256"] == hashlib.sha256((study / "city" / entry["path"]).read_bytes()).hexdigest()


def test_changed_val_image_stops_evaluation_with_one_line(copy: Path) -> None:
    """A val image changed after the data stage verified it: exit 2, one line naming it and the
    fix, no traceback, no row."""
    changed = val_images(copy / "city")[1]
    mirror(changed)
    out = copy / "rows/clean/0.json"
    line = error_line(run(*evaluate_args(copy, "--condition", "clean", "0", "-", str(out))), "evaluate")
    assert f"{changed}: changed since the data stage verified it (sha256 " in line
    assert "rerun the data stage (snakemake --forcerun data) or restore the file" in line
    assert not out.exists()


def test_changed_label_and_corrupted_image_are_named(copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    label = sorted((copy / "city/gtFine/val").rglob("*_gtFine_labelTrainIds.png"))[0]
    noisy = val_images(copy / "city-c/gaussian_noise/3")[0]
    mirror(noisy)
    out = copy / "rows/gaussian_noise/3.json"
    folder = copy / "city-c/gaussian_noise/3"
    assert cli_main(evaluate_args(copy, "--condition", "gaussian_noise", "3", str(folder), str(out))) == 2
    err = capsys.readouterr().err
    assert f"{noisy}: changed since the corrupt stage wrote it" in err and "snakemake --forcerun corrupt" in err
    assert not out.exists()
    label.write_bytes(label.read_bytes() + b"\0")  # trailing bytes: decodes the same, hashes differently
    assert cli_main(evaluate_args(copy, "--condition", "clean", "0", "-", str(out))) == 2
    assert f"{label}: changed since the data stage verified it" in capsys.readouterr().err


def test_files_added_or_removed_after_the_data_stage(copy: Path) -> None:
    root = copy / "city"
    image = val_images(root)[0]
    extra = image.with_name(image.name.replace("_000019_", "_000099_"))
    shutil.copy(image, extra)
    for suffix in ("_gtFine_labelIds.png", "_gtFine_labelTrainIds.png"):
        src = (root / "gtFine/val" / image.relative_to(root / "leftImg8bit/val")).with_name(
            image.name.replace("_leftImg8bit.png", suffix))
        shutil.copy(src, src.with_name(src.name.replace("_000019_", "_000099_")))
    with pytest.raises(ChangedFileError, match=rf"{re.escape(str(extra))}: not in .*manifest.json .*forcerun data"):
        build_dataset("cityscapes", root, "val", "test", 64, (256, 96), verify=True)
    extra.unlink()
    image.unlink()
    with pytest.raises(ChangedFileError, match=r"manifest.json: 1 image\(s\) it lists are gone"):
        build_dataset("cityscapes", root, "val", "test", 64, (256, 96), verify=True)


def test_verified_reads_give_the_same_items(study: Path) -> None:
    args = ("cityscapes", study / "city", "val", "test", 64, (256, 96))
    plain, verified = build_dataset(*args), build_dataset(*args, verify=True)
    assert verified.expected and len(verified.expected) == 2 * len(verified)
    for i in range(len(plain)):
        a, b = plain[i], verified[i]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])


def test_folder_without_manifest_is_read_with_one_warning(copy: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = copy / "city"
    (root / "manifest.json").unlink()
    mirror(val_images(root)[0])
    with caplog.at_level(logging.WARNING, logger="segcompress.data.datasets"):
        ds = build_dataset("cityscapes", root, "val", "test", 64, (256, 96), verify=True)
        ds[0]
        build_dataset("cityscapes", root, "val", "test", 64, (256, 96), verify=True)
    warnings = [r.getMessage() for r in caplog.records if "manifest.json: not found" in r.getMessage()]
    assert warnings == [f"{root / 'manifest.json'}: not found; reading the dataset's images and labels without "
                        "checking their content (a folder that `segcompress data` or `segcompress corrupt` did "
                        "not write)"]


def test_manifest_without_per_file_sha256_is_an_error(copy: Path) -> None:
    manifest = copy / "city/manifest.json"
    data = json.loads(manifest.read_text())
    data["files"] = [{"path": f["path"], "bytes": f["bytes"]} for f in data["files"]]
    manifest.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"manifest.json: lists no sha256 per file .*snakemake --forcerun data"):
        build_dataset("cityscapes", copy / "city", "val", "test", 64, (256, 96), verify=True)


def test_mislabelled_condition_is_one_line_naming_both(study: Path, tmp_path: Path) -> None:
    folder = study / "city-c/gaussian_noise/3"
    out = tmp_path / "fog/6.json"
    line = error_line(run(*evaluate_args(study, "--condition", "fog", "6", str(folder), str(out))), "evaluate")
    assert f"--condition fog 6 {folder}: {folder} holds (its manifest.json) gaussian_noise severity 3, " in line
    assert "not fog 6; name the condition gaussian_noise 3 or give the folder of fog 6" in line
    assert not out.exists()


def test_condition_checks(study: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """By the manifest, by the path when there is none, the dataset's own images are clean 0; a
    correctly named condition evaluates."""
    folder = study / "city-c/gaussian_noise/3"
    adhoc = tmp_path / "city-c/fog/2"  # a copy without manifest: its path names it
    shutil.copytree(folder / "leftImg8bit", adhoc / "leftImg8bit")
    out = tmp_path / "row.json"
    for condition, expected in [
        (["gaussian_noise", "4", str(folder)], "(its manifest.json) gaussian_noise severity 3, not gaussian_noise 4"),
        (["clean", "0", str(adhoc)], "holds (by its path <dataset>-c/<corruption>/<severity>) fog severity 2, not "
                                     "clean 0; name the condition fog 2 or give - (the dataset's own images)"),
        (["fog", "3", "-"], "- (the dataset's own images) holds clean severity 0, not fog 3"),
        (["clean", "2", "-"], "clean images have severity 0, not 2"),
    ]:
        assert cli_main(evaluate_args(study, "--condition", *condition, str(out))) == 2
        assert expected in capsys.readouterr().err
    assert cli_main(evaluate_args(study, "--img-root", str(folder), "--out", str(out), "--tag", "corruption=fog",
                                  "--tag", "severity=3")) == 2
    assert "--tag corruption=fog --tag severity=3: " in capsys.readouterr().err
    assert not out.exists()
    assert cli_main(evaluate_args(study, "--condition", "gaussian_noise", "3", str(folder), str(out),
                                  "--condition", "fog", "2", str(adhoc), str(tmp_path / "fog.json"))) == 0
    row = json.loads(out.read_text())
    assert (row["corruption"], row["severity"], row["num_images"]) == ("gaussian_noise", 3, 2)


def test_skipped_files_are_reported_once_per_split(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                   synthetic_dataset) -> None:
    root = Path(shutil.copytree(synthetic_dataset("ade20k", 1, 2), tmp_path / "ade"))  # a copy: files are added
    val = root / "images/validation"
    jpg = sorted(val.glob("*.jpg"))[0]
    for name in ("ADE_val_extra.jpeg", "ADE_val_other.png", ".DS_Store"):
        shutil.copy(jpg, val / name)
    with caplog.at_level(logging.WARNING, logger="segcompress.data.datasets"):
        assert len(list_samples("ade20k", root, "train")) == 1
        assert len(list_samples("ade20k", root, "val")) == 2
        list_samples("ade20k", root, "val")  # again (a verb builds the split per condition): no second line
    assert [r.getMessage() for r in caplog.records] == [
        f"{val}: skipped 2 file(s) not named *.jpg (ADE_val_extra.jpeg, ADE_val_other.png); convert or rename "
        "them to *.jpg to use them, or remove them"
    ]


def test_bench_rows_carry_provenance(study: Path, tmp_path: Path) -> None:
    """The columns of evaluation rows: version, revision, dirty flag, python, and a settings hash
    that follows the settings."""
    base = ["bench", "--model", str(study / "m.safetensors"), "--warmup", "0", "--repeats", "1", "--device", "cpu",
            "--threads", "1", "--allocator", "default"]
    rows = []
    for name, batch in (("a", "1"), ("b", "1"), ("c", "2")):
        assert cli_main(base + ["--batch", batch, "--out", str(tmp_path / f"{name}.json")]) == 0
        rows.append(json.loads((tmp_path / f"{name}.json").read_text()))
    a, b, c = rows
    assert {k: a[k] for k in code_provenance()} == code_provenance()
    assert a["python"] and a["torch"] == torch.__version__
    assert re.fullmatch(r"[0-9a-f]{16}", a["settings_hash"])
    assert a["settings_hash"] == b["settings_hash"] != c["settings_hash"]
    assert cli_main(base + ["--tag", "settings_hash=0", "--out", str(tmp_path / "d.json")]) == 2
