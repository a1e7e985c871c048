"""Linear probes: the torch solver against scikit-learn's, concept-grouped folds, the
within-category transfer null, and seed 003's low-data sweep on the organism."""

from __future__ import annotations

import json

import numpy as np
import pytest

from xmodal.metrics.probes import transfer, within_modality


def codes_like_an_sae(n_classes: int, per_class: int, n_features: int, seed: int, signal: float = 0.6) -> tuple[np.ndarray, np.ndarray]:
    """Non-negative, mostly-zero codes with a class-dependent mean: the shape of pooled SAE codes."""
    rng = np.random.default_rng(seed)
    y = np.repeat([f"concept{i:02d}" for i in range(n_classes)], per_class)
    centres = rng.normal(size=(n_classes, n_features)) * signal
    x = np.maximum(rng.normal(size=(len(y), n_features)) + centres[np.unique(y, return_inverse=True)[1]], 0)
    x *= rng.random(n_features) < 0.5  # dead features, as an SAE has
    return x, y


SOLVER_CASES = {
    "cross-validated": {},
    "budget": {"budget": 10},
    "binarised": {"binarise": True},
    "low-data split": {"train_fraction": 0.5},
    "train per class": {"train_per_class": 3},
}


@pytest.mark.parametrize("case", SOLVER_CASES)
def test_torch_probe_matches_sklearn_within_a_modality(case):
    options = dict(SOLVER_CASES[case])
    x, y = codes_like_an_sae(n_classes=16, per_class=6, n_features=192, seed=1)
    if options.pop("binarise", False):
        x = (x > 0.5).astype(float)
    scores = {solver: within_modality(x, y, 0, 5, solver=solver, n_jobs=1, **options) for solver in ("torch", "sklearn")}
    torch_score, reference = scores["torch"], scores["sklearn"]
    assert abs(torch_score.accuracy - reference.accuracy) <= 0.02
    assert abs(torch_score.macro_f1 - reference.macro_f1) <= 0.02
    assert abs(torch_score.shuffled_mean - reference.shuffled_mean) <= 0.02  # the same permutations and folds
    assert (torch_score.n_train, torch_score.n_test, torch_score.chance) == (reference.n_train, reference.n_test, reference.chance)
    assert torch_score.accuracy > 3 * torch_score.chance  # the data carry the class: a real comparison, not two chance levels


def test_torch_probe_matches_sklearn_across_modalities_and_on_two_grouped_classes():
    x, y = codes_like_an_sae(n_classes=16, per_class=6, n_features=192, seed=2)
    other = np.maximum(x + np.random.default_rng(3).normal(size=x.shape) * 0.8, 0)
    across = {solver: transfer(x, y, other, y, 0, 10, budget=20, solver=solver) for solver in ("torch", "sklearn")}
    assert abs(across["torch"].accuracy - across["sklearn"].accuracy) <= 0.02
    assert abs(across["torch"].shuffled_mean - across["sklearn"].shuffled_mean) <= 0.02
    # an attribute probe: two classes (scikit-learn's binary probe), each source image's variants as a group
    labels, groups = np.tile(["dark", "bright"], len(x)), np.repeat(np.arange(len(x)), 2)
    variants = np.repeat(x, 2, axis=0) * np.tile([0.7, 1.3], len(x))[:, None]
    attribute = {solver: within_modality(variants, labels, 0, 5, groups=groups, solver=solver, n_jobs=1) for solver in ("torch", "sklearn")}
    assert abs(attribute["torch"].accuracy - attribute["sklearn"].accuracy) <= 0.02


@pytest.mark.parametrize("budget", [None, 4])
def test_torch_probe_weights_reproduce_its_predictions(budget):
    from xmodal.metrics.torch_probe import fit_probes

    x, y = codes_like_an_sae(n_classes=3, per_class=20, n_features=12, seed=4)
    for classes in (np.unique(y), np.unique(y)[:2]):  # three classes, and two (one coefficient row, as scikit-learn's)
        rows = np.isin(y, classes)
        codes = np.unique(y[rows], return_inverse=True)[1]
        fitted = fit_probes(x[rows], codes[None], np.ones((1, rows.sum()), bool), len(classes), budget)
        weights, names = fitted.weights(0, classes)
        z = (x[rows][:, weights["columns"]] - weights["scale_mean"]) / weights["scale_std"]
        decision = z @ weights["coef"].T + weights["intercept"]
        predicted = (decision[:, 0] > 0).astype(int) if len(classes) == 2 else decision.argmax(axis=1)
        assert (np.asarray(names)[predicted] == classes[fitted.predict(x[rows])[0]]).all()
        assert len(weights["columns"]) == (budget or 12) and fitted.converged.all()


def category_data(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """4 categories x 4 concepts x 6 samples; each concept has its own feature, categories share nothing."""
    rng = np.random.default_rng(seed)
    concepts = np.repeat([f"c{i:02d}" for i in range(16)], 6)
    categories = np.array([f"cat{int(c[1:]) // 4}" for c in concepts])
    x = np.eye(16)[np.unique(concepts, return_inverse=True)[1]] * 3 + rng.normal(size=(len(concepts), 16)) * 0.3
    return x, categories, concepts


def test_category_probe_keeps_each_concept_out_of_its_own_test_fold():
    """Codes that identify concepts but carry nothing shared by a category: a probe tested on
    concepts it was trained on reads the category perfectly (the leak); on held-out concepts, at chance."""
    x, categories, concepts = category_data()
    leaky = within_modality(x, categories, 0, 20, n_jobs=1)  # row-level folds: a concept's samples on both sides
    assert leaky.accuracy > 0.9
    for solver in ("torch", "sklearn"):
        grouped = within_modality(x, categories, 0, 20, concepts=concepts, solver=solver, n_jobs=1)
        assert grouped.accuracy < 0.5, solver  # chance 0.25; leaky folds read 1.0


def test_category_folds_need_two_concepts_per_category():
    from xmodal.errors import DatasetError

    x, categories, concepts = category_data()
    categories = np.where(concepts == "c00", "alone", categories)
    concepts = np.where(np.isin(concepts, ["c01", "c02", "c03"]), "c01", concepts)  # cat0 now one concept, plus "alone"
    with pytest.raises(DatasetError, match="holds a single concept"):
        within_modality(x, categories, 0, 5, concepts=concepts)


def test_within_category_null_rejects_transfer_shared_only_by_category():
    """Text codes carry the concept and its category; image codes only the category. Against a null
    over all concepts the category alone passes as transfer (p small); against labels shuffled
    within categories it does not."""
    rng = np.random.default_rng(0)
    concepts = np.repeat([f"c{i:02d}" for i in range(16)], 4)
    index = np.unique(concepts, return_inverse=True)[1]
    category = index // 4
    rows = np.arange(len(concepts))
    text, image = np.zeros((len(concepts), 20)), np.zeros((len(concepts), 20))
    text[rows, category] = image[rows, category] = 3.0  # shared by both modalities: the category only
    text[rows, 4 + index] = 3.0  # the concept, in text only
    text, image = (codes + rng.normal(size=codes.shape) * 0.3 for codes in (text, image))
    over_all = transfer(text, concepts, image, concepts, 0, 50)
    within = transfer(text, concepts, image, concepts, 0, 50, null_groups=category)
    assert over_all.accuracy > 0.15 and over_all.p_value < 0.05  # about 1/4: the right category, a random concept in it
    assert within.p_value > 0.05 and within.shuffled_mean > 0.15
    assert within.accuracy == over_all.accuracy  # the same probe; only its null changed


@pytest.mark.slow  # in-process, but it extracts the organism's codes: 594 s on 2 cores shared with other jobs
def test_seed_003_low_data_sweep_finishes_on_the_organism(tmp_path):
    """`-m experiment=probe experiment.train_split=1:9,5:5`: at 1:9 the organism has too few text (6) and
    image (4) samples per concept for a within-modality probe; those probes are skipped and result.json says so."""
    from hydra import compose, initialize_config_dir

    from xmodal.conf_dir import CONF_DIR
    from xmodal.run import JobInfo, run_job

    common = ["experiment=probe", "experiment.n_permutations=5", "experiment.attributes=[]", f"paths.activation_cache={tmp_path / 'cache'}"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        for split in ("1:9", "5:5"):
            cfg = compose(config_name="config", overrides=[*common, f"experiment.train_split={split}"])
            out = tmp_path / split.replace(":", "_")
            run_job(cfg, JobInfo(out, f"train_split={split}", "sweep", True, [f"experiment.train_split={split}"]))
            result = json.loads((out / "result.json").read_text())
            assert result["status"] == "ok"
            metrics = result["metrics"]
            if split == "1:9":
                assert metrics["text_to_text_skipped"] == 1 and metrics["image_to_image_skipped"] == 1
                assert "tables/skipped_probes.parquet" in result["tables"] and "text_to_text_accuracy" not in metrics
                assert 0 <= metrics["text_to_image_accuracy"] <= 1  # the transfer probes still run
            else:
                assert "text_to_text_skipped" not in metrics and metrics["text_to_text_accuracy"] > metrics["text_to_text_chance"]


def test_within_category_null_with_category_labels_is_refused():
    from xmodal.errors import ConfigError
    from xmodal.experiments.probe.config import ProbeConfig

    with pytest.raises(ConfigError, match="experiment.null=within_category .* changes nothing"):
        ProbeConfig(label="category", null="within_category").validate()


def test_torch_probe_fits_the_same_probes_in_batches_of_any_size():
    from xmodal.metrics.torch_probe import fit_probes

    x, y = codes_like_an_sae(n_classes=4, per_class=10, n_features=60, seed=5)
    rng = np.random.default_rng(0)
    codes = np.unique(y, return_inverse=True)[1]
    labels, train = np.stack([codes, rng.permutation(codes), rng.permutation(codes)]), rng.random((3, len(y))) < 0.8
    together, one_by_one = fit_probes(x, labels, train, 4), fit_probes(x, labels, train, 4, max_batch=1)
    assert (together.predict(x) == one_by_one.predict(x)).all() and np.allclose(together.coef, one_by_one.coef, atol=1e-4)
