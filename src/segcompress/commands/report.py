"""``segcompress report``: raw rows -> results/benchmark.csv, tables, figures and the HTML page.

Positional arguments are the raw evaluation rows (files, or folders searched for ``*.json``);
``--rank`` and ``--bench`` add the effective-rank and throughput rows, joined onto the evaluation
rows as columns (:mod:`segcompress.report.rows`). Everything after the CSV is computed from the
CSV alone (:mod:`segcompress.report`): the summary tables with 95 % image-bootstrap intervals,
the verdict per FLOPs target (``verdict.{md,csv}``), the dense model's per-class IoU
(``dense_classes.{md,csv}``), the figures and the page. Every FLOPs target that was not reached is
logged as a warning, one line each; the JSON summary printed last lists them under ``unreached``.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from segcompress.report import CATEGORIES, write_report
from segcompress.report.stats import REPLICATES
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
    parser.add_argument("--inputs", default=None, metavar="JSON",
                        help="a JSON object (inline or a file) with any of rows, rank, bench, qualitative (lists "
                             "of paths) and config: what the workflow passes instead of a long command line")
    parser.add_argument("--csv", required=True, type=Path,
                        help="long-format table to write (required, so the pipeline's results/benchmark.csv is "
                             "only replaced when asked for)")
    parser.add_argument("--figures", default=None, help="folder for the figures (default: figures/ beside --csv)")
    parser.add_argument("--tables", default=None, help="folder for the tables (default: tables/ beside --csv)")
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
    parser.add_argument("--replicates", type=int, default=REPLICATES, metavar="B",
                        help=f"bootstrap resamples of the val images behind every interval and comparison "
                             f"(default: {REPLICATES})")


INPUT_KEYS = ("rows", "rank", "bench", "qualitative", "config")


def read_inputs(value: str | None) -> dict:
    """``--inputs``: the lists of row files and the config, checked key by key."""
    from segcompress.commands._model_options import parse_json_arg

    data = parse_json_arg(value, "--inputs")
    unknown = sorted(set(data) - set(INPUT_KEYS))
    if unknown:
        raise ValueError(f"--inputs: unknown key(s) {', '.join(unknown)} (known: {', '.join(INPUT_KEYS)})")
    for key in INPUT_KEYS[:-1]:
        if not isinstance(data.get(key, []), list):
            raise ValueError(f"--inputs: {key!r} must be a list of paths")
    return data


def main(args: argparse.Namespace) -> int:
    from segcompress.commands._model_options import parse_json_arg

    inputs = read_inputs(args.inputs)
    config = inputs.get("config") or parse_json_arg(args.config_json, "--config-json") or None
    summary = write_report(
        inputs.get("rows", args.rows),
        csv_path=args.csv,
        figures=args.figures or args.csv.parent / "figures",
        tables=args.tables or args.csv.parent / "tables",
        categories=args.corrupted_categories,
        severities=args.corrupted_severities,
        rank=inputs.get("rank", args.rank),
        bench=inputs.get("bench", args.bench),
        html=args.html,
        qualitative=inputs.get("qualitative", args.qualitative),
        config=config,
        heatmap=args.heatmap,
        replicates=args.replicates,
    )
    log.info("wrote %s rows to %s", summary["rows"], summary["csv"])
    if summary["unreached"]:
        log.warning("%d FLOPs target(s) not reached; flagged in the tables and figures", len(summary["unreached"]))
    # metrics/ and curves.csv beside the CSV, for `dvc metrics show` / `dvc plots show`
    write_summary(args.csv, args.corrupted_categories, args.corrupted_severities)
    print(json.dumps(summary))
    return 0
