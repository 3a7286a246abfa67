"""Session fixtures shared by the test modules: synthetic datasets written once per session.

The tiny Segmenter the tests build lives in ``tiny_segmenter.py`` (``tiny_spec``, ``tiny_model``),
a plain module so that the scripts the tests start as subprocesses can import it too.

A dataset these fixtures return is shared by every test that asks for the same parameters: read
it, never write into it (copy it to ``tmp_path`` first). The session checks this at its end.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import pytest

#: The root folder name each layout's datasets get (the name the real datasets unpack to).
_ROOT_NAMES = {"ade20k": "ADEChallengeData2016", "cityscapes": "cityscapes"}

SyntheticDataset = Callable[..., Path]


def _listing(root: Path) -> dict[str, tuple[int, int]]:
    """Size and mtime of every file under ``root``, by relative path."""
    return {p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SyntheticDataset]:
    """``synthetic_dataset(layout, num_train, num_val, seed=0, manifest=False)``: a root, once per parameters."""
    roots: dict[tuple, Path] = {}
    listings: dict[Path, dict[str, tuple[int, int]]] = {}

    def make(layout: str, num_train: int, num_val: int, seed: int = 0, manifest: bool = False) -> Path:
        """With ``manifest`` by ``segcompress data --synthetic`` (manifest, marker), else by ``generate``."""
        key = (layout, num_train, num_val, seed, manifest)
        if key not in roots:
            top = tmp_path_factory.mktemp(f"{layout}-{num_train}-{num_val}-seed{seed}{'-manifest' * manifest}")
            root = top / _ROOT_NAMES[layout]
            if manifest:
                from segcompress.cli import main as cli_main

                assert cli_main(["data", "--layout", layout, "--root", str(root), "--synthetic", "--num-train",
                                 str(num_train), "--num-val", str(num_val), "--seed", str(seed), "--no-progress"]) == 0
            else:
                from segcompress.data.synthetic import generate

                generate(layout, root, num_train=num_train, num_val=num_val, seed=seed, progress=False)
            roots[key], listings[root] = root, _listing(root)
        return roots[key]

    yield make
    changed = [str(root) for root, listing in listings.items() if _listing(root) != listing]
    assert not changed, f"a test wrote into a shared synthetic dataset (copy it to tmp_path first): {changed}"


@pytest.fixture(scope="session")
def synthetic_ade20k(synthetic_dataset: SyntheticDataset) -> Path:
    """ADE20K by ``segcompress data --synthetic``: 2 train, 3 val images, seed 0, and its manifest."""
    return synthetic_dataset("ade20k", 2, 3, manifest=True)


@pytest.fixture(scope="session")
def synthetic_cityscapes(synthetic_dataset: SyntheticDataset) -> Path:
    """Cityscapes by ``segcompress data --synthetic``: 2 train, 3 val images, seed 0, and its manifest."""
    return synthetic_dataset("cityscapes", 2, 3, manifest=True)
