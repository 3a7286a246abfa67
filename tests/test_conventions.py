"""One command-line convention across verbs: --crop, --device, --workers/--processes, @FILE, --progress."""

from __future__ import annotations

import argparse
import importlib
import io
import json
import logging
from pathlib import Path

import pytest

from segcompress.cli import VERBS
from segcompress.cli import main as cli
from segcompress.commands._conventions import crop_hw, device_arg, parse_crop, parse_json_arg, resolve_device
from segcompress.commands._evaluation import parse_knob
from segcompress.progress import Progress, shows_bar, track

ARCH = {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
# bench and report are maintained separately; every other verb follows the conventions here.
CHECKED_VERBS = sorted(set(VERBS) - {"bench", "report"})


def verb_options(verb: str) -> dict[str, argparse.Action]:
    """The verb's options by flag, as its parser defines them."""
    parser = argparse.ArgumentParser()
    importlib.import_module(f"segcompress.commands.{verb}").add_arguments(parser)
    return {flag: action for action in parser._actions for flag in action.option_strings}


@pytest.mark.parametrize("verb", CHECKED_VERBS)
def test_every_verb_spells_the_shared_options_alike(verb: str) -> None:
    options = verb_options(verb)
    if "--crop" in options:
        assert options["--crop"].type is parse_crop and options["--crop"].nargs is None, verb
    if "--device" in options:
        assert options["--device"].type is device_arg and options["--device"].default == "auto", verb
    if "--progress" in options:
        assert list(options["--progress"].choices) == ["auto", "on", "off"] and options["--progress"].default == "auto"
    if "--workers" in options:  # DataLoader workers only; process pools are --processes
        assert verb in {"evaluate", "rank"}, verb


def test_long_loops_take_progress_and_corrupt_takes_processes() -> None:
    for verb in ("data", "corrupt", "evaluate", "rank", "train", "finetune"):
        assert "--progress" in verb_options(verb), verb
    corrupt = verb_options("corrupt")
    assert "--processes" in corrupt and "--workers" not in corrupt
    # the old spelling still parses, as --progress off
    parser = argparse.ArgumentParser()
    importlib.import_module("segcompress.commands.corrupt").add_arguments(parser)
    args = parser.parse_args(["--layout", "ade20k", "--root", "r", "--out", "o", "--dataset-name", "x",
                              "--corruption", "fog", "--severity", "3", "--no-progress"])
    assert args.progress == "off"


@pytest.mark.parametrize(("text", "parsed", "hw"), [("512", 512, (512, 512)), ("512,1024", [512, 1024], (512, 1024)),
                                                    ("64x96", [64, 96], (64, 96))])
def test_crop_is_s_or_h_w(text: str, parsed: int | list[int], hw: tuple[int, int]) -> None:
    assert parse_crop(text) == parsed and crop_hw(parse_crop(text)) == hw


@pytest.mark.parametrize("text", ["", "a", "1,2,3", "0", "-8", "512 1024"])
def test_bad_crop_is_rejected(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="S or H,W"):
        parse_crop(text)


def test_device_values() -> None:
    for ok in ("auto", "cpu", "cuda", "cuda:1"):
        assert device_arg(ok) == ok
    for bad in ("gpu", "cuda:", "CPU", "mps"):
        with pytest.raises(argparse.ArgumentTypeError, match="auto, cpu, cuda"):
            device_arg(bad)
    import torch

    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device cuda: CUDA is not available"):
            resolve_device("cuda")


def test_a_verb_rejects_a_bad_device_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli(["qualitative", "--variant", "a", "m", "dense", "-", "--layout", "ade20k", "--root", "r",
             "--img-scale", "64", "64", "--out", "o.png", "--device", "gpu"])
    assert exc.value.code == 2 and "device must be auto, cpu, cuda" in capsys.readouterr().err


def test_json_options_take_inline_at_file_and_path(tmp_path: Path) -> None:
    path = tmp_path / "k.json"
    path.write_text('{"r": 4}')
    inline = parse_json_arg('{"r": 4}', "--knob")
    assert inline == parse_json_arg(f"@{path}", "--knob") == parse_json_arg(str(path), "--knob") == {"r": 4}
    assert parse_json_arg(None, "--knob") == {}
    with pytest.raises(FileNotFoundError, match="--knob: '@nope.json' is neither inline JSON nor an existing file"):
        parse_json_arg("@nope.json", "--knob")
    path.write_text("[1]")
    with pytest.raises(ValueError, match=f"--recipe {path}: must be a JSON object"):
        parse_json_arg(f"@{path}", "--recipe")
    # a knob file may be a match result: its "knob" entry
    path.write_text(json.dumps({"knob": {"r": 2}, "achieved_gflops": 1.0}))
    assert parse_knob(f"@{path}") == parse_knob(str(path)) == parse_knob('{"r": 2}') == {"r": 2}


def test_flops_takes_at_file_like_evaluate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["flops", "--arch", json.dumps(ARCH), "--num-classes", "5", "--crop", "64", "--method", "tome"]
    assert cli([*base, "--knob", '{"r": 4}']) == 0
    inline = json.loads(capsys.readouterr().out)
    (tmp_path / "knob.json").write_text('{"r": 4}')
    (tmp_path / "arch.json").write_text(json.dumps(ARCH))
    knob, arch = f"@{tmp_path / 'knob.json'}", f"@{tmp_path / 'arch.json'}"
    assert cli(["flops", "--arch", arch, *base[3:], "--knob", knob]) == 0
    from_file = json.loads(capsys.readouterr().out)
    assert from_file["gflops"] == inline["gflops"] and from_file["knob"] == {"r": 4}


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_without_a_terminal_logs_a_heartbeat(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="segcompress.progress")
    stream = io.StringIO()  # not a terminal: no bar
    with Progress(3, "evaluate", "img", "auto", interval=0.0, stream=stream) as progress:
        for _ in range(3):
            progress.update(1)
    assert stream.getvalue() == ""
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3 and lines[-1].startswith("evaluate: 3/3 img (") and "elapsed" in lines[-1]
    caplog.clear()
    assert list(track(range(4), 4, "rank", "img", "off", interval=0.0)) == [0, 1, 2, 3]
    assert caplog.records == []  # off: no bar and no heartbeat


def test_progress_on_a_terminal_draws_a_bar(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="segcompress.progress")
    tty = _Tty()
    with Progress(2, "corrupt ade20k", "img", "auto", interval=0.0, stream=tty) as progress:
        progress.update(2)
    assert "corrupt ade20k" in tty.getvalue() and caplog.records == []
    assert shows_bar("on", io.StringIO()) and not shows_bar("auto", io.StringIO()) and not shows_bar(False, tty)
    with pytest.raises(ValueError, match="progress: 'loud'"):
        shows_bar("loud")


def test_heartbeat_waits_for_the_interval(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="segcompress.progress")
    progress = Progress(1000, "train", "it", True, interval=3600.0, stream=io.StringIO())
    for _ in range(1000):
        progress.update(1)
    assert caplog.records == []  # an hour has not passed
