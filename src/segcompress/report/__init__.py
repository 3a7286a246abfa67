"""The report stage: raw rows -> ``results/benchmark.csv`` -> tables, figures and an HTML page.

Step one builds the long-format table from the raw rows and nothing else
(:mod:`segcompress.report.rows`: one CSV row per evaluation, throughput and effective rank joined
on as columns). Step two reads that CSV back and derives everything else from it
(:mod:`~segcompress.report.aggregate` the numbers, :mod:`~segcompress.report.uncertainty` the
intervals and paired verdicts from the rows' per-image areas with :mod:`~segcompress.report.stats`,
:mod:`~segcompress.report.tables`, :mod:`~segcompress.report.figures`,
:mod:`~segcompress.report.html`), so a table or figure can always be rebuilt from
``benchmark.csv`` alone. The qualitative panels are the one exception:
they need predictions, and ``segcompress qualitative`` renders them from the checkpoints; the
page only links them.

Outputs (``write_report``):

- ``<csv>`` (``results/benchmark.csv``),
- ``<tables>/summary.{md,tex,csv}`` (one line per method × target, mean ± std over seeds, 95 %
  intervals, unreached targets flagged; the markdown starts with the provenance),
  ``<tables>/per_corruption.csv``, ``<tables>/verdict.{md,csv}`` (best method per FLOPs target,
  paired comparisons; :mod:`~segcompress.report.uncertainty`) and ``<tables>/dense_classes.{md,csv}``
  (the dense model's per-class IoU),
- ``<figures>/miou_vs_gflops.{png,pdf}`` (Fig. 2), ``erank_vs_gflops.{png,pdf}`` (Fig. 4),
  ``corruption_heatmap.{png,pdf}``,
- ``<html>`` (``results/report.html``) when asked for.

Targets that were not reached are logged, one line each (:func:`unreached_points`), and returned
in the summary (``unreached``) for the workflow to print at the end of a run.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from segcompress.io import atomic_write_text
from segcompress.report.stats import REPLICATES
from segcompress.report.aggregate import (
    collapse_targets, mark_points, per_corruption, per_seed, points, provenance, read_benchmark,
    unreached, unreached_points,
)
from segcompress.report.rows import (
    CATEGORIES, COLUMNS, REQUIRED, TOLERANCE, add_intervals, category_of, columns_of, find_row_files, join_rank,
    join_throughput, load_rows, load_side_rows, mark_targets, normalise_row, per_image_jsonl, per_image_path, to_csv,
)

log = logging.getLogger(__name__)

__all__ = [
    "CATEGORIES", "COLUMNS", "REQUIRED", "build_csv", "category_of", "columns_of",
    "find_row_files", "load_rows", "normalise_row", "to_csv", "unreached_points", "write_report", "FIGURES", "TABLES",
]

#: Figure stems under ``--figures`` (each as .png and .pdf).
FIGURES: dict[str, str] = {"accuracy": "miou_vs_gflops", "erank": "erank_vs_gflops", "heatmap": "corruption_heatmap"}
#: Table files under ``--tables``.
TABLES: dict[str, str] = {"md": "summary.md", "tex": "summary.tex", "csv": "summary.csv",
                          "per_corruption": "per_corruption.csv", "verdict_md": "verdict.md",
                          "verdict_csv": "verdict.csv", "classes_md": "dense_classes.md",
                          "classes_csv": "dense_classes.csv"}


def build_csv(inputs: Iterable[str | Path], csv_path: str | Path, rank: Iterable[str | Path] = (),
              bench: Iterable[str | Path] = (), tolerance: float = TOLERANCE,
              replicates: int = REPLICATES) -> list[dict[str, Any]]:
    """Write ``benchmark.csv`` from the raw rows under ``inputs`` with rank and throughput joined,
    targets marked (``tolerance``: the study's matching tolerance, for rows that carry none) and
    per-row intervals added."""
    inputs = list(inputs)
    rows = load_rows(inputs)
    if not rows:
        raise ValueError(f"no raw result rows found in {', '.join(map(str, inputs))}; run the evaluate phase first")
    rank, bench = list(rank), list(bench)
    if bench:
        join_throughput(rows, load_side_rows(bench, "throughput", with_condition=False))
    if rank:
        join_rank(rows, load_side_rows(rank, "effective-rank", with_condition=True))
    mark_targets(rows, tolerance)
    with_areas = add_intervals(rows, replicates)
    if with_areas < len(rows):
        log.info("%d of %d rows have no per-image areas (older evaluate): no interval for them",
                 len(rows) - with_areas, len(rows))
    atomic_write_text(per_image_path(csv_path), per_image_jsonl(rows))  # first: the CSV is the stage's output
    atomic_write_text(csv_path, to_csv(rows))
    return rows


def _csv(df: Any, float_format: str | None = "%.17g") -> str:
    """A table as CSV text (``float_format`` None: the shortest text that reads back exactly)."""
    return df.to_csv(index=False, float_format=float_format, lineterminator="\n")


def write_report(
    inputs: Iterable[str | Path],
    csv_path: str | Path,
    figures: str | Path,
    tables: str | Path,
    categories: Sequence[str] | None = None,
    severities: Sequence[int] | None = None,
    rank: Iterable[str | Path] = (),
    bench: Iterable[str | Path] = (),
    html: str | Path | None = None,
    qualitative: Sequence[str | Path] = (),
    config: Mapping[str, Any] | None = None,
    heatmap: str = "miou",
    replicates: int = REPLICATES,
) -> dict[str, Any]:
    """Build benchmark.csv, then the tables, figures and (with ``html``) the page from it.

    Args:
        inputs: raw evaluation rows (files, or folders searched for ``*.json``).
        csv_path: the long-format table to write.
        figures: folder of the figures.
        tables: folder of the tables.
        categories: corruption categories in the corrupted mIoU (None: all evaluated).
        severities: severities in the corrupted mIoU (None: all evaluated).
        rank: effective-rank rows (``segcompress rank``), joined on as columns.
        bench: throughput rows (``segcompress bench``), joined on as columns.
        html: the report page to write (None: no page).
        qualitative: panel images (``segcompress qualitative``) the page links.
        config: the study's config (or the part of it the page reports), for the page's header.
        heatmap: ``miou`` or ``relative`` (per-corruption mIoU / clean mIoU) in the heatmap.
        replicates: bootstrap replicates of every interval and comparison.

    Returns:
        counts (``rows``, ``points``, ``ranked_rows``, ``benched_rows``), ``csv`` and ``unreached``
        (one line per target not reached).
    """
    from segcompress.report import figures as F
    from segcompress.report import html as H
    from segcompress.report import tables as T
    from segcompress.report import uncertainty as U

    if heatmap not in ("miou", "relative"):
        raise ValueError(f"heatmap value must be miou or relative, got {heatmap!r}")
    if replicates < 1:
        raise ValueError(f"--replicates must be at least 1, got {replicates}")
    tolerance = ((config or {}).get("matching") or {}).get("tolerance", TOLERANCE)
    rows = build_csv(inputs, csv_path, rank, bench, tolerance, replicates)
    df = read_benchmark(csv_path)  # everything below comes from the CSV alone
    no_gflops = int(df["achieved_gflops"].isna().sum())
    if no_gflops:
        log.warning("%d of %d rows have no achieved_gflops; the figures leave them out", no_gflops, len(df))
    missed = unreached(df)
    for u in missed:
        log.warning("target not reached: %s", u.line())
    prov = provenance(df)
    for line in T.provenance_lines(prov):
        if line.startswith("WARNING"):
            log.warning("%s", line.removeprefix("WARNING: "))
    kept = collapse_targets(df)
    boot = U.Bootstrap(kept, categories, severities, replicates)
    pts = mark_points(U.add_point_intervals(points(per_seed(kept, categories, severities)), boot), missed)
    pc = per_corruption(kept, severities).merge(pts[["dataset", "backbone", "method", "target", "target_text"]],
                                                on=["dataset", "backbone", "method", "target"], how="left")
    verdict = U.verdict(pts, boot)
    classes = U.dense_classes(kept, boot)

    tables, figures = Path(tables), Path(figures)
    table_paths = {k: tables / v for k, v in TABLES.items()}
    atomic_write_text(table_paths["md"], T.markdown(pts, header=T.provenance_lines(prov)))
    atomic_write_text(table_paths["tex"], T.latex(pts))
    atomic_write_text(table_paths["csv"], T.points_csv(pts))
    atomic_write_text(table_paths["per_corruption"], _csv(pc))
    atomic_write_text(table_paths["verdict_md"], T.verdict_markdown(verdict))
    atomic_write_text(table_paths["verdict_csv"], _csv(verdict, None))
    atomic_write_text(table_paths["classes_md"], T.classes_markdown(classes))
    atomic_write_text(table_paths["classes_csv"], _csv(classes, None))
    figure_paths = {k: (figures / f"{v}.png", figures / f"{v}.pdf") for k, v in FIGURES.items()}
    F.accuracy_compute(pts, *figure_paths["accuracy"])
    F.effective_rank(pts, *figure_paths["erank"])
    F.corruption_heatmap(pc, *figure_paths["heatmap"], value="miou" if heatmap == "miou" else "relative")
    if html is not None:
        page = H.render(html, df, pts, figure_paths, table_paths, csv_path, qualitative, categories, severities,
                        config, heatmap, verdict=verdict, classes=classes, provenance=prov,
                        unreached=[u.line() for u in missed])
        atomic_write_text(html, page)
    return {"rows": len(rows), "points": len(pts), "csv": str(csv_path),
            "ranked_rows": int(df["erank_mean"].notna().sum()), "benched_rows": int(df["images_per_s"].notna().sum()),
            "unreached": [u.line() for u in missed]}
