"""The sweep report's tables from a summary (no jobs run): layer gradients and curves per configuration."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from xmodal.reporting.sweep import layer_curves, layer_gradient


def summary_of(jobs: list[dict]) -> pd.DataFrame:
    rows = []
    for job in jobs:
        layer, width = job["layer"], job["width"]
        rows.append(
            {
                "job": f"layer={layer},sae.width={width}",
                "status": "ok",
                "experiment": "overlap",
                "model": "organism",
                "sae": "organism",
                "num_layers": 18,
                "layer": layer,
                "relative_depth": layer / 17,
                "override.layer": str(job.get("spec", layer)),
                "override.sae.width": str(width),
                "jaccard": job["jaccard"],
                "jaccard_null_mean": 0.1,
            }
        )
    return pd.DataFrame(rows)


def test_layer_gradient_has_one_row_per_width_each_from_its_own_jobs():
    rising = {5: 0.2, 9: 0.3, 12: 0.5, 15: 0.6}  # width 512: rises with depth
    falling = {5: 0.6, 9: 0.4, 12: 0.35, 15: 0.1}  # width 1024: falls
    summary = summary_of(
        [{"layer": layer, "width": 512, "jaccard": v} for layer, v in rising.items()]
        + [{"layer": layer, "width": 1024, "jaccard": v} for layer, v in falling.items()]
    )
    gradient = layer_gradient(summary).set_index("override.sae.width")
    assert sorted(gradient.index) == ["1024", "512"] and (gradient["metric"] == "jaccard").all()
    assert gradient.loc["512", "spearman_rho"] == pytest.approx(1.0) and gradient.loc["1024", "spearman_rho"] == pytest.approx(-1.0)
    assert (gradient["n_layers"] == 4).all()
    assert gradient.loc["512", "p"] == pytest.approx(2 / 24)  # exact: 24 orderings, two reach |rho| = 1
    assert all("sae.width=512" in job for job in gradient.loc["512", "jobs"].split())


def test_two_layers_give_a_row_with_the_exact_p():
    summary = summary_of([{"layer": 5, "width": 512, "jaccard": 0.2}, {"layer": 9, "width": 512, "jaccard": 0.3}])
    (row,) = layer_gradient(summary).itertuples()
    assert (row.n_layers, row.spearman_rho, row.p) == (2, pytest.approx(1.0), pytest.approx(1.0))


def test_two_jobs_at_one_depth_are_refused_not_dropped():
    summary = summary_of(
        [
            {"layer": 5, "width": 512, "jaccard": 0.2},
            {"layer": 9, "width": 512, "jaccard": 0.3},
            {"layer": 9, "width": 512, "jaccard": 0.9, "spec": "preset:1"},
            {"layer": 12, "width": 512, "jaccard": 0.4},
        ]
    )
    (row,) = layer_gradient(summary).itertuples()
    assert np.isnan(row.spearman_rho) and np.isnan(row.p)
    assert "several jobs at one depth, refused" in row.note


def test_layer_curves_draw_one_line_per_configuration(tmp_path, monkeypatch):
    import matplotlib.axes

    drawn: list[str] = []
    plot = matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot", lambda self, *a, **k: (drawn.append(k["label"]) if "label" in k else None) or plot(self, *a, **k))
    summary = summary_of([{"layer": layer, "width": w, "jaccard": 0.1 * layer} for layer in (5, 9) for w in (512, 1024)])
    (path,) = layer_curves(summary, tmp_path)
    assert path.exists()
    assert sorted(drawn) == ["organism / organism / sae.width=1024", "organism / organism / sae.width=512"]


def test_report_html_shows_the_figures_a_job_wrote_not_whatever_lies_in_its_folder(tmp_path):
    import json

    from PIL import Image

    from xmodal.reporting.html import report_html

    job = tmp_path / "layer=5"
    (job / "figures").mkdir(parents=True)
    for name in ("feature_a", "feature_stale"):
        Image.new("RGB", (4, 4), (255, 0, 0) if name == "feature_a" else (0, 0, 255)).save(job / "figures" / f"{name}.png")
    (job / "result.json").write_text(json.dumps({"status": "ok", "figures": ["figures/feature_a.png"]}))
    summary = summary_of([{"layer": 5, "width": 512, "jaccard": 0.2}]).assign(job="layer=5")
    page = report_html(tmp_path, summary, [], ["jaccard"], None)
    assert 'alt="feature_a"' in page and "feature_stale" not in page
