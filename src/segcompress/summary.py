"""The study's small machine-readable summary, beside ``results/benchmark.csv``, for DVC.

Two files, derived from the long-format table alone by the report's own aggregation
(:func:`segcompress.report.aggregate.per_seed` then :func:`~segcompress.report.aggregate.points`,
the numbers of the summary table), small enough for Git and for DVC's ``metrics`` and ``plots``
(``dvc metrics show``, ``dvc plots show``; see dvc.yaml):

- ``metrics/<dataset>/<backbone>/<point>.json``: ``{gflops, miou_clean, miou_corrupted, seeds}``,
  one file per method and FLOPs target (``dense.json``, ``tome-0.5.json``, ...), so that ``dvc
  metrics show`` prints one row per point and four columns; mIoU as fractions, means over seeds,
  ``null`` where nothing was evaluated (a study without corruptions).
- ``curves.csv``: the same points as rows (dataset, backbone, method, target_fraction, gflops,
  miou_clean, miou_corrupted, their standard deviations over seeds, seeds), for plotting mIoU
  against GFLOPs per method.
"""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
from pathlib import Path
from typing import Any, Sequence

from segcompress.io import atomic_write_text

#: Columns of curves.csv, and the report's ``points`` columns they come from.
CURVE_COLUMNS: dict[str, str | None] = {
    "dataset": "dataset",
    "backbone": "backbone",
    "method": "method",
    "target_fraction": "target",
    "gflops": "gflops_mean",
    "miou_clean": "clean_miou_mean",
    "miou_corrupted": "corrupted_miou_mean",
    "miou_clean_std": "clean_miou_std",
    "miou_corrupted_std": "corrupted_miou_std",
    "seeds": "n_seeds",
}
#: Keys of one point's metrics file.
METRIC_KEYS: tuple[str, ...] = ("gflops", "miou_clean", "miou_corrupted")


def _value(v: Any) -> Any:
    """A JSON/CSV-friendly scalar: None for missing, floats rounded to 6 digits."""
    if v is None:
        return None
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float):
        return None if math.isnan(v) else round(v, 6)
    return v


def point_name(method: str, target_fraction: float) -> str:
    """``dense`` / ``dense_control``, or ``<method>-<target>`` (``tome-0.5``), as in the workflow's
    variant names."""
    from segcompress.report.aggregate import is_reference

    return method if is_reference(method) else f"{method}-{float(target_fraction):g}"


def write_summary(
    csv_path: str | Path,
    categories: Sequence[str] | None = None,
    severities: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Write the ``metrics/`` folder and ``curves.csv`` beside the long-format table ``csv_path``.

    ``categories`` / ``severities`` select what enters the corrupted mIoU, as for the report.
    Returns the metrics written, ``{dataset: {backbone: {point: {...}}}}``. The folder is
    replaced whole, so a point no longer in the table leaves no file behind.
    """
    from segcompress.report.aggregate import per_seed, points, read_benchmark

    csv_path = Path(csv_path)
    pts = points(per_seed(read_benchmark(csv_path), categories, severities))
    metrics: dict[str, Any] = {}
    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    writer.writerow(CURVE_COLUMNS)
    for _, p in pts.iterrows():
        row = {name: _value(p[col]) if col in p else None for name, col in CURVE_COLUMNS.items()}
        row["target_fraction"] = f"{float(p['target']):g}"
        writer.writerow(["" if v is None else v for v in row.values()])
        point = {k: row[k] for k in METRIC_KEYS}
        point["seeds"] = row["seeds"]
        metrics.setdefault(str(p["dataset"]), {}).setdefault(str(p["backbone"]), {})[
            point_name(str(p["method"]), p["target"])
        ] = point
    _write_metrics_folder(csv_path.with_name("metrics"), metrics)
    atomic_write_text(csv_path.with_name("curves.csv"), table.getvalue())
    return metrics


def _write_metrics_folder(folder: Path, metrics: dict[str, Any]) -> None:
    """One JSON file per point under ``folder``, written beside it and swapped in whole."""
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    for dataset, backbones in metrics.items():
        for backbone, points in backbones.items():
            (partial / dataset / backbone).mkdir(parents=True)
            for name, point in points.items():
                (partial / dataset / backbone / f"{name}.json").write_text(json.dumps(point, indent=2) + "\n")
    partial.mkdir(exist_ok=True)
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
