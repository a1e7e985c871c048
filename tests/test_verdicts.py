"""Seed 000's success bars as explicit verdicts: in result.json, in the sweep report and in verdicts.csv."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from tests.conftest import run_in_process
from xmodal.reporting.sweep import gradient_verdicts, write_sweep_report


def test_overlap_records_the_feature_bar_and_a_sweep_judges_the_layer_gradient(tmp_path):
    sweep = tmp_path / "sweep"
    overrides = (
        "-m",
        "experiment=overlap",
        "layer=0,3",
        "experiment.n_permutations=20",
        "experiment.min_crossmodal_features=1",
        f"paths.activation_cache={tmp_path / 'cache'}",
    )
    assert run_in_process(*overrides, run_dir=sweep) == 0
    results = [json.loads(p.read_text()) for p in sorted(sweep.rglob("result.json"))]
    assert len(results) == 2
    for result in results:
        verdict, metrics = result["verdicts"]["features_crossmodal"], result["metrics"]
        assert (
            verdict["passed"] == (metrics["n_crossmodal_features_significant"] >= 1) and verdict["n_features"] == metrics["n_crossmodal_features_significant"]
        )
        assert (
            "at least 1 features with text-image r > 0.6" in verdict["bar"] and metrics["n_crossmodal_features_significant"] <= metrics["n_crossmodal_features"]
        )
    report = (sweep / "report.md").read_text()
    assert "## Verdicts" in report and "verdict.features_crossmodal" in report
    bars = pd.read_csv(sweep / "verdicts.csv")
    assert list(bars["metric"]) == ["pearson"] and bars["n_layers"].iloc[0] == 2
    assert bars["min_p"].iloc[0] == 1 and not bars["passed"].iloc[0]  # two layers cannot reach p < 0.05
    assert "2 layers: p cannot go below 1" in bars["note"].iloc[0]
    write_sweep_report(sweep)  # rewriting is idempotent
    pd.testing.assert_frame_equal(pd.read_csv(sweep / "verdicts.csv"), bars)


def test_the_layer_gradient_bar_needs_a_rise_beyond_the_null():
    gradient = pd.DataFrame(
        [
            {"experiment": "overlap", "model": "m", "sae": "s", "metric": "pearson", "n_layers": 12, "spearman_rho": 0.9, "p": 0.002},
            {"experiment": "overlap", "model": "m2", "sae": "s", "metric": "pearson", "n_layers": 12, "spearman_rho": -0.9, "p": 0.002},
            {"experiment": "overlap", "model": "m", "sae": "s", "metric": "jaccard_topk", "n_layers": 12, "spearman_rho": 0.9, "p": 0.002},
            {"experiment": "mds", "model": "m", "sae": "s", "metric": "pearson", "n_layers": 12, "spearman_rho": 0.9, "p": 0.002},
            {"experiment": "overlap", "model": "m4", "sae": "s", "metric": "pearson", "n_layers": 4, "spearman_rho": 1.0, "p": 1 / 12},
        ]
    )
    bars = gradient_verdicts(gradient)
    assert list(bars["model"]) == ["m", "m2", "m4"] and list(bars["passed"]) == [True, False, False]  # a fall is no gradient
    assert bars["min_p"].iloc[0] == pytest.approx(2 / 1001) and (bars["note"].iloc[:2] == "").all()
    assert bars["min_p"].iloc[2] == pytest.approx(1 / 12) and "4 layers: p cannot go below 0.0833" in bars["note"].iloc[2]  # Gemma Scope 2's four layers
