"""Facts about the supported dataset layouts (shared by readers, generators, models and reports)."""

from __future__ import annotations

from dataclasses import dataclass

IGNORE_INDEX = 255


@dataclass(frozen=True)
class Layout:
    """An on-disk dataset layout.

    Args:
        name: ``ade20k`` (ADEChallengeData2016) or ``cityscapes``.
        num_classes: classes the model predicts (ADE20K: 150, label 0 ignored and the rest shifted
            by -1; Cityscapes: the 19 trainIds).
        splits: split folder names (train, val).
    """

    name: str
    num_classes: int
    splits: tuple[str, str]


LAYOUTS: dict[str, Layout] = {
    "ade20k": Layout("ade20k", 150, ("training", "validation")),
    "cityscapes": Layout("cityscapes", 19, ("train", "val")),
}


def get_layout(name: str) -> Layout:
    try:
        return LAYOUTS[name]
    except KeyError:
        raise ValueError(f"unknown dataset layout {name!r}; choose one of {', '.join(LAYOUTS)}") from None
