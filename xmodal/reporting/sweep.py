"""One table, one set of layer curves and one report for a whole sweep directory.

Every job folder (one holding ``.hydra/overrides.yaml``) becomes a row of
``summary.parquet``: its overrides, its status (ok, failed with its error line, or
unfinished: killed or still running) and, when it finished, its metrics. Metrics
that come with a null (``<m>_null_mean``) get a layer curve per experiment: the
metric against layer (relative depth when the sweep spans models of different
depths), one line per configuration (model, SAE and every other override that
varies), the null as a band. The layer gradient is tested too, not only drawn: per
configuration, each such metric's Spearman rank correlation with relative depth and
its permutation p-value (``layer_gradient``), each from that configuration's own jobs.

Verdicts: each job's success bars (result.json's ``verdicts``) become ``verdict.<name>``
columns, and seed 000's layer-gradient bar ("a clear increase in cross-modal overlap from
early to late layers") is judged per overlap configuration from its layer gradient
(``gradient_verdicts``, also in ``verdicts.csv``), saying when the sweep has too few layers
for the permutation p to reach 0.05 at all.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.ticker import MaxNLocator
from omegaconf import OmegaConf
from scipy import stats

from xmodal.reporting.html import report_html
from xmodal.reporting.results import FAILURE_FILE, RESULT_FILE, atomic_write

log = logging.getLogger(__name__)

IDENTITY = ["experiment", "model", "num_layers", "layer", "layer_spec", "relative_depth", "sae", "sae_width", "dataset", "seed"]


def job_dirs(sweep_dir: Path) -> list[Path]:
    return sorted(p.parent.parent for p in sweep_dir.rglob(".hydra/overrides.yaml") if "wandb" not in p.parts)


def job_row(sweep_dir: Path, job_dir: Path) -> dict:
    overrides = [str(o) for o in OmegaConf.load(job_dir / ".hydra" / "overrides.yaml")]
    row: dict = {"job": str(job_dir.relative_to(sweep_dir)), "overrides": " ".join(overrides)}
    for override in overrides:
        key, _, value = override.partition("=")
        row[f"override.{key.lstrip('+~')}"] = value
    result_path, failure_path = job_dir / RESULT_FILE, job_dir / FAILURE_FILE
    if result_path.exists():
        result = json.loads(result_path.read_text())
        row.update(status="ok", error="")
        row.update({k: result.get(k) for k in IDENTITY})
        row.update(result["metrics"])
        row.update({f"verdict.{name}": verdict["passed"] for name, verdict in result.get("verdicts", {}).items()})
        row["time_total_s"] = result["timings_s"].get("total")
        row["time_experiment_s"] = result["timings_s"].get("experiment")
        row["time_since_process_start_s"] = result["timings_s"].get("since_process_start")
    elif failure_path.exists():
        failure = json.loads(failure_path.read_text())
        row.update(status="failed", error=f"{failure['error_type']}: {failure['error']}")
    else:
        row.update(status="unfinished", error="no result.json: killed, preempted or still running")
    if row["status"] != "ok":
        config = OmegaConf.load(job_dir / ".hydra" / "config.yaml")
        row.update(experiment=config.experiment.name, model=config.model.name, sae=config.sae.name, dataset=config.dataset.name, layer_spec=str(config.layer))
    return row


def collect(sweep_dir: str | Path) -> pd.DataFrame:
    sweep_dir = Path(sweep_dir)
    rows = [job_row(sweep_dir, d) for d in job_dirs(sweep_dir)]
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    front = ["job", "status", "error", *[c for c in IDENTITY if c in frame.columns], "overrides"]
    return frame[front + [c for c in frame.columns if c not in front]]


def metrics_with_null(frame: pd.DataFrame) -> list[str]:
    return [c[: -len("_null_mean")] for c in frame.columns if c.endswith("_null_mean") and c[: -len("_null_mean")] in frame.columns]


def configuration_columns(frame: pd.DataFrame) -> list[str]:
    """The columns that tell one configuration from another in a sweep: experiment, model and SAE, and
    every override that varies across `frame`, except the layer (the x axis)."""
    varying = [c for c in frame.columns if c.startswith("override.") and c != "override.layer" and frame[c].fillna("").astype(str).nunique() > 1]
    return ["experiment", "model", "sae", *varying]


def layer_gradient(summary: pd.DataFrame, n_permutations: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Per configuration (experiment, model, SAE and every other override that varies, see
    configuration_columns) with two or more layers: each metric's Spearman rho with relative depth
    and a two-sided permutation p (exact over every ordering when the layers are few: 2 layers give
    p = 1, 4 layers give 24 orderings, so p is at least 1/12). Two jobs of one configuration at the
    same depth are not dropped to make a curve: the configuration's rows then carry no rho and p, and
    `note` names the jobs. `jobs` lists the jobs each row was computed from."""
    needed = {"status", "experiment", "model", "sae", "relative_depth"}
    if not needed <= set(summary.columns):
        return pd.DataFrame(columns=["experiment", "model", "sae", "metric", "n_layers", "spearman_rho", "p", "jobs", "note"])
    done = summary[summary["status"] == "ok"].dropna(subset=["relative_depth"])
    keys = configuration_columns(done)
    columns = [*keys, "metric", "n_layers", "spearman_rho", "p", "jobs", "note"]
    rows = []
    for values, frame in done.fillna({k: "" for k in keys[3:]}).groupby(keys, dropna=False):
        config = dict(zip(keys, values))
        jobs = " ".join(frame.sort_values("relative_depth")["job"])
        repeated = frame[frame.duplicated("relative_depth", keep=False)]
        if len(repeated):
            note = "several jobs at one depth, refused: " + ", ".join(sorted(repeated["job"]))
            rows += [
                {**config, "metric": metric, "n_layers": frame["relative_depth"].nunique(), "spearman_rho": np.nan, "p": np.nan, "jobs": jobs, "note": note}
                for metric in metrics_with_null(frame)
            ]
            continue
        if len(frame) < 2:
            continue
        depth = frame["relative_depth"].to_numpy(float)
        for metric in metrics_with_null(frame):
            values = frame[metric].to_numpy(float)
            keep = np.isfinite(values)
            if keep.sum() < 2 or np.ptp(values[keep]) == 0:
                continue
            test = stats.permutation_test(
                (values[keep],),
                lambda v: stats.spearmanr(depth[keep], v).statistic,
                permutation_type="pairings",
                n_resamples=n_permutations,
                alternative="two-sided",
                rng=np.random.default_rng(seed),
            )
            rows.append(
                {
                    **config,
                    "metric": metric,
                    "n_layers": int(keep.sum()),
                    "spearman_rho": float(test.statistic),
                    "p": float(test.pvalue),
                    "jobs": jobs,
                    "note": "",
                }
            )
    return pd.DataFrame(rows, columns=columns)


# The metric each study's layer-gradient bar is judged on. Seed 000: its primary CrossModal_Score,
# the correlation of a concept's text and image SAE codes over matched pairs (overlap's `pearson`).
GRADIENT_BARS = {"overlap": "pearson"}
GRADIENT_COLUMNS = ["experiment", "model", "sae", "metric", "n_layers", "spearman_rho", "p", "min_p", "passed", "bar", "note"]


def gradient_verdicts(gradient: pd.DataFrame, n_permutations: int = 1000) -> pd.DataFrame:
    """Seed 000's layer-gradient bar per configuration: `GRADIENT_BARS`'s metric rises with depth (rho > 0, p < 0.05).

    `min_p` is the smallest p the sweep's layers allow (exact two-sided test: 2 / n_layers!, so 1/12 with
    four layers); where it is 0.05 or more the bar cannot be met, and `note` says so.
    """
    rows = []
    for row in gradient.to_dict("records"):
        if GRADIENT_BARS.get(row.get("experiment")) != row["metric"] or not np.isfinite(row["p"]):
            continue
        n = int(row["n_layers"])
        min_p = max(2.0 / math.factorial(n), 2.0 / (n_permutations + 1)) if math.factorial(n) > n_permutations else 2.0 / math.factorial(n)
        note = f"{n} layers: p cannot go below {min_p:.3g}; sweep more layers (e.g. sae.all_layers=true)" if min_p >= 0.05 else ""
        rows.append(
            {
                **{k: row.get(k) for k in ("experiment", "model", "sae", "metric", "n_layers", "spearman_rho", "p")},
                "min_p": min_p,
                "passed": bool(row["spearman_rho"] > 0 and row["p"] < 0.05),
                "bar": f"seed 000: {row['metric']} rises from early to late layers (Spearman rho with depth > 0, permutation p < 0.05)",
                "note": note,
            }
        )
    return pd.DataFrame(rows, columns=GRADIENT_COLUMNS)


def layer_curves(summary: pd.DataFrame, figure_dir: Path) -> list[Path]:
    """One figure per experiment and metric; one line per configuration (see configuration_columns)."""
    paths: list[Path] = []
    done = summary[summary["status"] == "ok"] if "status" in summary else summary.iloc[0:0]
    for experiment, frame in done.groupby("experiment"):
        x = "relative_depth" if frame["num_layers"].nunique() > 1 else "layer"
        keys = configuration_columns(frame)[1:]
        frame = frame.fillna({k: "" for k in keys[2:]})
        for metric in metrics_with_null(frame):
            fig, ax = plt.subplots(figsize=(6, 3.8))
            for values, line in frame.groupby(keys):
                line = line.sort_values(x)
                model, sae, *varying = values
                label = " / ".join([model, sae, *(f"{k.removeprefix('override.')}={v}" for k, v in zip(keys[2:], varying))])
                (drawn,) = ax.plot(line[x], line[metric], marker="o", label=label)
                lo, hi = f"{metric}_null_q025", f"{metric}_null_q975"
                if lo in line and hi in line and line[lo].notna().all():
                    ax.fill_between(line[x], line[lo], line[hi], color=drawn.get_color(), alpha=0.18, lw=0)
                ax.plot(line[x], line[f"{metric}_null_mean"], ls="--", color=drawn.get_color(), lw=1)
            ax.set_xlabel("relative depth (layer / last layer)" if x == "relative_depth" else "decoder layer")
            if x == "layer":
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylabel(metric)
            ax.set_title(f"{experiment}: {metric} by layer\n(dashed: null mean; band: null 95% interval)", fontsize=9)
            ax.legend(fontsize=7)
            path = figure_dir / f"{experiment}__{metric}.png"
            atomic_write(path, lambda p: fig.savefig(p, dpi=120, bbox_inches="tight", format="png"))
            plt.close(fig)
            paths.append(path)
    return paths


def overhead_line(summary: pd.DataFrame, wall_s: float | None, sequential: bool) -> str | None:
    """Time per job not spent in the experiment itself: startup, imports, Hydra, setup, loading."""
    ran = summary[summary["status"] == "ok"] if len(summary) else summary
    if not len(ran) or "time_experiment_s" not in ran:
        return None
    in_experiments = float(ran["time_experiment_s"].fillna(0).sum())
    if sequential and wall_s is not None:
        per_job = (wall_s - in_experiments) / len(summary)
        return f"Wall time {wall_s:.1f} s for {len(summary)} jobs in one process; inside experiments {in_experiments:.1f} s; overhead per job {per_job:.1f} s."
    if not sequential and "time_since_process_start_s" in ran:
        per_job = float((ran["time_since_process_start_s"] - ran["time_experiment_s"]).mean())
        wall = f"Wall time {wall_s:.1f} s; " if wall_s is not None else ""
        return f"{wall}one process per job: overhead per job (interpreter start, imports, Hydra, setup) {per_job:.1f} s on average."
    return None


def report_markdown(
    sweep_dir: Path, summary: pd.DataFrame, figures: list[Path], wall_s: float | None, sequential: bool = True, gradient: pd.DataFrame | None = None
) -> str:
    counts = summary["status"].value_counts().to_dict() if len(summary) else {}
    lines = [
        f"# Sweep report: `{sweep_dir.name}`",
        "",
        f"{len(summary)} jobs: {counts.get('ok', 0)} finished, {counts.get('failed', 0)} failed, "
        f"{counts.get('unfinished', 0)} unfinished. Table: `summary.parquet` / `summary.csv`.",
    ]
    overhead = overhead_line(summary, wall_s, sequential)
    if overhead:
        lines += ["", overhead]
    problems = summary[summary["status"] != "ok"] if len(summary) else summary
    if len(problems):
        lines += ["", "## Jobs that did not finish", "", "| job | status | error |", "|---|---|---|"]
        lines += [f"| `{r.job}` | {r.status} | {str(r.error).replace('|', '/')} |" for r in problems.itertuples()]
    if figures:
        lines += ["", "## Layer curves", ""]
        lines += [f"![{p.stem}]({p.relative_to(sweep_dir)})" for p in figures]
    done = summary[summary["status"] == "ok"] if len(summary) else summary
    key_metrics = [m for m in metrics_with_null(done)][:4]
    if len(done) and key_metrics:
        cols = [c for c in ["model", "sae", "layer", "relative_depth"] if c in done] + [
            c for m in key_metrics for c in (m, f"{m}_null_mean", f"{m}_p") if c in done
        ]
        lines += ["", "## Results", "", done[cols].sort_values(cols[:3]).to_markdown(index=False, floatfmt=".3g")]
    if gradient is not None and len(gradient):
        lines += ["", "## Layer gradient (Spearman rho with relative depth, permutation p)", "", gradient.to_markdown(index=False, floatfmt=".3g")]
    verdict_columns = [c for c in done.columns if c.startswith("verdict.")] if len(done) else []
    bars = gradient_verdicts(gradient) if gradient is not None and len(gradient) else pd.DataFrame()
    if verdict_columns or len(bars):
        lines += ["", "## Verdicts (the plan's success bars; the bars are in each result.json and verdicts.csv)", ""]
        if verdict_columns:
            cols = [c for c in ["job", "model", "layer"] if c in done] + verdict_columns
            lines += [done[cols].to_markdown(index=False), ""]
        if len(bars):
            lines += [bars.drop(columns="bar").to_markdown(index=False, floatfmt=".3g")]
    return "\n".join(lines) + "\n"


def das_contact_sheets(summary: pd.DataFrame, sweep_dir: Path) -> list[Path]:
    """One sheet per model: DAS images with concepts as rows and jobs (layers) as columns.

    When the sweep varies more than the layer, each column also names the overrides that vary.
    """
    from PIL import Image

    from xmodal.reporting.figures import image_grid

    paths: list[Path] = []
    done = summary[(summary["status"] == "ok") & (summary["experiment"] == "das")] if "experiment" in summary else summary.iloc[0:0]
    for model, frame in done.groupby("model"):
        varying = [c for c in frame.columns if c.startswith("override.") and c != "override.layer" and frame[c].astype(str).nunique() > 1]
        frame = frame.sort_values(["layer", *varying])
        columns = {
            "\n".join([f"layer {int(row['layer'])}", *(f"{c.rsplit('.', 1)[-1]}={row[c]}" for c in varying)]): sweep_dir / row["job"] / "images"
            for _, row in frame.iterrows()
        }
        concepts = sorted({p.stem.removeprefix("das_") for d in columns.values() for p in d.glob("das_*.png")})
        if not concepts:
            continue
        grid = [[Image.open(d / f"das_{c}.png").copy() if (d / f"das_{c}.png").exists() else None for d in columns.values()] for c in concepts]
        fig = image_grid(grid, concepts, list(columns), f"DAS contact sheet: {model}")
        path = sweep_dir / "figures" / f"das__contact_sheet__{model}.png"
        atomic_write(path, lambda p: fig.savefig(p, dpi=120, bbox_inches="tight", format="png"))
        plt.close(fig)
        paths.append(path)
    return paths


def write_sweep_report(sweep_dir: str | Path, wall_s: float | None = None, sequential: bool = True) -> pd.DataFrame:
    """Write summary.parquet/.csv, figures/, report.md and report.html into the sweep directory."""
    sweep_dir = Path(sweep_dir)
    summary = collect(sweep_dir)
    atomic_write(sweep_dir / "summary.parquet", lambda p: summary.to_parquet(p, index=False))
    atomic_write(sweep_dir / "summary.csv", lambda p: summary.to_csv(p, index=False))
    figures = layer_curves(summary, sweep_dir / "figures") + das_contact_sheets(summary, sweep_dir) if len(summary) else []
    gradient = layer_gradient(summary)
    atomic_write(sweep_dir / "layer_gradient.csv", lambda p: gradient.to_csv(p, index=False))
    bars = gradient_verdicts(gradient)
    atomic_write(sweep_dir / "verdicts.csv", lambda p: bars.to_csv(p, index=False))
    text = report_markdown(sweep_dir, summary, figures, wall_s, sequential, gradient)
    atomic_write(sweep_dir / "report.md", lambda p: Path(p).write_text(text))
    done = summary[summary["status"] == "ok"] if len(summary) else summary
    page = report_html(sweep_dir, summary, figures, metrics_with_null(done)[:4], overhead_line(summary, wall_s, sequential), gradient)
    atomic_write(sweep_dir / "report.html", lambda p: Path(p).write_text(page, encoding="utf-8"))
    log.info("Sweep report: %s and report.html (%d jobs)", sweep_dir / "report.md", len(summary))
    return summary
