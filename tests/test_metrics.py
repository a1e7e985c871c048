"""Overlap metrics against values computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from xmodal.metrics import overlap as M


def test_top_k_takes_largest_positive_codes_only():
    codes = np.array([[0.0, 3.0, -1.0, 2.0, 0.5], [0.0, 0.0, 0.0, 0.0, 0.0]])
    top = M.top_k_features(codes, 2)
    assert top[0].tolist() == [1, 3]
    assert top[1].tolist() == []
    assert M.top_k_features(codes, 10)[0].tolist() == [1, 3, 4]


def test_jaccard_by_hand():
    assert M.jaccard(np.array([1, 2, 3]), np.array([2, 3, 4, 5])) == pytest.approx(2 / 5)
    assert M.jaccard(np.array([1]), np.array([2])) == 0.0
    assert math.isnan(M.jaccard(np.array([], int), np.array([], int)))


def test_pearson_and_spearman_matrices_by_hand():
    text = np.array([[1.0, 2.0, 3.0, 4.0], [1.0, 0.0, 0.0, 0.0]])
    image = np.array([[2.0, 4.0, 6.0, 8.0], [4.0, 3.0, 2.0, 1.0]])
    pearson = M.pearson_matrix(text, image)
    assert pearson[0, 0] == pytest.approx(1.0)
    assert pearson[0, 1] == pytest.approx(-1.0)
    # text[1] = (1,0,0,0) vs image[1] = (4,3,2,1): r = 0.7745966 (sqrt(0.6)) by hand
    assert pearson[1, 1] == pytest.approx(math.sqrt(0.6))
    spearman = M.spearman_matrix(np.array([[1.0, 10.0, 100.0]]), np.array([[1.0, 2.0, 3.0]]))
    assert spearman[0, 0] == pytest.approx(1.0)


def test_mutual_information_by_hand():
    # Binarised: text (1,1,0,0), image (1,1,0,0): MI = H = ln 2. Independent halves: MI = 0.
    text = np.array([[1.0, 1.0, 0.0, 0.0]])
    same = np.array([[2.0, 5.0, 0.0, 0.0]])
    independent = np.array([[1.0, 0.0, 1.0, 0.0]])
    assert M.mutual_information_matrix(text, same)[0, 0] == pytest.approx(math.log(2))
    assert M.mutual_information_matrix(text, independent)[0, 0] == pytest.approx(0.0, abs=1e-12)


def test_feature_correlations_across_concepts():
    text = np.array([[1.0, 0.0, 5.0], [2.0, 0.0, 5.0], [3.0, 0.0, 5.0]])
    image = np.array([[2.0, 1.0, 1.0], [4.0, 2.0, 1.0], [6.0, 0.0, 1.0]])
    r = M.feature_correlations(text, image)
    assert r[0] == pytest.approx(1.0)
    assert math.isnan(r[1]) and math.isnan(r[2])  # constant columns have no correlation
    assert M.count_above(r, 0.6) == 1


def test_specificity_is_the_plans_ratio():
    codes = np.array([[3.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    # features 0 and 1: 3/(3+1) and 1/(1+1); feature 2 is silent for both and left out
    assert M.specificity(codes, 0, 1, np.array([0, 1, 2])) == pytest.approx((0.75 + 0.5) / 2)
    assert math.isnan(M.specificity(codes, 0, 1, np.array([2])))


def test_specificity_cross_terms_compare_one_modality_with_the_partners_other():
    text = np.array([[3.0, 1.0], [0.0, 5.0]])  # concept 0 (cat), concept 1 (dog)
    image = np.array([[2.0, 0.0], [1.0, 1.0]])
    features = np.array([0, 1])
    # text-cat against image-dog: 3/(3+1) on feature 0, 1/(1+1) on feature 1
    assert M.specificity(text, 0, 1, features, partner_codes=image) == pytest.approx((0.75 + 0.5) / 2)
    # image-cat against text-dog: 2/(2+0) on feature 0; feature 1 is 0/(0+5)
    assert M.specificity(image, 0, 1, features, partner_codes=text) == pytest.approx((1.0 + 0.0) / 2)


def test_off_diagonal_mean():
    m = np.array([[1.0, 2.0, 4.0], [0.0, 5.0, 1.0], [3.0, 3.0, 9.0]])
    assert M.off_diagonal_mean(m).tolist() == [3.0, 0.5, 3.0]


@pytest.mark.parametrize("budget", [None, 5])
def test_saved_probe_weights_reproduce_the_probes_predictions(budget):
    from xmodal.metrics.probes import fitted_weights, make_probe

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(60, 12)), np.repeat(["a", "b", "c"], 20)
    x[y == "b", 2] += 3.0
    probe = make_probe(0, budget).fit(x, y)
    weights, classes = fitted_weights(probe)
    z = (x[:, weights["columns"]] - weights["scale_mean"]) / weights["scale_std"]
    predicted = np.asarray(classes)[np.argmax(z @ weights["coef"].T + weights["intercept"], axis=1)]
    assert (predicted == probe.predict(x)).all()
    assert len(weights["columns"]) == (budget or 12)


def test_shared_features_count_a_class_images_and_the_other_classes_rate():
    from xmodal.metrics.probes import shared_features

    codes = np.array([[1, 0, 2], [3, 0, 0], [0, 1, 1], [0, 0, 5]], dtype=float)  # rows: a, a, b, b
    table = shared_features(codes, np.array(["a", "a", "b", "b"]), per_class=2).set_index(["class", "rank"])
    assert table.loc[("a", 1), ["feature", "occurrences", "fraction"]].tolist() == [0, 2, 1.0]
    assert table.loc[("a", 2), "feature"] == 2 and table.loc[("a", 2), "other_classes_fraction"] == 1.0
    assert table.loc[("b", 1), ["feature", "occurrences", "other_classes_fraction"]].tolist() == [2, 2, 0.5]


def test_top_n_per_token_keeps_each_tokens_largest_features_before_summing():
    import torch

    from xmodal.activations.codes import pool_tokens

    codes = torch.tensor([[3.0, 1.0, 2.0], [0.0, 5.0, 4.0]])  # two tokens, three features
    assert pool_tokens(codes, "topn_per_token", 1).tolist() == [3.0, 5.0, 0.0]
    assert pool_tokens(codes, "topn_per_token", 2).tolist() == [3.0, 5.0, 6.0]
    assert torch.equal(pool_tokens(codes, "topn_per_token", 3), codes.sum(dim=0))


def test_a_train_split_ratio_trains_on_that_share_of_each_class():
    from xmodal.errors import DatasetError
    from xmodal.metrics.probes import within_modality

    rng = np.random.default_rng(0)
    y = np.repeat(["a", "b"], 10)
    x = rng.normal(size=(20, 4)) + (y == "a")[:, None] * 3.0
    score = within_modality(x, y, seed=0, n_permutations=20, train_fraction=0.2)
    assert (score.n_train, score.n_test) == (4, 16) and score.accuracy > 0.9 and score.p_value < 0.1
    with pytest.raises(DatasetError, match="a 10% training split of 8 examples in 2 classes leaves class 'a' .* without a training example"):
        within_modality(x[:8], np.repeat(["a", "b"], 4), seed=0, n_permutations=5, train_fraction=0.1)
