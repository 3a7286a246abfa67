"""The summary table in Markdown, LaTeX, CSV and HTML, from :func:`segcompress.report.aggregate.points`.

One table per (dataset, backbone), one line per (method, target). Every cell is a value of the
points table, rounded for display: ``mean ± std`` over seeds (the ``±`` part only with two or
more seeds), mIoU and the per-category mIoU in percent, relative robustness and mCD as ratios.
Clean and corrupted mIoU carry their 95 % image-bootstrap interval in brackets when the rows have
per-image areas (:mod:`segcompress.report.uncertainty`). A target that was not reached is marked
:data:`~segcompress.report.aggregate.UNREACHED_MARK` and footnoted under its table ("target not
reached: achieved X of dense"); targets that gave one model share one line ("0.5, 0.35†").
The effective rank column shows mean ± the standard deviation over images (pooled over seeds),
as the paper's Fig. 4 does. The CSV holds the unrounded points table itself.

Also here: the provenance lines of the headers (:func:`provenance_lines`), the verdict table
(:func:`verdict_markdown`, :func:`verdict_html`) and the dense model's per-class IoU
(:func:`classes_markdown`, :func:`classes_html`).
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import pandas as pd

from segcompress.report.aggregate import UNREACHED_MARK, is_reference, method_label
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
    spread: bool = True  # show ± std
    interval: bool = False  # show [low, high] from <metric>_ci_low / _ci_high

    def mean_of(self, row: pd.Series) -> float:
        return _float(row.get(f"{self.metric}_mean"))

    def std_of(self, row: pd.Series) -> float:
        return _float(row.get(self.std or f"{self.metric}_std")) if self.spread else math.nan

    def interval_of(self, row: pd.Series) -> tuple[float, float]:
        if not self.interval:
            return math.nan, math.nan
        return _float(row.get(f"{self.metric}_ci_low")), _float(row.get(f"{self.metric}_ci_high"))


COLUMNS: tuple[Column, ...] = (
    Column("GFLOPs", "gflops", digits=3, always=True),
    Column("params (M)", "params_m", digits=3, always=True),
    Column("images/s", "images_per_s", digits=1, always=True),
    Column("speed-up", "speedup", digits=2),
    Column("post-train iters", "post_train_iters", digits=0, spread=False),
    Column("mIoU clean (%)", "clean_miou", 100, always=True, interval=True),
    Column("mIoU corrupted (%)", "corrupted_miou", 100, always=True, interval=True),
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
                 pm: str = " ± ", missing: str = "–", low: float = math.nan, high: float = math.nan) -> str:
    """``mean`` (× scale) to ``digits`` decimals, with ``pm`` and the std when it is a number and
    `` [low, high]`` when both bounds are numbers."""
    if math.isnan(mean):
        return missing
    text = f"{mean * scale:.{digits}f}"
    if not math.isnan(std):
        text += f"{pm}{std * scale:.{digits}f}"
    if not (math.isnan(low) or math.isnan(high)):
        text += f" [{low * scale:.{digits}f}, {high * scale:.{digits}f}]"
    return text


def columns_for(pts: pd.DataFrame) -> list[Column]:
    """The columns to show: the ``always`` ones and every other one with at least one value."""
    return [c for c in COLUMNS if c.always or pts.get(f"{c.metric}_mean", pd.Series(dtype=float)).notna().any()]


def target_cell(row: pd.Series, missing: str = "–") -> str:
    """The target column: ``target_text`` (:func:`~segcompress.report.aggregate.mark_points`),
    else the target, marked when not reached; ``missing`` for the references."""
    if is_reference(row["method"]):
        return missing
    text = row.get("target_text")
    if isinstance(text, str) and text:
        return text
    reached = row.get("target_reached")
    return f"{row['target']:g}" + (UNREACHED_MARK if pd.notna(reached) and not bool(reached) else "")


def _cells(row: pd.Series, cols: Sequence[Column], pm: str, missing: str) -> list[str]:
    head = [method_label(row["method"]), target_cell(row, missing)]
    return head + [format_value(c.mean_of(row), c.std_of(row), c.scale, c.digits, pm, missing, *c.interval_of(row))
                   for c in cols] + [str(int(row["n_seeds"]))]


def footnotes(g: pd.DataFrame) -> list[str]:
    """The footnotes of one table: one per point with an unreached target."""
    return [f"{UNREACHED_MARK} {n}" for n in g.get("footnote", pd.Series(dtype=str)).fillna("") if n]


#: Settings hashes listed one by one up to this many; beyond, their number.
LISTED_HASHES = 4


def provenance_lines(prov: Mapping[str, Sequence[str]]) -> list[str]:
    """Plain-text lines of a header: version(s), source revision(s), settings hash(es), then a
    ``WARNING`` line for rows from more than one version or revision and for models whose rows
    carry more than one settings hash (:func:`~segcompress.report.aggregate.provenance`)."""
    versions, revisions = list(prov.get("segcompress_version") or ()), list(prov.get("source_revision") or ())
    hashes, conflicts = list(prov.get("settings_hash") or ()), list(prov.get("settings_conflicts") or ())
    shown = ", ".join(hashes) if len(hashes) <= LISTED_HASHES else f"{len(hashes)} distinct (one per model variant)"
    lines = [f"segcompress version: {', '.join(versions) or 'not recorded'}",
             f"source revision: {', '.join(revisions) or 'not recorded'}",
             f"settings hash: {shown or 'not recorded'}"]
    for values, label in ((versions, "segcompress versions"), (revisions, "source revisions")):
        if len(values) > 1:
            lines.append(f"WARNING: the rows come from {len(values)} different {label}; "
                         "their numbers may not be comparable")
    if conflicts:
        lines.append(f"WARNING: rows of one model carry different settings hashes (mixed runs): {', '.join(conflicts)}")
    return lines


def _groups(pts: pd.DataFrame) -> list[tuple[str, str, pd.DataFrame]]:
    return [(ds, bb, g) for (ds, bb), g in pts.groupby(["dataset", "backbone"], sort=True)]


NOTE = ("mIoU in %, mean ± std over seeds (± only with two or more seeds) [95 % interval: image-level "
        "percentile bootstrap of the val images (1000 resamples unless the report was run with another "
        "--replicates), the seeds averaged per resample; empty for rows without per-image areas]; "
        f"{UNREACHED_MARK} = FLOPs target not reached (see the footnotes); corrupted mIoU = mean over the "
        "selected corruptions of the mean over the selected severities; rel. robustness = corrupted / clean mIoU; "
        "mCD against the dense model of the same seed; GFLOPs = achieved fvcore GMACs of one crop; images/s = "
        "throughput at a fixed batch, of the fastest timed batch unless analysis.throughput.statistic is median "
        "(empty: not measured); speed-up = over the dense model of the "
        "same seed timed in the same job, the median over its timing rounds of the dense batch time over the "
        "variant's (steadier between runs than images/s); erank = "
        "normalised effective rank of the restored encoder features, mean ± std over images.")


def markdown(pts: pd.DataFrame, title: str = "Benchmark summary", note: str = NOTE,
             header: Sequence[str] = ()) -> str:
    """Markdown: the ``header`` lines (provenance), a heading per (dataset, backbone) and one pipe
    table each, its footnotes below it."""
    cols = columns_for(pts)
    lines = [f"# {title}", "", *(f"- {h}" for h in header), *([""] if header else []), note]
    for ds, bb, g in _groups(pts):
        head = ["method", "target", *(c.header for c in cols), "seeds"]
        lines += ["", f"## {ds} / {bb}", "", "| " + " | ".join(head) + " |",
                  "|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|"]
        lines += ["| " + " | ".join(_cells(r, cols, " ± ", "–")) + " |" for _, r in g.iterrows()]
        notes = footnotes(g)
        lines += ["", *notes] if notes else []
    return "\n".join(lines) + "\n"


PM = "\x00"  # placeholder for the ± sign while a cell is escaped


def _tex(text: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#"),
                 (UNREACHED_MARK, r"$^\dagger$")):
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
        out += [r"\bottomrule", r"\end{tabular}"]
        out += [r"\par\footnotesize " + _tex(n) for n in footnotes(g)]
        out += [rf"\caption{{{_tex(ds)} / {_tex(bb)}}}",
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
        out += [f"<p class='note'>{escape(n)}</p>" for n in footnotes(g)]
    return "\n".join(out)


def points_csv(pts: pd.DataFrame) -> str:
    """The points table itself (unrounded), as CSV."""
    return pts.to_csv(index=False, float_format="%.17g", lineterminator="\n")


# --------------------------------------------------------------------------------------------
# The verdict and the dense model's classes

VERDICT_NOTE = ("Per FLOPs target, among the points that reached it: the best method on clean and on corrupted "
                "images and the runner-up, with mIoU (%) [95 % interval]; the best is compared with the runner-up, "
                "the dense control and the dense model by a paired image-level bootstrap (the same resampled images "
                "for both; difference in mIoU points [95 % interval], two-sided p). \"better\" / \"worse\" only "
                "where the interval of the difference excludes 0; otherwise \"not significantly different\".")


def _verdict_cells(r: pd.Series) -> list[str]:
    def miou(name: str, prefix: str) -> str:
        if not isinstance(r.get(name), str):
            return "–"
        value = format_value(_float(r.get(f"{prefix}_miou")), scale=100, low=_float(r.get(f"{prefix}_ci_low")),
                             high=_float(r.get(f"{prefix}_ci_high")))
        return f"{r[name]} {value}"

    excluded = r.get("excluded")
    return [f"{r['target']:g}", str(r["metric"]), miou("best", "best"), miou("runner_up", "runner_up"),
            str(r.get("verdict") or "–"), excluded if isinstance(excluded, str) and excluded else "–"]


VERDICT_HEAD = ["target", "mIoU on", "best", "runner-up", "verdict", f"not at target ({UNREACHED_MARK})"]


def _grouped_markdown(df: pd.DataFrame, title: str, note: str, head: Sequence[str], align: Sequence[str],
                      cells: Callable[[pd.Series], list[str]], empty: str) -> str:
    """A Markdown page of one table per (dataset, backbone) of ``df``: ``cells`` makes a row."""
    lines = [f"# {title}", "", note]
    for (ds, bb), g in df.groupby(["dataset", "backbone"], sort=True):
        lines += ["", f"## {ds} / {bb}", "", "| " + " | ".join(head) + " |", "|" + "|".join(align) + "|"]
        lines += ["| " + " | ".join(cells(r)) + " |" for _, r in g.iterrows()]
    if df.empty:
        lines += ["", empty]
    return "\n".join(lines) + "\n"


def _grouped_html(df: pd.DataFrame, head: Sequence[str], cells: Callable[[pd.Series], list[str]], empty: str,
                  escape: Callable[[str], str], css: str = "") -> str:
    """One HTML ``<table>`` per (dataset, backbone) of ``df``; ``empty`` when there is no row."""
    out = []
    for (ds, bb), g in df.groupby(["dataset", "backbone"], sort=True):
        out.append(f"<h3>{escape(ds)} / {escape(bb)}</h3>")
        out.append(f"<table{css}>\n<thead><tr>" + "".join(f"<th>{escape(h)}</th>" for h in head)
                   + "</tr></thead>\n<tbody>")
        out += ["<tr>" + "".join(f"<td>{escape(c)}</td>" for c in cells(r)) + "</tr>" for _, r in g.iterrows()]
        out.append("</tbody>\n</table>")
    return "\n".join(out) if out else f"<p class='note'>{escape(empty)}</p>"


VERDICT_EMPTY = "No compressed point: nothing to compare."


def verdict_markdown(v: pd.DataFrame, note: str = VERDICT_NOTE) -> str:
    """The verdict table (:func:`segcompress.report.uncertainty.verdict`) as Markdown."""
    return _grouped_markdown(v, "Verdict per FLOPs target", note, VERDICT_HEAD, ["---"] * len(VERDICT_HEAD),
                             _verdict_cells, VERDICT_EMPTY)


def verdict_html(v: pd.DataFrame, escape: Callable[[str], str] = html.escape) -> str:
    """The verdict table as HTML, one ``<table>`` per (dataset, backbone)."""
    return _grouped_html(v, VERDICT_HEAD, _verdict_cells, VERDICT_EMPTY, escape, css=" class='verdict'")


CLASSES_NOTE = ("The dense model's clean IoU (%) per class [95 % image-bootstrap interval], mean over seeds: the "
                "classes with the most label pixels, then those with the smallest mean area per image where "
                "present (small objects, thin structures). Classes by id.")
CLASSES_HEAD = ["class", "kind", "label pixels", "images", "mean area (px)", "IoU (%)"]


def _class_cells(r: pd.Series) -> list[str]:
    return [str(int(r["class"])), str(r["kind"]), str(int(r["label_pixels"])), str(int(r["images"])),
            f"{r['mean_area']:.0f}", format_value(_float(r["iou"]), scale=100, low=_float(r["iou_ci_low"]),
                                                  high=_float(r["iou_ci_high"]))]


CLASSES_EMPTY = "No per-image areas in the dense model's clean rows: not computed."


def classes_markdown(c: pd.DataFrame, note: str = CLASSES_NOTE) -> str:
    """The dense model's per-class IoU (:func:`segcompress.report.uncertainty.dense_classes`) as Markdown."""
    return _grouped_markdown(c, "Dense model: per-class IoU", note, CLASSES_HEAD, ["---:", "---"] + ["---:"] * 4,
                             _class_cells, CLASSES_EMPTY)


def classes_html(c: pd.DataFrame, escape: Callable[[str], str] = html.escape) -> str:
    """The dense model's per-class IoU as HTML."""
    return _grouped_html(c, CLASSES_HEAD, _class_cells, CLASSES_EMPTY, escape)
