"""The metrics recover planted ground truth: this is the proof they measure what they claim."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from planted import planted_codes

from xmodal.metrics import overlap as M
from xmodal.metrics import statistics as S
from xmodal.metrics.modality import dominance_groups, modality_dominance, swapped_modalities

EXPECTED_GROUP = {"shared": "CrossD", "image": "ImgD", "text": "TextD"}


def per_concept_means(codes: np.ndarray, labels: np.ndarray) -> np.ndarray:
    return pd.DataFrame(codes).groupby(labels).mean().to_numpy()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mds_recovers_planted_modality_groups(seed):
    planted = planted_codes(seed=seed)
    mds, _ = modality_dominance(planted.image, planted.text)
    groups, _, _ = dominance_groups(mds)
    planted_roles = planted.roles != "noise"
    expected = np.array([EXPECTED_GROUP.get(r, "") for r in planted.roles])
    accuracy = np.mean(groups[planted_roles] == expected[planted_roles])
    assert accuracy >= 0.9, f"only {accuracy:.0%} of planted features in the right group"
    for role, group in EXPECTED_GROUP.items():
        assert np.mean(groups[planted.roles == role] == group) >= 0.9, role


def test_mds_without_modality_signal_has_no_dominant_tails():
    planted = planted_codes(seed=0)
    rng = np.random.default_rng(0)
    image, text = swapped_modalities(planted.image, planted.text, rng)
    mds, _ = modality_dominance(image, text)
    # Swapping at random pulls image-only and text-only features to the middle.
    assert abs(np.nanmean(mds[planted.roles == "image"]) - 0.5) < 0.15
    assert np.nanstd(mds) < np.nanstd(modality_dominance(planted.image, planted.text)[0]) / 2


def test_mds_pairs_silent_in_both_modalities_are_left_out():
    image = np.array([[1.0, 0.0], [0.0, 0.0], [3.0, 0.0]])
    text = np.array([[1.0, 0.0], [0.0, 0.0], [1.0, 0.0]])
    mds, counts = modality_dominance(image, text)
    assert mds[0] == pytest.approx((0.5 + 0.75) / 2) and counts[0] == 2
    assert np.isnan(mds[1]) and counts[1] == 0


def test_overlap_ranks_planted_shared_features_first():
    planted = planted_codes(seed=0)
    text = per_concept_means(planted.text, planted.labels)
    image = per_concept_means(planted.image, planted.labels)
    r = M.feature_correlations(text, image)
    n_shared = int(np.sum(planted.roles == "shared"))
    ranked = np.argsort(-np.nan_to_num(r, nan=-np.inf), kind="stable")[:n_shared]
    assert np.all(planted.roles[ranked] == "shared")
    assert (r[planted.roles == "shared"] > 0.6).all()  # every planted cross-modal feature passes the bar


def test_overlap_matched_pairs_beat_their_null_only_when_features_are_shared():
    with_shared = planted_codes(seed=0)
    without = planted_codes(seed=0, shared_per_concept=0, image_only_per_concept=6, text_only_per_concept=6)
    for planted, should_beat in [(with_shared, True), (without, False)]:
        text = per_concept_means(planted.text, planted.labels)
        image = per_concept_means(planted.image, planted.labels)
        jaccard = M.jaccard_matrix(M.top_k_features(text, 5), M.top_k_features(image, 5))
        n = len(jaccard)
        observed, p, _ = S.permutation_test(lambda order: float(np.nanmean(jaccard[np.arange(n), order])), n, 2000, seed=0)
        assert (p < 0.01) == should_beat, (observed, p)


@pytest.mark.parametrize("shared, should_transfer", [(3, True), (0, False)])
def test_probes_transfer_across_modalities_exactly_when_features_are_shared(shared, should_transfer):
    from xmodal.metrics.probes import transfer, within_modality

    planted = planted_codes(seed=0, shared_per_concept=shared, image_only_per_concept=3, text_only_per_concept=3, pairs_per_concept=12)
    text_to_image = transfer(planted.text, planted.labels, planted.image, planted.labels, seed=0, n_permutations=50)
    image_to_text = transfer(planted.image, planted.labels, planted.text, planted.labels, seed=0, n_permutations=50)
    within = within_modality(planted.image, planted.labels, seed=0, n_permutations=20)
    assert within.accuracy > 0.9 and within.p_value < 0.05  # each modality alone always carries the concept
    for score in (text_to_image, image_to_text):
        if should_transfer:
            assert score.accuracy > 0.8 and score.p_value < 0.05
        else:
            assert score.accuracy < score.chance + 0.1 and score.p_value > 0.05
        assert abs(score.shuffled_mean - score.chance) < 0.1  # the shuffled control sits at chance


def planted_embeddings(labels: np.ndarray, dim: int = 16, spread: float = 0.3, seed: int = 0) -> np.ndarray:
    """Sample embeddings clustered by concept: what an embedder sees when concepts differ."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(labels.max() + 1, dim))
    return centres[labels] + spread * rng.normal(size=(len(labels), dim)) + 3.0  # offset keeps similarities positive


def test_interpretability_scores_concept_features_above_noise_and_null():
    from xmodal.metrics.interpretability import feature_interpretability

    planted = planted_codes(seed=0)
    embeddings = planted_embeddings(planted.labels)
    scores = feature_interpretability(planted.image, embeddings, np.arange(len(planted.roles)), m=5, seed=0)
    scores["role"] = planted.roles
    concept = scores[scores["role"] == "image"]
    noise = scores[scores["role"] == "noise"].dropna()
    assert concept["W"].mean() > 0.9 and concept["I"].mean() > 0.05
    assert concept["W_null"].mean() == pytest.approx(0.5, abs=0.15)
    assert noise["W"].mean() < concept["W"].mean() - 0.3
    # Text-only features never fire on images: too few active samples to score.
    assert scores[scores["role"] == "text"]["I"].isna().all()


@pytest.mark.slow  # trains, or runs a whole study on the organism: a minute or more on 2 cores
def test_zero_mask_of_image_features_hurts_the_image_readout_more_than_random_features():
    from xmodal.metrics.interventions import zero_mask_effects

    planted = planted_codes(n_concepts=4, pairs_per_concept=8, shared_per_concept=1, image_only_per_concept=4, text_only_per_concept=4, n_noise=8, seed=1)
    decode = lambda codes: codes  # an identity decoder: the codes are the residual
    sets = {"ImgD": np.flatnonzero(planted.roles == "image"), "TextD": np.flatnonzero(planted.roles == "text")}
    rows = {r["removed"]: r for r in zero_mask_effects(planted.image, planted.labels, decode, sets, np.arange(len(planted.roles)), 20, 0)}
    assert rows["none"]["accuracy"] > 0.9
    assert rows["ImgD"]["accuracy"] < rows["ImgD"]["random_mean"] and rows["ImgD"]["p_value"] < 0.1
    assert rows["TextD"]["accuracy"] == pytest.approx(rows["none"]["accuracy"])  # silent on images: removing them changes nothing


def test_a_probe_on_a_single_class_is_refused():
    from xmodal.errors import DatasetError
    from xmodal.metrics.probes import transfer, within_modality

    x = np.random.default_rng(0).normal(size=(10, 4))
    with pytest.raises(DatasetError, match="a probe needs at least 2 classes, got 1"):
        within_modality(x, np.array(["cat"] * 10), seed=0, n_permutations=5, what="text probe")
    with pytest.raises(DatasetError, match="a probe needs at least 2 classes"):
        transfer(x, np.array(["cat"] * 10), x, np.array(["cat"] * 10), seed=0, n_permutations=5)
