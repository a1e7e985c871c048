"""Nulls strong enough for what the studies claim (issue 27, item 5), against planted truth."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from xmodal.activations.extract import LayerActivations
from xmodal.data.concepts import Concept
from xmodal.experiments.das.config import DASConfig
from xmodal.experiments.das.experiment import DASynthesis
from xmodal.experiments.lens.config import LensConfig
from xmodal.experiments.lens.experiment import LogitLens, among_concepts_hits
from xmodal.experiments.overlap.config import OverlapConfig
from xmodal.experiments.overlap.experiment import CrossModalOverlap
from xmodal.experiments.shift.experiment import RepresentationShift
from xmodal.experiments.steering.config import SteeringConfig
from xmodal.experiments.steering.experiment import SteeringEval
from xmodal.metrics import overlap as M
from xmodal.metrics.statistics import NullPairing, null_groups

CATEGORIES = np.repeat(["colour", "shape", "animal"], 4)  # 12 concepts, four per category


def category_codes(concept_level: bool, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Text and image codes (12 concepts x 90 features) that share their category's features; with
    `concept_level`, each concept's own features too. Everything else is modality-specific noise."""
    rng = np.random.default_rng(seed)
    text, image = np.zeros((12, 90)), np.zeros((12, 90))
    for i, category in enumerate(CATEGORIES):
        shared = 5 * list(dict.fromkeys(CATEGORIES)).index(category) + np.arange(5)  # features 0..14
        text[i, shared], image[i, shared] = 1 + 0.1 * rng.random(5), 1 + 0.1 * rng.random(5)
        text[i, 30 + rng.choice(30, 5, replace=False)] = 1  # text-only features
        image[i, 60 + rng.choice(30, 5, replace=False)] = 1  # image-only features
        if concept_level:
            text[i, 15 + i], image[i, 15 + i] = 1, 1
    return text, image


@pytest.mark.parametrize("concept_level", [False, True])
def test_overlap_within_category_null_keeps_category_structure_at_its_null(concept_level):
    text, image = category_codes(concept_level)
    study = CrossModalOverlap(OverlapConfig(top_k=8, n_permutations=300))
    top_t, top_i = M.top_k_features(text, 8), M.top_k_features(image, 8)
    matrices = study.pair_statistics(text, image, top_t, top_i)

    def p(null: NullPairing) -> pd.Series:
        table, _ = study.null_distributions(text, image, matrices, null_groups(list(CATEGORIES), null), seed=0)
        return table.set_index("statistic")["p_value"]

    assert p(NullPairing.all)["jaccard_topk"] < 0.01  # across all concepts, category structure passes
    within = p(NullPairing.within_category)
    assert (within["jaccard_topk"] < 0.01) == concept_level, within


def category_only_images(concept_level: bool, seed: int = 0) -> LayerActivations:
    """Word residuals at random; each image's tokens follow its own word (`concept_level`) or a random
    word of its category, plus noise."""
    rng = np.random.default_rng(seed)
    words = rng.normal(size=(12, 32))
    owners = np.repeat(np.arange(12), 4)
    sources = owners if concept_level else np.array([rng.choice(np.flatnonzero(CATEGORIES == CATEGORIES[o])) for o in owners])
    image_tokens = words[sources][:, None, :] + 0.3 * rng.normal(size=(len(owners), 6, 32))
    names = [f"c{i}" for i in range(12)]
    return LayerActivations(
        layer=0,
        concepts=names,
        text_tokens=torch.tensor(words, dtype=torch.float32),
        text_offsets=torch.arange(13),
        image_concepts=[names[o] for o in owners],
        image_sources=[f"img{i}" for i in range(len(owners))],
        image_tokens=torch.tensor(image_tokens, dtype=torch.float32),
        image_eoi=torch.zeros(len(owners), 32),
    )


@pytest.mark.parametrize("concept_level", [False, True])
def test_lens_within_category_null_keeps_category_structure_at_its_null(concept_level):
    acts = category_only_images(concept_level)
    study = LogitLens(LensConfig(n_permutations=300))
    hits = {"image_nearest_word": among_concepts_hits(study.nearest_word_similarity(acts), k=1)}
    labels = {"image_nearest_word": np.array([acts.concepts.index(c) for c in acts.image_concepts])}

    def p(null: NullPairing) -> float:
        return study.rates_with_null(hits, labels, null_groups(list(CATEGORIES), null), seed=0).iloc[0]["p"]

    assert p(NullPairing.all) < 0.01
    assert (p(NullPairing.within_category) < 0.01) == concept_level


def test_crossmodal_feature_p_is_corrected_for_choosing_features_by_their_r():
    """Unrelated text and image codes over many features: chance alone puts some r above 0.6 with 8
    concepts, and their uncorrected Pearson p is small. One planted feature is truly shared."""
    rng = np.random.default_rng(0)
    text, image = rng.random((8, 3000)), rng.random((8, 3000))
    image[:, 0] = 2 * text[:, 0]  # r = 1: the one real cross-modal feature
    concepts = [Concept(f"c{i}", f"c{i}") for i in range(8)]
    study = CrossModalOverlap(OverlapConfig(n_permutations=200))
    table = study.crossmodal_features(text, image, study.feature_correlations(text, image), concepts, np.zeros(8, dtype=int), seed=0)
    chance = table[table["feature"] != 0]
    assert len(chance) > 50 and (chance["r"] > 0.9).any()
    assert (chance["p_value"] > 0.05).all()
    assert table.set_index("feature").loc[0, "p_value"] == pytest.approx(1 / 201)


@pytest.mark.parametrize("mode", ["clamp", "add"])
def test_steering_other_layer_control_steers_in_the_main_conditions_mode(mode):
    study = SteeringEval(SteeringConfig(mode=mode))
    conditions = study.conditions(layer=9, control_layer=5, feature=3, random_feature=7, scale=1.0, random_scale=1.2)
    assert [c[0] for c in conditions] == ["feature", "random_feature", "feature_other_layer"]
    assert {c[4] for c in conditions} == {mode}
    assert conditions[2][1:4] == (5, 3, 1.0)  # the same feature and scale, at the control layer


def test_shift_reports_the_distance_with_an_interval_that_tells_two_checkpoints_apart():
    rng = np.random.default_rng(0)

    def prompts(cosine: float) -> pd.DataFrame:
        cosines = np.clip(cosine + 0.03 * rng.standard_normal(40), -1, 1)
        return pd.DataFrame({"cosine": np.append(cosines, np.nan), "relative_l2": np.append(1 - cosines, np.nan)})

    close, far = prompts(0.95), prompts(0.8)
    near, distant = RepresentationShift.distances(close, seed=0), RepresentationShift.distances(far, seed=0)
    assert near["cosine_distance"] == pytest.approx(1 - np.nanmean(close["cosine"]))
    assert near["cosine_distance_n_prompts"] == 40  # the prompt without a cosine is left out
    for d in (near, distant):
        assert d["cosine_distance_ci_low"] < d["cosine_distance"] < d["cosine_distance_ci_high"]
        assert d["relative_l2_ci_low"] < d["relative_l2_ci_high"]
    assert near["cosine_distance_ci_high"] < distant["cosine_distance_ci_low"]
    assert RepresentationShift.distances(close, seed=0) == near  # seeded


def test_das_final_cosine_has_its_null_and_no_constant_control():
    rng = np.random.default_rng(0)
    cosines = 0.1 * rng.standard_normal((6, 6)) + 0.5 * np.eye(6)  # image i made for concept i
    metrics = DASynthesis(DASConfig(n_permutations=500)).cosine_metrics(cosines, seed=0)
    assert "grey_cosine" not in metrics  # the grey image is the baseline, not a measured control
    null = np.array([np.mean(cosines[p, np.arange(6)]) for p in (np.random.default_rng(0).permutation(6) for _ in range(500))])
    assert metrics["final_cosine"] == pytest.approx(np.mean(np.diag(cosines)))
    assert metrics["final_cosine_p"] == pytest.approx((np.sum(null >= metrics["final_cosine"]) + 1) / 501)
