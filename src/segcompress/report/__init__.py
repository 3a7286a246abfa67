"""The report stage: raw rows -> ``results/benchmark.csv`` -> tables, figures and an HTML page.

Step one builds the long-format table from the raw rows and nothing else
(:mod:`segcompress.report.rows`: one CSV row per evaluation, throughput and effective rank joined
on as columns). Step two reads that CSV back and derives everything else from it
(:mod:`~segcompress.report.aggregate` the numbers, :mod:`~segcompress.report.tables`,
:mod:`~segcompress.report.figures`, :mod:`~segcompress.report.html`), so a table or figure can
always be rebuilt from ``benchmark.csv`` alone. The qualitative panels are the one exception:
they need predictions, and ``segcompress qualitative`` renders them from the checkpoints; the
page only links them.

Outputs (``write_report``):

- ``<csv>`` (``results/benchmark.csv``),
- ``<tables>/summary.{md,tex,csv}`` (one line per method × target, mean ± std over seeds) and
  ``<tables>/per_corruption.csv``,
- ``<figures>/miou_vs_gflops.{png,pdf}`` (Fig. 2), ``erank_vs_gflops.{png,pdf}`` (Fig. 4),
  ``corruption_heatmap.{png,pdf}``,
- ``<html>`` (``results/report.html``) when asked for.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from segcompress.io import atomic_write_text
from segcompress.report.aggregate import METHOD_LABELS, per_corruption, per_seed, points, read_benchmark
from segcompress.report.rows import (
    CATEGORIES, COLUMNS, REQUIRED, category_of, columns_of, find_row_files, join_rank, join_throughput, load_rows,
    load_side_rows, normalise_row, to_csv,
)

log = logging.getLogger(__name__)

__all__ = [
    "CATEGORIES", "COLUMNS", "METHOD_LABELS", "REQUIRED", "build_csv", "category_of", "columns_of",
    "find_row_files", "load_rows", "normalise_row", "to_csv", "write_report", "FIGURES", "TABLES",
]

#: Figure stems under ``--figures`` (each as .png and .pdf).
FIGURES: dict[str, str] = {"accuracy": "miou_vs_gflops", "erank": "erank_vs_gflops", "heatmap": "corruption_heatmap"}
#: Table files under ``--tables``.
TABLES: dict[str, str] = {"md": "summary.md", "tex": "summary.tex", "csv": "summary.csv",
                          "per_corruption": "per_corruption.csv"}


def build_csv(inputs: Iterable[str | Path], csv_path: str | Path, rank: Iterable[str | Path] = (),
              bench: Iterable[str | Path] = ()) -> list[dict[str, Any]]:
    """Write ``benchmark.csv`` from the raw rows under ``inputs`` with rank and throughput joined."""
    inputs = list(inputs)
    rows = load_rows(inputs)
    if not rows:
        raise ValueError(f"no raw result rows found in {', '.join(map(str, inputs))}; run the evaluate phase first")
    rank, bench = list(rank), list(bench)
    if bench:
        join_throughput(rows, load_side_rows(bench, "throughput", with_condition=False))
    if rank:
        join_rank(rows, load_side_rows(rank, "effective-rank", with_condition=True))
    atomic_write_text(csv_path, to_csv(rows))
    return rows


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
    """
    from segcompress.report import figures as F
    from segcompress.report import html as H
    from segcompress.report import tables as T

    if heatmap not in ("miou", "relative"):
        raise ValueError(f"heatmap value must be miou or relative, got {heatmap!r}")
    rows = build_csv(inputs, csv_path, rank, bench)
    df = read_benchmark(csv_path)  # everything below comes from the CSV alone
    no_gflops = int(df["achieved_gflops"].isna().sum())
    if no_gflops:
        log.warning("%d of %d rows have no achieved_gflops; the figures leave them out", no_gflops, len(df))
    pts = points(per_seed(df, categories, severities))
    pc = per_corruption(df, severities)

    tables, figures = Path(tables), Path(figures)
    table_paths = {k: tables / v for k, v in TABLES.items()}
    atomic_write_text(table_paths["md"], T.markdown(pts))
    atomic_write_text(table_paths["tex"], T.latex(pts))
    atomic_write_text(table_paths["csv"], T.points_csv(pts))
    atomic_write_text(table_paths["per_corruption"], pc.to_csv(index=False, float_format="%.17g", lineterminator="\n"))
    figure_paths = {k: (figures / f"{v}.png", figures / f"{v}.pdf") for k, v in FIGURES.items()}
    F.accuracy_compute(pts, *figure_paths["accuracy"])
    F.effective_rank(pts, *figure_paths["erank"])
    F.corruption_heatmap(pc, *figure_paths["heatmap"], value="miou" if heatmap == "miou" else "relative")
    if html is not None:
        page = H.render(html, df, pts, figure_paths, table_paths, csv_path, qualitative, categories, severities,
                        config, heatmap)
        atomic_write_text(html, page)
    return {"rows": len(rows), "points": len(pts), "csv": str(csv_path),
            "ranked_rows": int(df["erank_mean"].notna().sum()), "benched_rows": int(df["images_per_s"].notna().sum())}
