"""The command-line conventions every verb shares: one parser per kind of option.

* ``--crop S`` or ``--crop H,W`` (:func:`add_crop_argument`, :func:`parse_crop`);
* ``--device auto|cpu|cuda[:i]`` (:func:`add_device_argument`, :func:`resolve_device`; ``auto``
  is CUDA when available, else the CPU);
* a JSON option takes inline JSON or a JSON file, written ``@FILE`` or as a plain path
  (:func:`read_json_arg`, :func:`parse_json_arg`);
* ``--progress auto|on|off`` (:func:`segcompress.progress.add_progress_argument`);
* ``--workers N`` is always DataLoader workers; process pools take ``--processes N``.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")


def parse_crop(text: str) -> int | list[int]:
    """``"512"`` -> 512, ``"512,1024"`` or ``"512x1024"`` -> [512, 1024] (height, width)."""
    parts = text.replace("x", ",").split(",")
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"crop must be S or H,W, got {text!r}") from None
    if any(s <= 0 for s in sizes) or len(sizes) not in (1, 2):
        raise argparse.ArgumentTypeError(f"crop must be S or H,W with positive sizes, got {text!r}")
    return sizes[0] if len(sizes) == 1 else sizes


def crop_hw(crop: int | list[int] | tuple[int, int]) -> tuple[int, int]:
    """A parsed crop as (height, width)."""
    if isinstance(crop, int):
        return crop, crop
    return int(crop[0]), int(crop[-1])


def add_crop_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup, help: str,
                      required: bool = False) -> None:
    """``--crop S`` or ``--crop H,W`` (the value is an int or [H, W]; see :func:`crop_hw`)."""
    parser.add_argument("--crop", type=parse_crop, required=required, metavar="S|H,W", help=help)


def add_photometric_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--photometric/--no-photometric``: the training verbs' colour augmentation switch."""
    parser.add_argument(
        "--photometric", action=argparse.BooleanOptionalAction, default=True,
        help="photometric distortion of the training crops (brightness, contrast, saturation, hue; Segmenter's "
             "mmseg recipe; default on). The synthetic study turns it off: its classes differ by colour",
    )


def device_arg(text: str) -> str:
    """argparse type of ``--device``: ``auto``, ``cpu``, ``cuda`` or ``cuda:i``."""
    if not DEVICE_PATTERN.fullmatch(text):
        raise argparse.ArgumentTypeError(f"device must be auto, cpu, cuda or cuda:N, got {text!r}")
    return text


def add_device_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--device auto|cpu|cuda[:i]`` (default ``auto``: CUDA when available, else the CPU)."""
    parser.add_argument("--device", type=device_arg, default="auto", metavar="auto|cpu|cuda",
                        help="auto (default: cuda if available, else cpu), cpu, cuda or cuda:N")


def resolve_device(name: str) -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; ``cuda`` without CUDA is an error."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available here; use --device cpu or auto")
    return name


def read_json_arg(value: str, option: str) -> tuple[Any, str]:
    """The JSON value of an option given inline, as ``@FILE`` or as a file path; and where it came
    from (``option``, or ``option FILE``) for error messages.

    Errors are one line that names ``option`` (and the file): not JSON, no such file.
    """
    text, where = value, option
    if value.startswith("@") or not value.lstrip().startswith(("{", "[", '"')):
        path = Path(value.removeprefix("@"))
        if not path.is_file():
            raise FileNotFoundError(f"{option}: {value!r} is neither inline JSON nor an existing file")
        text, where = path.read_text(), f"{option} {path}"
    try:
        return json.loads(text), where
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: invalid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None


def parse_json_arg(value: str | None, option: str, what: str = "a JSON object") -> dict[str, Any]:
    """A JSON object given inline (``'{"r": 8}'``), as ``@FILE`` or as the path of a JSON file;
    ``None`` or "" is {}. Errors are one line that names ``option`` (and the file)."""
    if value is None or value.strip() == "":
        return {}
    data, where = read_json_arg(value, option)
    if not isinstance(data, dict):
        raise ValueError(f"{where}: must be {what}")
    return data
