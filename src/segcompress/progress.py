"""Progress of long loops (evaluation, corruption, training, ...): one convention for every verb.

``--progress auto|on|off`` (:func:`add_progress_argument`): ``auto`` (the default) draws a tqdm bar
on an interactive terminal and, without one (a Snakemake or cluster job writing to its log), logs a
heartbeat line at a steady interval instead, so a long condition is never silent; ``on`` always
draws the bar; ``off`` draws nothing and logs no heartbeat. Library functions take the same mode
(``True`` means ``auto``, ``False`` means ``off``).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

PROGRESS_MODES = ("auto", "on", "off")
HEARTBEAT_SECONDS = 30.0

log = logging.getLogger(__name__)
T = TypeVar("T")


def add_progress_argument(parser: argparse.ArgumentParser) -> None:
    """The ``--progress`` option of a verb with a long loop (and ``--no-progress``, its old spelling)."""
    parser.add_argument(
        "--progress", choices=PROGRESS_MODES, default="auto",
        help=f"auto (default): a bar on a terminal, else a log line every {HEARTBEAT_SECONDS:.0f} s; "
             "on: always a bar; off: neither",
    )
    # the spelling before --progress, still used by scripts and tests: --progress off
    parser.add_argument("--no-progress", dest="progress", action="store_const", const="off", help=argparse.SUPPRESS)


def normalise_mode(mode: str | bool) -> str:
    """``auto``/``on``/``off``; ``True`` -> ``auto``, ``False`` -> ``off``."""
    if isinstance(mode, bool):
        return "auto" if mode else "off"
    if mode not in PROGRESS_MODES:
        raise ValueError(f"progress: {mode!r} is not one of {', '.join(PROGRESS_MODES)}")
    return mode


def shows_bar(mode: str | bool, stream: Any = None) -> bool:
    """Whether ``mode`` draws a bar on ``stream`` (default ``sys.stderr``): ``on``, or ``auto`` on a terminal."""
    mode = normalise_mode(mode)
    stream = sys.stderr if stream is None else stream
    return mode == "on" or (mode == "auto" and bool(getattr(stream, "isatty", lambda: False)()))


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class Progress:
    """A counter shown as a tqdm bar or as heartbeat log lines (see the module docstring).

    Args:
        total: number of steps (None when unknown).
        desc: what is counted, first word of every heartbeat line (``evaluate``, ``corrupt ade20k``).
        unit: unit of a step (``img``, ``it``).
        mode: ``auto``, ``on`` or ``off`` (or a bool, see :func:`normalise_mode`).
        initial: steps already done (a resumed training).
        interval: seconds between heartbeat lines.
        stream: the terminal test and the bar's output (default: ``sys.stderr``).
    """

    def __init__(self, total: int | None, desc: str, unit: str = "it", mode: str | bool = "auto",
                 initial: int = 0, interval: float = HEARTBEAT_SECONDS, stream: Any = None) -> None:
        self.total, self.desc, self.unit, self.interval = total, desc, unit, interval
        self.n = self._start = initial
        self._postfix = ""
        stream = sys.stderr if stream is None else stream
        self._bar = None
        if shows_bar(mode, stream):
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=stream, dynamic_ncols=True)
        self._heartbeat = normalise_mode(mode) == "auto" and self._bar is None
        self._t0 = self._last = time.monotonic()

    def update(self, n: int = 1) -> None:
        """Count ``n`` more steps; a heartbeat line when ``interval`` seconds passed since the last."""
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.monotonic()
        if self._heartbeat and now - self._last >= self.interval:
            self._last = now
            log.info("%s", self.line(now))

    def line(self, now: float | None = None) -> str:
        """The heartbeat text: done/total, rate and time left."""
        now = time.monotonic() if now is None else now
        elapsed = max(now - self._t0, 1e-9)
        rate = (self.n - self._start) / elapsed
        done = f"{self.n}/{self.total}" if self.total is not None else str(self.n)
        eta = ""
        if self.total is not None and rate > 0:
            eta = f", {_hms((self.total - self.n) / rate)} left"
        speed = f"{rate:.2f} {self.unit}/s, {_hms(elapsed)} elapsed{eta}"
        return f"{self.desc}: {done} {self.unit} ({speed}){self._postfix}"

    def set_postfix(self, **values: Any) -> None:
        """Values shown after the count (the bar's postfix, or appended to heartbeat lines)."""
        if self._bar is not None:
            self._bar.set_postfix(**values)
        self._postfix = "  " + " ".join(f"{k} {v}" for k, v in values.items()) if values else ""

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def track(iterable: Iterable[T], total: int | None, desc: str, unit: str = "it", mode: str | bool = "auto",
          interval: float = HEARTBEAT_SECONDS) -> Iterator[T]:
    """Iterate ``iterable`` counting each item with a :class:`Progress`."""
    with Progress(total, desc, unit, mode, interval=interval) as progress:
        for item in iterable:
            yield item
            progress.update(1)
