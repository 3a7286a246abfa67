"""Options and set-up shared by the verbs that run a model variant over a dataset split.

``segcompress evaluate`` (mIoU), ``segcompress rank`` (effective rank of the encoder features) and
``segcompress qualitative`` (prediction panels) select the variant, the images and the sliding
windows the same way: a checkpoint (``--model``), a token method with its knob (``--method``,
``--knob`` or the ``knob`` of a ``--match`` result), a dataset root with an optional folder of
corrupted images (``--img-root``) and the evaluation's window size and stride. This module holds
that one definition so the verbs cannot drift apart.

The images and labels are checked against their manifests' sha256 as they are read
(``build_dataset(verify=True)``), and a condition's corruption and severity against the folder
its images come from (:func:`check_condition`).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from segcompress.commands._conventions import (
    add_crop_argument, add_device_argument, crop_hw, read_json_arg, resolve_device,
)
from segcompress.progress import add_progress_argument

# Columns of docs/contracts.md ("Results rows"), in order; unknown ones stay None.
ROW_COLUMNS = (
    "dataset", "backbone", "method", "knob", "target_fraction", "target_gflops", "achieved_gflops", "gflops_std",
    "params_m", "corruption", "category", "severity", "seed", "miou", "aacc", "macc", "num_images",
    "device", "torch", "timm",
)
# The identity of a row: the columns a tag or a match file may set, without the measured ones.
IDENTITY_COLUMNS = (
    "dataset", "backbone", "method", "knob", "target_fraction", "target_gflops", "achieved_gflops", "gflops_std",
    "params_m", "corruption", "category", "severity", "seed",
)
# Columns the running verb measures or takes from its own arguments; tags may set every other one
# (a pruned model's row, for instance, sets method=nvit while --method is dense).
RESERVED = frozenset({
    "params_m", "miou", "aacc", "macc", "num_images", "per_class_iou", "per_class_acc", "per_image", "seconds",
    "device", "torch", "timm", "python", "split", "crop", "stride", "img_scale", "model", "img_root",
    "gflops_source", "calibration_gflops", "segcompress_version", "source_revision", "source_dirty", "settings_hash",
})
MATCH_COLUMNS = ("target_fraction", "target_gflops", "achieved_gflops", "gflops_std", "within_tolerance", "tolerance")
# A method with a trained policy net says in its match file how the net was initialised, its
# channel multiplier, its GFLOPs and whether they are counted (CTS); the rows carry them for the report.
POLICY_COLUMNS = ("policy_init", "policy_channel_multiplier", "policy_gflops", "policy_net_counted")
# Where a row's achieved_gflops / gflops_std come from: measured on the row's own images (an
# input-dependent method), or the variant's match file (the same on every condition).
GFLOPS_SOURCES = ("condition", "match")


def add_variant_arguments(parser: argparse.ArgumentParser, out_help: str = "results row (JSON)") -> None:
    """The options of a model variant run over a dataset split with sliding windows."""
    parser.add_argument("--model", required=True, type=Path, help="checkpoint .safetensors (spec .json beside it)")
    parser.add_argument("--method", default="dense", help="token method to attach (default: dense)")
    parser.add_argument("--knob", default=None,
                        help='method knob as JSON (e.g. \'{"r": 8}\'), or @FILE: a JSON file (its "knob" key if any)')
    parser.add_argument("--match", type=Path,
                        help="a match result (JSON): its knob (unless --knob is given) and its target_fraction, "
                             "target_gflops, achieved_gflops and gflops_std go into the row")
    parser.add_argument("--layout", required=True, choices=["ade20k", "cityscapes"])
    parser.add_argument("--root", required=True, type=Path, help="dataset root (labels, and images unless --img-root)")
    parser.add_argument("--img-root", type=Path, help="read images from here (corrupted set; same paths, .png)")
    parser.add_argument("--split", default="val", help="split (default: val)")
    add_crop_argument(parser, help="window size (default and required: the model's crop)")
    parser.add_argument("--stride", type=int, help="window stride (default: max(crop - 32, crop // 2))")
    parser.add_argument("--img-scale", required=True, type=int, nargs=2, metavar=("LONG", "SHORT"),
                        help="keep-ratio resize scale of test images (ADE20K: 2048 512; Cityscapes: 2048 1024)")
    parser.add_argument("--out", type=Path, help=out_help)
    parser.add_argument("--condition", nargs=4, action="append", default=[],
                        metavar=("CORRUPTION", "SEVERITY", "IMG_ROOT", "OUT"),
                        help="run several image conditions in one process, loading the model once: the "
                             "corruption name (clean for clean images), its severity (0 for clean), the image "
                             "folder (- for the dataset's own images) and the output; repeatable; replaces "
                             "--img-root and --out")
    parser.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE", help="row column (repeatable)")
    parser.add_argument("--max-images", type=int, help="use the first N images only")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default: 8)")
    add_device_argument(parser)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers (default: 0)")
    add_progress_argument(parser)


@dataclass(frozen=True)
class Condition:
    """One image condition a variant runs on: clean, or a corruption at a severity.

    ``corruption`` and ``severity`` are None when the row's tags say them (the single ``--out`` form).
    """

    corruption: str | None
    severity: int | None
    img_root: Path | None
    out: Path

    def columns(self) -> dict[str, Any]:
        """The row's condition columns (corruption, category, severity), if this condition names them."""
        if self.corruption is None:
            return {}
        from segcompress.corrupt import corruption_category

        category = "clean" if self.corruption == "clean" else corruption_category(self.corruption)
        return {"corruption": self.corruption, "category": category, "severity": self.severity}


def conditions_of(args: argparse.Namespace) -> list[Condition]:
    """The conditions to run: every ``--condition``, or the one of ``--img-root``/``--out``; each
    checked against its image folder (:func:`check_condition`)."""
    if args.condition:
        if args.out is not None or args.img_root is not None:
            raise ValueError("--condition replaces --img-root and --out: give one form or the other")
        out = []
        for corruption, severity, img_root, path in args.condition:
            try:
                level = int(severity)
            except ValueError:
                raise ValueError(f"--condition {corruption} {severity}: the severity must be an integer") from None
            folder = None if img_root == "-" else Path(img_root)
            check_condition(f"--condition {corruption} {severity} {img_root}", corruption, level, folder)
            out.append(Condition(corruption, level, folder, Path(path)))
        return out
    if args.out is None:
        raise ValueError("give --out (or one --condition per image condition)")
    tags = parse_tags(args.tag, frozenset())  # the verb checks its reserved columns when it loads the run
    if "corruption" in tags or "severity" in tags:
        given = " ".join(f"--tag {k}={tags[k]}" for k in ("corruption", "severity") if k in tags)
        check_condition(given, tags.get("corruption"), tags.get("severity"), args.img_root)
    return [Condition(None, None, args.img_root, args.out)]


def folder_condition(img_root: Path) -> tuple[str, Any, str] | None:
    """The (corruption, severity, source) of the images in ``img_root``: its corrupted-set
    manifest's (``segcompress corrupt`` records both), else its path's when it has the layout's
    ``<dataset>-c/<corruption>/<severity>`` form, else None (an ad-hoc folder)."""
    from segcompress.data.datasets import MANIFEST
    from segcompress.io import read_json

    manifest_path = img_root / MANIFEST
    if manifest_path.is_file():
        manifest = read_json(manifest_path)
        if isinstance(manifest, dict) and "corruption" in manifest:
            return manifest["corruption"], manifest.get("severity"), f"its {MANIFEST}"
    parts = img_root.resolve().parts
    if len(parts) >= 3 and parts[-3].endswith("-c") and parts[-1].isdigit():
        return parts[-2], int(parts[-1]), "by its path <dataset>-c/<corruption>/<severity>"
    return None


def check_condition(given: str, corruption: str | None, severity: Any, img_root: Path | None) -> None:
    """Raise ValueError naming both when a condition's corruption or severity (None: not given)
    disagrees with its images: the dataset's own (``img_root`` None) are clean, severity 0; a
    corrupted set's are what :func:`folder_condition` finds (unchecked for an ad-hoc folder).

    Args:
        given: how the user gave the condition (``--condition fog 6 FOLDER``), for the message.
    """
    if img_root is None:
        held, source = ("clean", 0), "- (the dataset's own images) holds"
    else:
        found = folder_condition(img_root)
        if found is None:
            return
        held, source = found[:2], f"{img_root} holds ({found[2]})"
    if corruption == "clean" and severity not in (None, 0):
        raise ValueError(f"{given}: clean images have severity 0, not {severity}")
    if (corruption is not None and corruption != held[0]) or (severity is not None and severity != held[1]):
        want = f"{corruption or held[0]} {held[1] if severity is None else severity}"
        folder = "- (the dataset's own images)" if corruption == "clean" else f"the folder of {want}"
        raise ValueError(
            f"{given}: {source} {held[0]} severity {held[1]}, not {want}; "
            f"name the condition {held[0]} {held[1]} or give {folder}"
        )


def parse_tags(tags: list[str], reserved: frozenset[str] | set[str] = RESERVED) -> dict[str, Any]:
    """``["severity=3", "corruption=fog"]`` -> ``{"severity": 3, "corruption": "fog"}``.

    Values are parsed as JSON when they can be; a key in ``reserved`` (set by the verb itself) is
    an error.
    """
    out: dict[str, Any] = {}
    for tag in tags:
        key, sep, value = tag.partition("=")
        if not sep or not key:
            raise ValueError(f"--tag {tag!r}: expected KEY=VALUE")
        if key in reserved:
            raise ValueError(f"--tag {key}: this verb sets this column itself; remove the tag")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def parse_knob(text: str) -> dict[str, Any]:
    """A knob as inline JSON, or a JSON file (``@FILE`` or a path; the file's ``knob`` entry when it
    has one, as in a match result)."""
    knob, where = read_json_arg(text, "--knob")
    if where != "--knob" and isinstance(knob, dict):
        knob = knob.get("knob", knob)
    if isinstance(knob, str):  # a knob stored as a JSON string (results rows do this)
        try:
            knob = json.loads(knob)
        except json.JSONDecodeError:
            raise ValueError(f"{where}: the knob {knob!r} is not JSON") from None
    if not isinstance(knob, dict):
        raise ValueError(f"{where}: the knob must be a JSON object, got {type(knob).__name__}")
    return knob


def read_match(path: Path | None) -> dict[str, Any]:
    """A ``--match`` file as a dict (empty without one)."""
    if path is None:
        return {}
    from segcompress.io import read_json

    match = read_json(path)
    if not isinstance(match, dict):
        raise ValueError(f"{path}: a match result must be a JSON object")
    return match


def knob_of(knob: str | None, match_path: Path | None, match: dict[str, Any]) -> dict[str, Any]:
    """The knob: ``--knob`` if given, else the match file's ``knob`` entry, else none."""
    if knob is not None:
        return parse_knob(knob)
    if "knob" in match:
        return parse_knob(f"@{match_path}")
    return {}


def default_stride(crop: tuple[int, int]) -> int:
    """The sliding-window stride when none is given: max(crop - 32, crop // 2) (Segmenter's)."""
    return max(min(crop) - 32, min(crop) // 2)


def model_sha256(model_path: Path) -> dict[str, str]:
    """sha256 of a checkpoint's weights and of its spec file (part of a row's settings hash)."""
    from segcompress.models.checkpoint import spec_path
    from segcompress.provenance import file_sha256

    return {"weights": file_sha256(model_path), "spec": file_sha256(spec_path(model_path))}


def load_variant(model_path: Path, method: str, knob: dict[str, Any], layout_name: str,
                 device: str) -> tuple[Any, int]:
    """Load a checkpoint, check its classes against ``layout_name``, attach ``method`` with ``knob``.

    Returns:
        The model (eval mode, on ``device``) and the layout's number of classes.
    """
    from segcompress.data.layouts import get_layout
    from segcompress.methods import apply_method
    from segcompress.models.checkpoint import load_model

    layout = get_layout(layout_name)
    model = load_model(model_path, map_location=device)
    if model.spec.num_classes != layout.num_classes:
        raise ValueError(
            f"{model_path}: model predicts {model.spec.num_classes} classes but {layout_name} has {layout.num_classes}"
        )
    return apply_method(model, method, knob).to(device).eval(), layout.num_classes


@dataclass
class VariantRun:
    """A loaded variant and the images and windows it runs on (see :func:`load_variant_run`).

    Attributes:
        model: the Segmenter with the method attached, in eval mode, on ``device``.
        spec: its architecture.
        method: the attached method (``--method``).
        knob: the method's knob.
        match: the ``--match`` file's content (empty without one).
        tags: the ``--tag`` columns.
        num_classes: classes of the dataset layout.
        device: where the model runs.
        crop: window size (the model's crop).
        stride: window stride.
        params_m: parameters of the model (millions).
        model_sha256: sha256 of the checkpoint's weights and of its spec file.
        dataset: the test-mode dataset (``segcompress.data.datasets.build_dataset``).
        dataset_args: the arguments that built ``dataset``.
    """

    model: Any
    spec: Any
    method: str
    knob: dict[str, Any]
    match: dict[str, Any]
    tags: dict[str, Any]
    num_classes: int
    device: str
    crop: tuple[int, int]
    stride: int
    params_m: float
    model_sha256: dict[str, str]
    dataset: Any = field(repr=False)
    dataset_args: dict[str, Any] = field(default_factory=dict, repr=False)

    def dataset_for(self, img_root: Path | None) -> Any:
        """The test dataset with images from ``img_root`` (None: the dataset's own images)."""
        if img_root == self.dataset_args.get("img_root"):
            return self.dataset
        from segcompress.data.datasets import build_dataset

        return build_dataset(**{**self.dataset_args, "img_root": img_root})

    def identity(self, args: argparse.Namespace, condition: Condition) -> dict[str, Any]:
        """The identity columns of a row (docs/contracts.md): defaults from the arguments, the
        match file's GFLOPs columns, the tags, then the condition's own columns, which win."""
        row: dict[str, Any] = dict.fromkeys(IDENTITY_COLUMNS)
        clean = condition.img_root is None
        row.update(
            dataset=args.layout, backbone=self.spec.backbone, method=args.method,
            knob=json.dumps(self.knob, sort_keys=True),
            corruption="clean" if clean else None, severity=0 if clean else None,
        )
        row.update({k: self.match[k] for k in MATCH_COLUMNS + POLICY_COLUMNS if k in self.match})
        if self.match.get("message"):  # why a target was not reached, in the matcher's words
            row["match_message"] = self.match["message"]
        row.update(self.tags)
        row.update(condition.columns())
        row["params_m"] = self.params_m
        return row

    def settings(self, args: argparse.Namespace, condition: Condition) -> dict[str, Any]:
        """Where the numbers come from: split, windows, resize scale, checkpoint, image folder."""
        return {
            "split": args.split, "crop": list(self.crop), "stride": self.stride, "img_scale": list(args.img_scale),
            "model": str(args.model), "img_root": None if condition.img_root is None else str(condition.img_root),
        }

    def settings_hash(self, args: argparse.Namespace) -> str:
        """:func:`segcompress.provenance.settings_hash` of the variant's own settings: the method
        and its knob, the evaluation's split, crop, stride, resize scale and image count, the
        checkpoint's content (sha256 of weights and spec) and the match file's content. The image
        condition is not part of it: every condition of a variant shares the hash."""
        from segcompress.provenance import settings_hash

        return settings_hash({
            "method": self.method, "knob": self.knob, "split": args.split, "crop": list(self.crop),
            "stride": self.stride, "img_scale": list(args.img_scale), "max_images": args.max_images,
            "model_sha256": self.model_sha256, "match": self.match or None,
        })

    def gflops(self, condition: Condition, batch_size: int = 8) -> dict[str, Any]:
        """The row's cost columns that depend on the condition: ``gflops_source`` and
        ``calibration_gflops`` (the match file's ``achieved_gflops``, None without one), and for an
        input-dependent method ``achieved_gflops`` and ``gflops_std``.

        An input-dependent method (``segcompress.methods``: ``input_dependent``) is measured
        on this condition's images, one crop per image as the matcher's calibration images
        (:func:`segcompress.tokens.cost.image_crops`): mean and population std, source
        ``condition``. Any other method keeps the identity's values (:meth:`identity`: the match
        file's), source ``match`` (None when the match file has no ``achieved_gflops``).
        """
        from segcompress.methods import get, method_cost
        from segcompress.tokens.cost import image_crops

        calibration = self.match.get("achieved_gflops")
        if not get(self.method).input_dependent:
            return {"gflops_source": "match" if calibration is not None else None, "calibration_gflops": calibration}
        args = self.dataset_args
        crops = image_crops(args["layout"], args["root"], args["split"], self.crop, args["max_images"],
                            img_root=condition.img_root)
        cost = method_cost(self.method, self.knob, self.spec, self.model, _batches(crops, batch_size, self.device))
        return {"achieved_gflops": cost.mean, "gflops_std": cost.std, "gflops_source": "condition",
                "calibration_gflops": calibration}


def _batches(images: Iterator[Any], size: int, device: str) -> Iterator[Any]:
    """Images (1, 3, H, W) concatenated into batches of up to ``size``, on ``device``."""
    import torch

    chunk: list[Any] = []
    for img in images:
        chunk.append(img)
        if len(chunk) == size:
            yield torch.cat(chunk).to(device)
            chunk = []
    if chunk:
        yield torch.cat(chunk).to(device)


def row_json(row: dict[str, Any]) -> str:
    """A results row as JSON text: one column per line, each value compact on that line, except a
    list of objects (``per_image``), which gets one object per line."""
    def compact(v: Any) -> str:
        return json.dumps(v, separators=(",", ":"))

    lines = []
    for key, value in row.items():
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            text = "[\n" + ",\n".join(f"    {compact(v)}" for v in value) + "\n  ]"
        else:
            text = compact(value)
        lines.append(f"  {json.dumps(key)}: {text}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def load_variant_run(args: argparse.Namespace, reserved: frozenset[str] | set[str] = RESERVED) -> VariantRun:
    """Parse tags and knob, load the checkpoint, attach the method, build the test dataset.

    Raises:
        ValueError: bad tags or knob, a model whose classes or crop do not fit the dataset or
            ``--crop``, a batch size below 1.
    """
    from segcompress.data.datasets import build_dataset

    tags = parse_tags(args.tag, reserved)
    match = read_match(args.match)
    knob = knob_of(args.knob, args.match, match)
    device = resolve_device(args.device)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    model, num_classes = load_variant(args.model, args.method, knob, args.layout, device)
    spec = model.spec
    crop = tuple(spec.crop)
    if args.crop is not None and crop_hw(args.crop) != crop:
        raise ValueError(f"--crop {args.crop}: the model {args.model} runs on {crop[0]}x{crop[1]} crops")
    stride = default_stride(crop) if args.stride is None else args.stride
    params_m = sum(p.numel() for p in model.parameters()) / 1e6
    dataset_args = dict(layout=args.layout, root=args.root, split=args.split, mode="test", crop=crop,
                        img_scale=args.img_scale, img_root=args.img_root, max_images=args.max_images,
                        verify=True)
    dataset = build_dataset(**dataset_args)
    return VariantRun(model=model, spec=spec, method=args.method, knob=knob, match=match, tags=tags,
                      num_classes=num_classes, device=device, crop=crop, stride=stride, params_m=params_m,
                      model_sha256=model_sha256(args.model), dataset=dataset, dataset_args=dataset_args)
