"""What a run prints at its end: the logs of failed jobs, the FLOPs targets not reached."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Iterable, TextIO


def print_failed_logs(snakemake_logs: str | Path | Iterable[str | Path] | None, out: TextIO = sys.stderr) -> None:
    """Print the log of every job that failed, found in Snakemake's own logs by the ``> {log} 2>&1``
    of its command. Under ``--quiet rules`` (make run) Snakemake prints neither the failed job's
    block nor its log; without it, the logs already printed are skipped."""
    paths = [snakemake_logs] if isinstance(snakemake_logs, (str, Path)) else list(snakemake_logs or [])
    text = "".join(Path(p).read_text(errors="replace") for p in paths if Path(p).is_file())
    for job_log in dict.fromkeys(re.findall(r"> (\S+) 2>&1' returned non-zero exit status", text)):
        if f"Logfile {job_log}:" in text or not Path(job_log).is_file():
            continue
        lines = Path(job_log).read_text(errors="replace").splitlines()
        head = f"Log of the failed job, {job_log} (last {min(len(lines), 40)} lines):"
        print(head, *lines[-40:], sep="\n  ", file=out)


def print_unreached(csv: str | Path) -> None:
    """One line per FLOPs target not reached in the table ``csv`` (nothing when it does not exist)."""
    if not Path(csv).is_file():
        return
    from segcompress.report.aggregate import read_benchmark, unreached_points

    lines = unreached_points(read_benchmark(csv))
    if lines:
        print(f"{len(lines)} FLOPs target(s) not reached (flagged in the tables and figures):")
        for line in lines:
            print(f"  {line}")
