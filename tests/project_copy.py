"""Helpers for the tests that run the workflow in a copy of the project: file copies and config layering."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any


def copy_paths(names: Iterable[str], src: Path, dest: Path, ignore: Callable[..., Any] | None = None) -> None:
    """Copy each ``src/<name>`` (a file or a folder) to ``dest/<name>``; ``ignore`` as in :func:`shutil.copytree`."""
    for name in names:
        path = src / name
        if path.is_dir():
            shutil.copytree(path, dest / name, ignore=ignore)
        else:
            shutil.copy2(path, dest / name)


def merge_config(base: dict, over: dict) -> dict:
    """Layer ``over`` onto ``base`` in place (nested dicts merge, anything else replaces), as Snakemake
    merges a --configfile; returns ``base``."""
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            merge_config(base[k], v)
        else:
            base[k] = v
    return base
