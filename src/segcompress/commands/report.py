"""``segcompress report``: raw result rows -> results/benchmark.csv, tables and figures."""

from __future__ import annotations

import argparse
import json
import logging

from segcompress.report import CATEGORIES, write_report

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "rows",
        nargs="*",
        default=["results/raw"],
        help="raw result rows: JSON files, or folders searched for *.json (default: results/raw)",
    )
    parser.add_argument("--csv", default="results/benchmark.csv", help="long-format table to write")
    parser.add_argument("--figures", default="results/figures", help="folder for the figures")
    parser.add_argument("--tables", default="results/tables", help="folder for the tables")
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


def main(args: argparse.Namespace) -> int:
    summary = write_report(
        args.rows,
        csv_path=args.csv,
        figures=args.figures,
        tables=args.tables,
        categories=args.corrupted_categories,
        severities=args.corrupted_severities,
    )
    log.info("wrote %s rows to %s", summary["rows"], summary["csv"])
    print(json.dumps(summary))
    return 0
