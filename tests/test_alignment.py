"""RepresentationAlignment: CKA, mutual k-NN and CKNNA against planted truth, and the study's contract."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from tests.conftest import run_cli
from tests.planted import planted_codes
from xmodal.errors import ConfigError
from xmodal.experiments.alignment.config import AlignmentConfig
from xmodal.experiments.alignment.experiment import RepresentationAlignment
from xmodal.metrics import alignment as A
from xmodal.metrics.statistics import repairings


def latent_concepts(n_concepts: int, seed: int, n_factors: int = 6) -> np.ndarray:
    """Planted concept structure: each concept a point in a few latent factors."""
    return np.random.default_rng(seed).normal(size=(n_concepts, n_factors))


def seen_through(latent: np.ndarray, width: int, noise: float, seed: int) -> np.ndarray:
    """One modality's view of the concepts: its own random linear read-out of the latent, plus noise."""
    rng = np.random.default_rng(seed)
    readout = rng.normal(size=(latent.shape[1], width))
    return latent @ readout + noise * rng.normal(size=(latent.shape[0], width)) * np.sqrt(latent.shape[1])


def scores_with_null(a: np.ndarray, b: np.ndarray, k: int = 5):
    study = RepresentationAlignment(AlignmentConfig(k_neighbours=k, n_permutations=200))
    scores, null = study.alignment_with_null(a, b, np.zeros(len(a), dtype=int), seed=0)
    return scores.set_index("metric"), null


def test_a_rotated_and_rescaled_copy_is_aligned_at_one():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(30, 40))
    rotation, _ = np.linalg.qr(rng.normal(size=(40, 40)))
    scores = A.alignment_scores(a, 3.0 * a @ rotation, k=5)
    exact = {name: 1.0 for name in A.ALIGNMENT_METRICS if name != "cknna"}
    assert {name: scores[name] for name in exact} == pytest.approx(exact, abs=1e-9)
    assert scores["cknna"] == pytest.approx(1.0, abs=1e-3)  # the reference adds 1e-6 to its denominator


def test_a_shared_representation_is_near_one_and_far_above_its_null():
    """Text and image read the same planted concept structure out through different bases and widths
    (no dimension in common), with noise: CKA compares how the concepts are arranged, not features."""
    latent = latent_concepts(32, seed=0)
    text, image = seen_through(latent, 64, 0.1, seed=1), seen_through(latent, 48, 0.1, seed=2)
    scores, _ = scores_with_null(text, image)
    assert scores.loc["cka", "value"] > 0.9 and scores.loc["cka_unbiased", "value"] > 0.9
    assert scores.loc["mutual_knn", "value"] > 0.75 and scores.loc["cknna", "value"] > 0.85
    assert (scores["p"] < 0.01).all()
    assert (scores["value"] > scores["null_q975"]).all()


def test_an_unrelated_representation_sits_on_its_null():
    """Image structure planted independently of the text's: nothing but chance links the two."""
    text = seen_through(latent_concepts(32, seed=0), 64, 0.1, seed=1)
    image = seen_through(latent_concepts(32, seed=3), 48, 0.1, seed=2)
    scores, null = scores_with_null(text, image)
    assert (scores["p"] > 0.05).all()
    assert (scores["value"] <= scores["null_q975"]).all()
    assert set(null["metric"]) == set(A.ALIGNMENT_METRICS) and (null.groupby("metric").size() == 200).all()
    # the biased CKA of unrelated low-rank representations is far from 0: why every measure has its null
    assert scores.loc["cka", "null_mean"] > 0.1


def test_a_measure_that_is_undefined_reports_nan_not_a_p_value():
    """Concepts with disjoint features have a flat kernel off the diagonal: unbiased CKA is 0/0."""
    planted = planted_codes(n_concepts=12, pairs_per_concept=1, image_only_per_concept=0, text_only_per_concept=0, n_noise=0, fire_rate=1.0)
    flat = (planted.text > 0).astype(float)
    scores, _ = scores_with_null(flat, flat)
    assert np.isnan(scores.loc["cka_unbiased", "value"]) and np.isnan(scores.loc["cka_unbiased", "p"])


def test_the_within_category_null_separates_category_alignment_from_concept_alignment():
    """Four categories of eight concepts. Both sides share only the categories' structure: the plain
    null calls that aligned, the within-category null does not. Shared concept structure passes both."""
    categories = np.repeat(np.arange(4), 8)
    category_latent = latent_concepts(4, seed=0)[categories] * 3
    text = seen_through(category_latent + latent_concepts(32, seed=1), 64, 0.1, seed=2)
    image_categories_only = seen_through(category_latent + latent_concepts(32, seed=3), 48, 0.1, seed=4)
    image_concepts_too = seen_through(category_latent + latent_concepts(32, seed=1), 48, 0.1, seed=4)

    def p_values(image: np.ndarray, null: str) -> pd.Series:
        study = RepresentationAlignment(AlignmentConfig(n_permutations=200, null=null))
        groups = categories if null == "within_category" else np.zeros(32, dtype=int)
        return study.alignment_with_null(text, image, groups, seed=0)[0].set_index("metric")["p"]

    assert p_values(image_categories_only, "all")["cka"] < 0.01
    assert (p_values(image_categories_only, "within_category") > 0.05).all()
    assert (p_values(image_concepts_too, "within_category") < 0.01).all()


def test_repairings_keep_each_row_in_its_group():
    groups = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    for order in repairings(groups, 50, np.random.default_rng(0)):
        assert sorted(order) == list(range(9)) and (groups[order] == groups).all()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"k_neighbours": 0}, "experiment.k_neighbours=0 must be at least 1"),
        ({"compare": "models", "other_model": None}, "experiment.compare=models needs experiment.other_model"),
        ({"compare": "modality"}, "experiment.compare='modality'; use"),
        ({"other_model_overrides": ["sae.width=3"]}, "may only set model.* keys"),
    ],
)
def test_bad_settings_fail_before_a_model_loads(override, message):
    with pytest.raises(ConfigError, match=message.replace("*", r"\*").replace("(", r"\(")):
        RepresentationAlignment(AlignmentConfig(**override))


@pytest.mark.parametrize("k", [0, 24])
def test_k_outside_the_rows_is_an_error(k):
    a = np.random.default_rng(0).normal(size=(24, 8))
    with pytest.raises(ValueError, match="1 <= k < n"):
        A.mutual_knn(a, a, k)


def test_the_cli_writes_the_study_on_the_tiny_model(tmp_path):
    result = run_cli("experiment=alignment", "layer=2", "experiment.n_permutations=50", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    [job] = list((tmp_path / "outputs").rglob("result.json"))
    record = json.loads(job.read_text())
    assert record["status"] == "ok"
    for name in A.ALIGNMENT_METRICS:
        assert {name, f"{name}_null_mean", f"{name}_p"} <= set(record["metrics"])
        assert 0 < record["metrics"][f"{name}_p"] <= 1
    assert {"tables/alignment.parquet", "tables/null.parquet"} <= set(record["tables"])
    assert {"figures/kernels.png", "figures/null.png"} <= set(record["figures"])


def test_too_few_concepts_for_k_is_one_line_and_no_result(tmp_path):
    result = run_cli("experiment=alignment", "layer=2", "experiment.k_neighbours=500", cwd=tmp_path)
    assert result.returncode != 0
    assert "experiment.k_neighbours=500 needs more concepts" in result.stdout + result.stderr
    assert not list((tmp_path / "outputs").rglob("result.json"))


def test_a_model_compared_with_itself_is_aligned_at_one(tmp_path):
    result = run_cli(
        "experiment=alignment",
        "layer=2",
        "experiment.compare=models",
        "experiment.other_model=tiny",
        "experiment.modality=image",
        "experiment.n_permutations=50",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    [job] = list((tmp_path / "outputs").rglob("result.json"))
    metrics = json.loads(job.read_text())["metrics"]
    assert [metrics[name] for name in ("cka", "cka_unbiased", "mutual_knn")] == pytest.approx([1.0] * 3, abs=1e-6)
    assert metrics["cknna"] == pytest.approx(1.0, abs=1e-3)  # the reference adds 1e-6 to its denominator


def test_images_cannot_be_compared_with_a_text_only_model(tmp_path):
    result = run_cli("experiment=alignment", "layer=2", "experiment.compare=models", "experiment.modality=image", cwd=tmp_path)
    assert result.returncode != 0
    assert "experiment.other_model='tiny_text' reads no images" in result.stdout + result.stderr
    assert not list((tmp_path / "outputs").rglob("result.json"))
