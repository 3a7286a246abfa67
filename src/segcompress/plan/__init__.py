"""The study's plan: the config turned into variants, jobs, files and command-line options.

``Plan(config)`` is what the workflow's rules call (``workflow/rules/common.smk`` binds its
methods to the names the rules use); it checks the config first (names, windows, every method's
settings). Layers, each a class the next extends:

* :class:`~segcompress.plan.study.Study`: the grid (variants and their identity, conditions,
  training budgets) and the files each stage must produce;
* :class:`~segcompress.plan.inputs.Inputs`: what each job reads;
* :class:`~segcompress.plan.options.Options`: each command's options;
* :mod:`~segcompress.plan.paths`: where files live.
"""

from __future__ import annotations

from typing import Any

from segcompress import methods as registry
from segcompress.plan.options import Options
from segcompress.plan.study import DENSE_CONTROL, REFERENCES, Variant

__all__ = ["DENSE_CONTROL", "REFERENCES", "Plan", "Variant", "check_config"]


def _check_names(kind: str, names: Any, defined: Any, key: str | None = None) -> None:
    unknown = [n for n in names if n not in defined]
    if unknown:
        raise ValueError(f"config: {key or f'study.{kind}'} names {', '.join(unknown)}, not defined under `{kind}:` "
                         f"(defined: {', '.join(defined) or 'none'})")


def _check_windows(config: dict[str, Any]) -> None:
    """Crops, strides and patches that cannot work, refused when the config is read (not after
    training): a crop not a multiple of a backbone's patch, a stride outside 1..crop."""
    study = config["study"]
    for ds in study["datasets"]:
        d = config["datasets"][ds]
        crop, stride = d["crop"], d["eval"]["stride"]
        for arch in study["backbones"]:
            patch = config["backbones"][arch].get("patch_size")
            if patch and crop % patch:
                raise ValueError(f"config: datasets.{ds}.crop {crop} is not a multiple of backbones.{arch}.patch_size "
                                 f"{patch}; use a crop of {max(patch, crop // patch * patch)}")
        if stride is not None and not 1 <= stride <= crop:
            raise ValueError(f"config: datasets.{ds}.eval.stride {stride} must be between 1 and the crop ({crop}); "
                             "windows would skip pixels (null: crop - 32)")


def check_config(config: dict[str, Any]) -> None:
    """What the schema cannot say: names that refer to other entries, every method's settings
    (its dataclass), windows that fit the crops; raises ``ValueError`` naming the key."""
    study, known = config["study"], registry.names()
    _check_names("methods", study["methods"], known)
    _check_names("methods", config["methods"], known, key="methods")
    for name in dict.fromkeys([*study["methods"], *config["methods"]]):
        try:
            registry.get(name).parse_settings(config["methods"].get(name))
        except ValueError as e:
            raise ValueError(f"config: {e}") from None
    _check_names("datasets", study["datasets"], config["datasets"])
    _check_names("backbones", study["backbones"], config["backbones"])
    if config["analysis"]["effective_rank"]["datasets"]:
        _check_names("datasets", config["analysis"]["effective_rank"]["datasets"], config["datasets"],
                     key="analysis.effective_rank.datasets")
    checkpoints = config["train"].get("dense_checkpoints") or {}
    _check_names("datasets", checkpoints, config["datasets"], key="train.dense_checkpoints")
    for ds, paths in checkpoints.items():
        _check_names("backbones", paths, config["backbones"], key=f"train.dense_checkpoints.{ds}")
    _check_windows(config)
    if config["flops"]["per"] != "crop":
        raise ValueError("config: flops.per: image is not implemented yet; use crop (the anchors' convention)")


class Plan(Options):
    """The plan of a validated config (checked by :func:`check_config` first)."""

    def __init__(self, config: dict[str, Any]) -> None:
        check_config(config)
        super().__init__(config)
