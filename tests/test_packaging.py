"""Packaging: pyproject.toml and the pinned environment (envs/) declare the same packages.

``make venv`` installs envs/requirements.txt under envs/constraints.txt; ``pip install
segcompress[...]`` reads pyproject.toml. These tests keep the two in step: the same names, the
same pins (torch as a range the pin satisfies), and no pin for a package nothing uses.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
EXTRAS = {"workflow", "clusters", "dvc", "tests"}
# Deprecated backports and packages the project once pinned without using them.
NEVER = {"typing", "torchmetrics", "lightning-utilities", "cityscapesscripts"}


def _pin_lines(path: Path) -> list[str]:
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line]


def _requirements_txt() -> dict[str, Requirement]:
    reqs = [Requirement(line) for line in _pin_lines(ROOT / "envs" / "requirements.txt")]
    return {canonicalize_name(r.name): r for r in reqs}


def _pyproject() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def _declared() -> dict[str, Requirement]:
    """Every requirement pyproject.toml declares: dependencies, extras and the build backend."""
    data = _pyproject()
    strings = list(data["project"]["dependencies"])
    for extra in data["project"]["optional-dependencies"].values():
        strings += extra
    strings += data["build-system"]["requires"]
    reqs = [Requirement(s) for s in strings]
    names = [canonicalize_name(r.name) for r in reqs]
    assert len(names) == len(set(names)), f"pyproject.toml declares a package twice: {sorted(names)}"
    return dict(zip(names, reqs))


def _pinned_version(req: Requirement) -> str:
    specs = list(req.specifier)
    assert len(specs) == 1 and specs[0].operator == "==", f"envs/requirements.txt: {req} is not pinned with =="
    return specs[0].version


def test_pyproject_declares_exactly_the_pinned_packages() -> None:
    pinned, declared = _requirements_txt(), _declared()
    assert sorted(pinned) == sorted(declared), (
        f"only in envs/requirements.txt: {sorted(set(pinned) - set(declared))}; "
        f"only in pyproject.toml: {sorted(set(declared) - set(pinned))}"
    )


@pytest.mark.parametrize("name", sorted(_requirements_txt()))
def test_pyproject_pin_matches_requirements_txt(name: str) -> None:
    version = _pinned_version(_requirements_txt()[name])
    declared = _declared()[name]
    assert declared.specifier.contains(version, prereleases=True), f"pyproject.toml: {declared} excludes {version}"
    if name in {"torch", "setuptools"}:  # ranges: keep the installed torch build / any recent setuptools
        return
    assert str(declared.specifier) == f"=={version}", f"pyproject.toml: {declared} should pin =={version}"


def test_torch_is_a_bounded_range() -> None:
    """An unbounded torch would let pip replace the local CPU build with a CUDA wheel."""
    torch = _declared()["torch"]
    assert any(s.operator == "<" for s in torch.specifier), f"pyproject.toml: {torch} has no upper bound"
    assert torch.specifier.contains("2.13.0") and not torch.specifier.contains("2.14.0")


def test_extras_are_the_documented_ones() -> None:
    extras = _pyproject()["project"]["optional-dependencies"]
    assert set(extras) == EXTRAS
    names = {e: {canonicalize_name(Requirement(s).name) for s in reqs} for e, reqs in extras.items()}
    assert "snakemake" in names["workflow"]
    assert "snakemake-executor-plugin-slurm" in names["clusters"]
    assert "dvc" in names["dvc"]
    assert "pytest" in names["tests"]


def test_no_unused_or_deprecated_pins() -> None:
    files = ("requirements.txt", "constraints.txt")
    for name in files:
        pins = {canonicalize_name(Requirement(line).name) for line in _pin_lines(ROOT / "envs" / name)}
        assert not pins & NEVER, f"envs/{name} pins {sorted(pins & NEVER)}; remove them"
    assert not set(_declared()) & NEVER


def test_requirements_are_within_the_constraints() -> None:
    """A pin in requirements.txt that constraints.txt contradicts would make `make venv` fail."""
    constraints = {
        canonicalize_name(r.name): r for r in map(Requirement, _pin_lines(ROOT / "envs" / "constraints.txt"))
    }
    for name, req in _requirements_txt().items():
        if name in constraints:
            pin = constraints[name]
            assert pin.specifier.contains(_pinned_version(req)), f"envs/constraints.txt: {pin} vs {req}"


def test_cityscapes_label_table_replaces_cityscapesscripts() -> None:
    """The labelId -> trainId table written out in segcompress (checked once against
    cityscapesscripts 2.3.0's helpers.labels): the 19 evaluated classes in order, the rest ignored."""
    from segcompress.data.cityscapes import label_id_lut, valid_label_ids

    lut = label_id_lut()
    evaluated = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
                 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}  # road ... bicycle
    assert {i: int(lut[i]) for i in range(256) if lut[i] != 255} == evaluated
    assert valid_label_ids() == frozenset(range(34))
