"""``segcompress report``: raw rows -> results/benchmark.csv, tables, figures and the HTML page.

Positional arguments are the raw evaluation rows (files, or folders searched for ``*.json``);
``--rank`` and ``--bench`` add the effective-rank and throughput rows, joined onto the evaluation
rows as columns (:mod:`segcompress.report.rows`). Everything after the CSV is computed from the
CSV alone (:mod:`segcompress.report`).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from segcompress.report import CATEGORIES, write_report
from segcompress.summary import write_summary

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "rows",
        nargs="*",
        default=["results/raw"],
        help="raw result rows: JSON files, or folders searched for *.json (default: results/raw)",
    )
    parser.add_argument("--rank", nargs="*", default=[], metavar="ROW",
                        help="effective-rank rows (segcompress rank): files or folders")
    parser.add_argument("--bench", nargs="*", default=[], metavar="ROW",
                        help="throughput rows (segcompress bench): files or folders")
    parser.add_argument("--csv", default="results/benchmark.csv", help="long-format table to write")
    parser.add_argument("--figures", default="results/figures", help="folder for the figures")
    parser.add_argument("--tables", default="results/tables", help="folder for the tables")
    parser.add_argument("--html", type=Path, default=None, help="also write the report page (e.g. results/report.html)")
    parser.add_argument("--qualitative", nargs="*", default=[], metavar="PNG",
                        help="qualitative panels (segcompress qualitative) for the page to show")
    parser.add_argument("--config-json", default=None, metavar="JSON",
                        help="the study's config (inline JSON or a .json file) for the page's header")
    parser.add_argument(
        "--corrupted-categories",
        nargs="+",
        choices=CATEGORIES,
        default=None,
        metavar="CATEGORY",
        help=f"corruption categories that enter the corrupted mIoU ({', '.join(CATEGORIES)}; default: all)",
    )
    parser.add_argument(
        "--corrupted-severities",
        nargs="+",
        type=int,
        default=None,
        metavar="S",
        help="severities that enter the corrupted mIoU (default: all present)",
    )
    parser.add_argument("--heatmap", choices=["miou", "relative"], default="miou",
                        help="per-corruption heatmap of mIoU (default) or relative robustness (corrupted / clean)")


def _config(text: str | None) -> dict | None:
    if text is None:
        return None
    path = Path(text)
    if not text.lstrip().startswith("{") and path.suffix == ".json":
        text = path.read_text()
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--config-json is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ValueError("--config-json must be a JSON object")
    return value


def main(args: argparse.Namespace) -> int:
    summary = write_report(
        args.rows,
        csv_path=args.csv,
        figures=args.figures,
        tables=args.tables,
        categories=args.corrupted_categories,
        severities=args.corrupted_severities,
        rank=args.rank,
        bench=args.bench,
        html=args.html,
        qualitative=args.qualitative,
        config=_config(args.config_json),
        heatmap=args.heatmap,
    )
    log.info("wrote %s rows to %s", summary["rows"], summary["csv"])
    # metrics.json and curves.csv beside the CSV, for `dvc metrics show` / `dvc plots show`
    write_summary(args.csv, args.corrupted_categories, args.corrupted_severities)
    print(json.dumps(summary))
    return 0
