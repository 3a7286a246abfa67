"""``results/report.html``: one self-contained page gathering the figures and tables.

The page links the figures by paths relative to itself (open it from anywhere inside a copy of
``results/``), shows the summary tables inline (the same cells as ``summary.md``), the verdict per
FLOPs target, the dense model's per-class IoU and the targets that were not reached, and starts
with the code that produced the rows (segcompress version, source revision(s), settings hash(es);
a warning when the rows disagree) and what the numbers were computed on: datasets, methods,
targets, seeds, the corruptions and severities evaluated and the ones the corrupted mIoU
aggregates, how many images every number rests on (read from ``benchmark.csv``), and the config's choices for the paper's open questions
(passed in as the config's JSON; the page says so when it was not).
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd

from segcompress.report.aggregate import is_reference, method_label, method_rank
from segcompress.report.tables import (
    CLASSES_NOTE, NOTE, VERDICT_NOTE, classes_html, html_tables, provenance_lines, verdict_html,
)

#: (config path, question) shown in the "choices" table: docs/methods.md §12's open questions.
OPEN_QUESTIONS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("finetune", "pruned"), "1. pruned models are fine-tuned"),
    (("finetune", "token_methods"), "1. token-method points are fine-tuned"),
    (("finetune", "recipe", "iters"), "7. fine-tuning length (iterations)"),
    (("methods", "tome", "decoder_on_merged"), "2. ToMe's decoder runs on the merged tokens"),
    (("methods", "tome", "prop_attn"), "2. ToMe proportional attention"),
    (("flops", "per"), "3. FLOPs counted per"),
    (("methods", "cts", "include_policy_net"), "3. CTS policy net counted"),
    (("report", "corrupted_categories"), "4. corrupted mIoU: categories (null = all)"),
    (("report", "corrupted_severities"), "4. corrupted mIoU: severities (null = all)"),
    (("analysis", "effective_rank", "feature"), "5. effective rank: feature point"),
    (("analysis", "effective_rank", "centre"), "5. effective rank: mean-centred"),
    (("analysis", "effective_rank", "normalise"), "5. effective rank: normalisation"),
    (("analysis", "effective_rank", "windows"), "5. effective rank: windows of an image"),
    (("methods", "nvit_tome", "prune_share"), "6. prune-then-merge: pruning share of the budget"),
    (("matching", "tolerance"), "FLOPs matching tolerance (relative)"),
)

STYLE = """
body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:.9em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th:first-child,td:first-child,td:nth-child(2){text-align:left}
img{max-width:100%;border:1px solid #eee}
.note{color:#555;font-size:.9em}
.warn{color:#a00;font-weight:bold}
code{background:#f4f4f4;padding:0 .2em}
"""


def _e(text: Any) -> str:
    return html.escape(str(text))


def _rel(path: str | Path, page: str | Path) -> str:
    return Path(os.path.relpath(Path(path).resolve(), Path(page).resolve().parent)).as_posix()


def _lookup(config: Mapping[str, Any], path: Sequence[str]) -> tuple[bool, Any]:
    node: Any = config
    for key in path:
        if not isinstance(node, Mapping) or key not in node:
            return False, None
        node = node[key]
    return True, node


#: How a bench row's ``statistic`` reads in "images/s of the ... timed batch".
STATISTIC_PHRASES = {"best": "fastest", "median": "median"}


def _join(values: Sequence[Any]) -> str:
    return ", ".join(str(v) for v in values) if len(values) else "none"


def setup_items(df: pd.DataFrame, categories: Sequence[str] | None, severities: Sequence[int] | None,
                config: Mapping[str, Any] | None) -> list[str]:
    """The header's bullet points (HTML), from the benchmark table and the config."""
    methods = sorted(df["method"].unique(), key=method_rank)
    targets = sorted({t for m, t in zip(df["method"], df["target"]) if not is_reference(m)}, reverse=True)
    corrupted = df[df["corruption"] != "clean"]
    corr = sorted({(c, k) for c, k in zip(corrupted["corruption"], corrupted["category"])}, key=lambda x: (x[1], x[0]))
    items = [
        f"<b>Datasets / backbones:</b> {_e(_join(sorted({f'{d} / {b}' for d, b in zip(df['dataset'], df['backbone'])})))}",
        f"<b>Methods:</b> {_e(_join([method_label(m) for m in methods]))}; <b>FLOPs targets</b> (fraction of dense): "
        f"{_e(_join([f'{t:g}' for t in targets]))}; <b>seeds:</b> {_e(_join(sorted(df['seed'].unique())))}",
        f"<b>Corruptions evaluated:</b> {_e(_join([f'{c} ({k})' for c, k in corr]))}; <b>severities:</b> "
        f"{_e(_join(sorted(corrupted['severity'].unique())))}",
        f"<b>Corrupted mIoU aggregates</b> categories: {_e(_join(categories) if categories else 'all evaluated')}; "
        f"severities: {_e(_join(severities) if severities else 'all evaluated')} (mean over corruptions of the "
        "mean over severities)",
    ]
    clean = df[df["corruption"] == "clean"]
    for ds, g in clean.groupby("dataset"):
        n = sorted(pd.to_numeric(g["num_images"], errors="coerce").dropna().astype(int).unique())
        items.append(f"<b>{_e(ds)}:</b> mIoU over {_e(_join(n))} val image(s) per condition")
    items.extend(policy_items(df))
    ranked = df[df["erank_mean"].notna()]
    if not ranked.empty:
        conds = sorted({"clean" if c == "clean" else f"{c}/{s}" for c, s in zip(ranked["corruption"], ranked["severity"])})
        n = sorted(pd.to_numeric(ranked.get("erank_images"), errors="coerce").dropna().astype(int).unique())
        items.append(f"<b>Effective rank</b> on {_e(_join(sorted(ranked['dataset'].unique())))}, conditions "
                     f"{_e(_join(conds))}, {_e(_join(n))} image(s) each")
    else:
        items.append("<b>Effective rank:</b> not computed (no rank rows)")
    if df["images_per_s"].notna().any():
        dev = sorted({str(d) for d in df.get("bench_device", pd.Series(dtype=str)).dropna().unique()})
        batch = sorted({int(b) for b in pd.to_numeric(df.get("bench_batch"), errors="coerce").dropna().unique()})
        stat = sorted({str(s) for s in df.get("bench_statistic", pd.Series(dtype=str)).dropna().unique()})
        taken = _join([STATISTIC_PHRASES.get(s, s) for s in stat]) if stat else "median (older rows)"
        items.append(f"<b>Throughput</b> (images/s of the {_e(taken)} timed batch) at batch {_e(_join(batch))} on "
                     f"{_e(_join(dev))}; a shared machine makes these numbers noisy, and the speed-up over the dense "
                     "model timed in the same job less so")
    else:
        items.append("<b>Throughput:</b> not measured (images/s column empty)")
    if config:
        for ds, settings in sorted((config.get("datasets") or {}).items()):
            ev = (settings or {}).get("eval") or {}
            if ev:
                items.append(f"<b>{_e(ds)} evaluation:</b> stride {_e(json.dumps(ev.get('stride')))} (null = "
                             f"crop − 32), max_images {_e(json.dumps(ev.get('max_images')))} (null = all)")
    return items


def policy_items(df: pd.DataFrame) -> list[str]:
    """One bullet per method with a trained policy net (rows with ``policy_init``): how the net was
    initialised (random: no ImageNet weights, unlike the reference), its channel multiplier, and
    its GFLOPs per dataset as a share of the dense model's, counted in the method's or not."""
    if "policy_init" not in df.columns:
        return []
    items = []
    rows = df[df["policy_init"].notna()]
    for method in sorted(rows["method"].unique(), key=method_rank):
        g = rows[rows["method"] == method]
        inits = sorted({str(v) for v in g["policy_init"]})
        parts = [_join([f"random init (no ImageNet weights: methods.{method}.policy.pretrained; the reference "
                        "starts from ImageNet weights)" if v == "random" else v for v in inits])]
        mult = sorted({float(v) for v in pd.to_numeric(g.get("policy_channel_multiplier"), errors="coerce").dropna()})
        if mult:
            parts.append(f"channels ×{_join([f'{m:g}' for m in mult])}")
        cost = []
        for (ds, bb), h in g.groupby(["dataset", "backbone"]):
            gflops = pd.to_numeric(h.get("policy_gflops"), errors="coerce").dropna()
            dense = df[(df["dataset"] == ds) & (df["backbone"] == bb) & (df["method"] == "dense")]
            dense_g = pd.to_numeric(dense.get("achieved_gflops"), errors="coerce").dropna()
            if len(gflops) and len(dense_g):
                cost.append(f"{ds} {gflops.iloc[0]:.3g} GFLOPs ({gflops.iloc[0] / dense_g.iloc[0]:.1%} of dense)")
        if cost:
            counted = {str(v).lower() for v in g.get("policy_net_counted", pd.Series(dtype=object)).dropna()}
            where = {"true": f", counted in {method_label(method)}'s GFLOPs", "false": ", not counted in its GFLOPs"}
            parts.append(_join(cost) + (where.get(counted.pop(), "") if len(counted) == 1 else ""))
        items.append(f"<b>{_e(method_label(method))} policy net:</b> {_e('; '.join(parts))}")
    return items


def choices_table(config: Mapping[str, Any] | None) -> str:
    """The open-question choices as an HTML table (or a note when no config was given)."""
    if not config:
        return "<p class='note'>No config given to the report (<code>--config-json</code>): choices not shown.</p>"
    rows = []
    for path, question in OPEN_QUESTIONS:
        found, value = _lookup(config, path)
        if found:
            rows.append(f"<tr><td>{_e(question)}</td><td><code>{_e('.'.join(path))}</code></td>"
                        f"<td>{_e(json.dumps(value))}</td></tr>")
    return ("<table><thead><tr><th>open question</th><th>config key</th><th>value</th></tr></thead><tbody>"
            + "".join(rows) + "</tbody></table>")


def provenance_html(prov: Mapping[str, Sequence[str]]) -> str:
    """The provenance lines as a list; warnings (rows from several revisions or settings) in red."""
    items = [f"<li class='warn'>{_e(line)}</li>" if line.startswith("WARNING") else f"<li>{_e(line)}</li>"
             for line in provenance_lines(prov)]
    return "<h2>Code and settings</h2><ul>" + "".join(items) + "</ul>"


def unreached_html(lines: Sequence[str]) -> str:
    """The targets not reached, one item each (or a sentence saying every target was reached)."""
    if not lines:
        return "<h2>FLOPs targets</h2><p class='note'>Every point reached its FLOPs target.</p>"
    return ("<h2>FLOPs targets not reached</h2><p class='note'>Flagged † in the tables, hollow and off the line in "
            "the figures; a target that gave the same model as another is reported once.</p><ul>"
            + "".join(f"<li>{_e(line)}</li>" for line in lines) + "</ul>")


def _figure(title: str, png: str | Path, pdf: str | Path | None, page: Path, caption: str) -> str:
    links = f" (<a href='{_e(_rel(pdf, page))}'>PDF</a>)" if pdf else ""
    return (f"<h2>{_e(title)}</h2>\n<p class='note'>{_e(caption)}{links}</p>\n"
            f"<img src='{_e(_rel(png, page))}' alt='{_e(title)}'>")


def render(page: str | Path, df: pd.DataFrame, pts: pd.DataFrame, figures: Mapping[str, tuple[Path, Path]],
           tables: Mapping[str, Path], csv_path: str | Path, qualitative: Sequence[str | Path] = (),
           categories: Sequence[str] | None = None, severities: Sequence[int] | None = None,
           config: Mapping[str, Any] | None = None, heatmap_value: str = "miou",
           verdict: pd.DataFrame | None = None, classes: pd.DataFrame | None = None,
           provenance: Mapping[str, Sequence[str]] | None = None, unreached: Sequence[str] = ()) -> str:
    """The page's HTML text (the caller writes it to ``page``)."""
    page = Path(page)
    items = "".join(f"<li>{i}</li>" for i in setup_items(df, categories, severities, config))
    table_links = " · ".join(f"<a href='{_e(_rel(p, page))}'>{_e(Path(p).name)}</a>" for p in tables.values())
    parts = [
        "<!doctype html>", "<html lang='en'><head><meta charset='utf-8'>",
        "<title>segcompress report</title>", f"<style>{STYLE}</style></head><body>",
        "<h1>segcompress: token compression vs structural pruning at matched FLOPs</h1>",
        f"<p class='note'>Every number below is computed from <a href='{_e(_rel(csv_path, page))}'>"
        f"{_e(Path(csv_path).name)}</a> ({len(df)} rows, one per variant and condition).</p>",
        provenance_html(provenance or {}),
        f"<h2>What was run</h2><ul>{items}</ul>",
        "<h2>Choices for the open questions (config)</h2>", choices_table(config),
        _figure("Accuracy vs compute (Fig. 2)", *figures["accuracy"], page,
                "mIoU against achieved GFLOPs (corrupted: the cost measured on corrupted images); top clean, bottom "
                "corrupted; dense as a star, dense control as a diamond; error bars: 95 % image-bootstrap interval "
                "(± std over seeds without per-image areas); hollow, off the line: FLOPs target not reached."),
        f"<h2>Summary tables</h2><p class='note'>{_e(NOTE)} Also as {table_links}.</p>",
        html_tables(pts),
        unreached_html(unreached),
        f"<h2>Verdict per FLOPs target</h2><p class='note'>{_e(VERDICT_NOTE)}</p>",
        verdict_html(verdict if verdict is not None else pd.DataFrame(columns=["dataset", "backbone"])),
        f"<h2>Dense model: per-class IoU</h2><p class='note'>{_e(CLASSES_NOTE)}</p>",
        classes_html(classes if classes is not None else pd.DataFrame(columns=["dataset", "backbone"])),
        _figure("Per-corruption robustness", *figures["heatmap"], page,
                ("mIoU (%)" if heatmap_value == "miou" else "corrupted / clean mIoU")
                + " per corruption (mean over the selected severities and seeds)."),
        _figure("Effective rank (Fig. 4)", *figures["erank"], page,
                "Normalised effective rank of the final encoder features restored on the patch grid; "
                "bands: ± std over images."),
    ]
    if qualitative:
        parts.append("<h2>Qualitative comparison (Fig. 3)</h2><p class='note'>Each method at its most aggressive "
                     "target; the lower rows zoom on the region with the densest label boundaries.</p>")
        parts += [f"<p><img src='{_e(_rel(q, page))}' alt='{_e(Path(q).stem)}'></p>" for q in qualitative]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
