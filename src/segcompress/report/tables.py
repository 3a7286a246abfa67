"""The summary table in Markdown, LaTeX, CSV and HTML, from :func:`segcompress.report.aggregate.points`.

One table per (dataset, backbone), one line per (method, target). Every cell is a value of the
points table, rounded for display: ``mean ± std`` over seeds (the ``±`` part only with two or
more seeds), mIoU and the per-category mIoU in percent, relative robustness and mCD as ratios.
The effective rank column shows mean ± the standard deviation over images (pooled over seeds),
as the paper's Fig. 4 does. The CSV holds the unrounded points table itself.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import pandas as pd

from segcompress.report.aggregate import method_label
from segcompress.report.rows import CATEGORIES


@dataclass(frozen=True)
class Column:
    """One displayed column: header, the points-table metric, scale and decimals.

    ``std`` names the spread column (default ``<metric>_std``); ``always`` keeps the column even
    when every value is missing (so a missing measurement shows as an empty column, not a
    silently dropped one).
    """

    header: str
    metric: str
    scale: float = 1.0
    digits: int = 1
    std: str | None = None
    always: bool = False

    def mean_of(self, row: pd.Series) -> float:
        return _float(row.get(f"{self.metric}_mean"))

    def std_of(self, row: pd.Series) -> float:
        return _float(row.get(self.std or f"{self.metric}_std"))


COLUMNS: tuple[Column, ...] = (
    Column("GFLOPs", "gflops", digits=3, always=True),
    Column("params (M)", "params_m", digits=3, always=True),
    Column("images/s", "images_per_s", digits=1, always=True),
    Column("mIoU clean (%)", "clean_miou", 100, always=True),
    Column("mIoU corrupted (%)", "corrupted_miou", 100, always=True),
    Column("rel. robustness", "relative_robustness", digits=3, always=True),
    Column("mCD", "mcd", digits=3),
    *(Column(f"{c} (%)", f"miou_{c}", 100) for c in CATEGORIES),
    Column("erank clean", "erank_clean", digits=3, std="erank_clean_img_std"),
    Column("erank corrupted", "erank_corrupted", digits=3, std="erank_corrupted_img_std"),
)


def _float(v: object) -> float:
    try:
        x = float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan
    return x


def format_value(mean: float, std: float = math.nan, scale: float = 1.0, digits: int = 1,
                 pm: str = " ± ", missing: str = "–") -> str:
    """``mean`` (× scale) to ``digits`` decimals, with ``pm`` and the std when it is a number."""
    if math.isnan(mean):
        return missing
    text = f"{mean * scale:.{digits}f}"
    if not math.isnan(std):
        text += f"{pm}{std * scale:.{digits}f}"
    return text


def columns_for(pts: pd.DataFrame) -> list[Column]:
    """The columns to show: the ``always`` ones and every other one with at least one value."""
    return [c for c in COLUMNS if c.always or pts.get(f"{c.metric}_mean", pd.Series(dtype=float)).notna().any()]


def _cells(row: pd.Series, cols: Sequence[Column], pm: str, missing: str) -> list[str]:
    head = [method_label(row["method"]), missing if row["method"] == "dense" else f"{row['target']:g}"]
    return head + [format_value(c.mean_of(row), c.std_of(row), c.scale, c.digits, pm, missing) for c in cols] + [
        str(int(row["n_seeds"]))]


def _groups(pts: pd.DataFrame) -> list[tuple[str, str, pd.DataFrame]]:
    return [(ds, bb, g) for (ds, bb), g in pts.groupby(["dataset", "backbone"], sort=True)]


NOTE = ("mIoU in %, mean ± std over seeds (± only with two or more seeds); corrupted mIoU = mean over the "
        "selected corruptions of the mean over the selected severities; rel. robustness = corrupted / clean mIoU; "
        "mCD against the dense model of the same seed; GFLOPs = achieved fvcore GMACs of one crop; images/s = "
        "median throughput at a fixed batch (empty: not measured); erank = normalised effective rank of the "
        "restored encoder features, mean ± std over images.")


def markdown(pts: pd.DataFrame, title: str = "Benchmark summary", note: str = NOTE) -> str:
    """Markdown: a heading per (dataset, backbone) and one pipe table each."""
    cols = columns_for(pts)
    lines = [f"# {title}", "", note]
    for ds, bb, g in _groups(pts):
        head = ["method", "target", *(c.header for c in cols), "seeds"]
        lines += ["", f"## {ds} / {bb}", "", "| " + " | ".join(head) + " |",
                  "|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|"]
        lines += ["| " + " | ".join(_cells(r, cols, " ± ", "–")) + " |" for _, r in g.iterrows()]
    return "\n".join(lines) + "\n"


PM = "\x00"  # placeholder for the ± sign while a cell is escaped


def _tex(text: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#")):
        text = text.replace(a, b)
    return text


def latex(pts: pd.DataFrame, note: str = NOTE) -> str:
    """LaTeX: one ``tabular`` (booktabs) per (dataset, backbone), each in a ``table`` float."""
    cols = columns_for(pts)
    out = [f"% {note}", "% requires \\usepackage{booktabs}"]
    for ds, bb, g in _groups(pts):
        head = ["method", "target", *(c.header for c in cols), "seeds"]
        out += [r"\begin{table}[t]", r"\centering", r"\small",
                r"\begin{tabular}{ll" + "r" * (len(head) - 2) + "}", r"\toprule",
                " & ".join(_tex(h) for h in head) + r" \\", r"\midrule"]
        out += [" & ".join(_tex(c).replace(PM, r" $\pm$ ") for c in _cells(r, cols, PM, "--")) + r" \\"
                for _, r in g.iterrows()]
        out += [r"\bottomrule", r"\end{tabular}", rf"\caption{{{_tex(ds)} / {_tex(bb)}}}",
                rf"\label{{tab:{ds}-{bb}}}".replace("_", "-"), r"\end{table}", ""]
    return "\n".join(out)


def html_tables(pts: pd.DataFrame, escape: Callable[[str], str] = html.escape) -> str:
    """HTML: a heading and a ``<table>`` per (dataset, backbone)."""
    cols = columns_for(pts)
    out = []
    for ds, bb, g in _groups(pts):
        head = ["method", "target", *(c.header for c in cols), "seeds"]
        out.append(f"<h3>{escape(ds)} / {escape(bb)}</h3>")
        out.append("<table>\n<thead><tr>" + "".join(f"<th>{escape(h)}</th>" for h in head) + "</tr></thead>\n<tbody>")
        for _, r in g.iterrows():
            out.append("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in _cells(r, cols, " ± ", "–")) + "</tr>")
        out.append("</tbody>\n</table>")
    return "\n".join(out)


def points_csv(pts: pd.DataFrame) -> str:
    """The points table itself (unrounded), as CSV."""
    return pts.to_csv(index=False, float_format="%.17g", lineterminator="\n")
