"""report.html: a sweep on one self-contained page, readable offline.

Every figure is embedded as a data URI, the style is inline, and nothing is fetched from the
network. A small inline script marks, once the page has loaded, how many of its figures decoded
(``<body data-figures-rendered="n/m">``), so a headless browser can check the page as a reader
would see it.
"""

from __future__ import annotations

import base64
import html
import json
from fnmatch import fnmatch
from pathlib import Path

import pandas as pd

from xmodal.reporting.results import RESULT_FILE

# The figures of a job worth a look beside the numbers: feature cards and patch heat maps.
JOB_FIGURE_PATTERNS = ("feature_*.png", "crossmodal_patches.png", "group_examples.png", "feature_patches.png", "kernels.png", "hit_rates.png")
MAX_JOB_FIGURES = 6

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; font-size: 0.8em; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 3px 6px; text-align: right; } th { background: #f0f0f0; }
td.text { text-align: left; }
.scroll { overflow-x: auto; }
.figures { display: flex; flex-wrap: wrap; gap: 12px; }
.figures figure { margin: 0; } .figures img { max-width: 560px; border: 1px solid #ddd; }
figcaption { font-size: 0.75em; color: #555; }
.failed { color: #a00; }
"""

CHECK_SCRIPT = """
window.addEventListener("load", function () {
  var images = Array.from(document.images);
  var ok = images.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.setAttribute("data-figures-rendered", ok + "/" + images.length);
});
"""


def embedded_image(path: Path, caption: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    alt = html.escape(caption)
    return f'<figure><img src="data:image/png;base64,{data}" alt="{alt}"><figcaption>{alt}</figcaption></figure>'


def figure_block(paths: list[Path], captions: list[str]) -> str:
    return '<div class="figures">' + "".join(embedded_image(p, c) for p, c in zip(paths, captions)) + "</div>"


def summary_table(done: pd.DataFrame, key_metrics: list[str]) -> str:
    cols = [c for c in ["experiment", "model", "sae", "layer", "relative_depth"] if c in done]
    cols += [c for m in key_metrics for c in (m, f"{m}_null_mean", f"{m}_p") if c in done]
    frame = done[cols].sort_values([c for c in ["model", "layer"] if c in cols])
    table = frame.to_html(index=False, classes="summary", float_format=lambda v: f"{v:.3g}", border=0)
    return f'<div class="scroll">{table}</div>'  # wide sweeps scroll instead of overflowing the page


def report_html(
    sweep_dir: Path, summary: pd.DataFrame, curves: list[Path], key_metrics: list[str], overhead: str | None, gradient: pd.DataFrame | None = None
) -> str:
    counts = summary["status"].value_counts().to_dict() if len(summary) else {}
    parts = [
        f"<h1>Sweep report: {html.escape(sweep_dir.name)}</h1>",
        f"<p>{len(summary)} jobs: {counts.get('ok', 0)} finished, {counts.get('failed', 0)} failed, "
        f"{counts.get('unfinished', 0)} unfinished. Tables: <code>summary.parquet</code> / <code>summary.csv</code>.</p>",
    ]
    if overhead:
        parts.append(f"<p>{html.escape(overhead)}</p>")
    done = summary[summary["status"] == "ok"] if len(summary) else summary
    if len(done):
        parts += ["<h2>Results</h2>", summary_table(done, key_metrics)]
    if curves:
        parts += ["<h2>Layer curves</h2>", figure_block(curves, [p.stem.replace("__", ": ") for p in curves])]
    if gradient is not None and len(gradient):
        parts += [
            "<h2>Layer gradient</h2><p>Spearman rank correlation of each metric with relative depth, two-sided permutation p.</p>",
            gradient.to_html(index=False, classes="gradient", float_format=lambda v: f"{v:.3g}", border=0),
        ]
    ordered = done.sort_values([c for c in ["model", "layer"] if c in done]) if len(done) else done
    for _, job in ordered.iterrows():
        job_dir = sweep_dir / job["job"]
        listed = json.loads((job_dir / RESULT_FILE).read_text())["figures"]  # what this run wrote, not whatever lies there
        paths = [job_dir / f for pattern in JOB_FIGURE_PATTERNS for f in sorted(listed) if fnmatch(Path(f).name, pattern)]
        paths = [p for p in paths if p.exists()][:MAX_JOB_FIGURES]
        if paths:
            title = f"{job.get('experiment', '')}, {job.get('model', '')}, layer {job.get('layer', '')}"
            parts += [f"<h2>{html.escape(title)}</h2>", figure_block(paths, [p.stem for p in paths])]
    problems = summary[summary["status"] != "ok"] if len(summary) else summary
    if len(problems):
        rows = "".join(
            f'<tr><td class="text">{html.escape(str(r.job))}</td><td class="text failed">{html.escape(str(r.status))}</td>'
            f'<td class="text">{html.escape(str(r.error))}</td></tr>'
            for r in problems.itertuples()
        )
        parts += ["<h2>Jobs that did not finish</h2>", f'<table class="failures"><tr><th>job</th><th>status</th><th>error</th></tr>{rows}</table>']
    body = "\n".join(parts)
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(sweep_dir.name)}: xmodal sweep</title>'
        f"<style>{STYLE}</style><script>{CHECK_SCRIPT}</script></head>\n<body>\n{body}\n</body></html>\n"
    )
