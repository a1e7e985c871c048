"""Cross-modal overlap statistics between text codes and image codes of matched concepts.

Rows are concepts, columns are features; row i of `text` and row i of `image` are
the same concept. Every statistic here also has a mismatched-pairs version: compute
the concept-by-concept matrix once, then a matched statistic reads its diagonal and
a null reads a permutation of its columns.
"""

from __future__ import annotations

import numpy as np
from scipy import stats
from sklearn.metrics import mutual_info_score


def top_k_features(codes: np.ndarray, k: int) -> list[np.ndarray]:
    """Per row, the indices of its k largest strictly positive codes (fewer if fewer are active)."""
    result = []
    for row in np.asarray(codes):
        active = np.flatnonzero(row > 0)
        order = active[np.argsort(-row[active], kind="stable")]
        result.append(np.sort(order[:k]))
    return result


def active_features(codes: np.ndarray) -> list[np.ndarray]:
    """Per row, the indices of every strictly positive code."""
    return [np.flatnonzero(row > 0) for row in np.asarray(codes)]


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """|a ∩ b| / |a ∪ b| of two index sets; nan when both are empty."""
    union = np.union1d(a, b)
    if len(union) == 0:
        return float("nan")
    return len(np.intersect1d(a, b)) / len(union)


def jaccard_matrix(text_sets: list[np.ndarray], image_sets: list[np.ndarray]) -> np.ndarray:
    """J[i, j] = Jaccard of concept i's text features and concept j's image features."""
    return np.array([[jaccard(t, im) for im in image_sets] for t in text_sets])


def _standardise_rows(x: np.ndarray) -> np.ndarray:
    centred = x - x.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(centred, axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norm > 0, centred / norm, np.nan)


def pearson_matrix(text: np.ndarray, image: np.ndarray) -> np.ndarray:
    """P[i, j] = Pearson r between code vectors text[i] and image[j] (over features)."""
    return _standardise_rows(np.asarray(text, float)) @ _standardise_rows(np.asarray(image, float)).T


def spearman_matrix(text: np.ndarray, image: np.ndarray) -> np.ndarray:
    """Spearman = Pearson on ranks (ties averaged), over features."""
    return pearson_matrix(stats.rankdata(text, axis=1), stats.rankdata(image, axis=1))


def mutual_information_matrix(text: np.ndarray, image: np.ndarray) -> np.ndarray:
    """M[i, j] = mutual information (nats) between which features are active (> 0) in text[i] and image[j]."""
    text_active, image_active = np.asarray(text) > 0, np.asarray(image) > 0
    return np.array([[mutual_info_score(t, im) for im in image_active] for t in text_active])


def feature_correlations(text: np.ndarray, image: np.ndarray) -> np.ndarray:
    """Per feature, Pearson r across concepts between its text and image activation (nan if constant)."""
    per_feature_text = _standardise_rows(np.asarray(text, float).T)
    per_feature_image = _standardise_rows(np.asarray(image, float).T)
    return np.sum(per_feature_text * per_feature_image, axis=1)


def count_above(values: np.ndarray, threshold: float) -> int:
    return int(np.sum(np.nan_to_num(values, nan=-np.inf) > threshold))


def specificity(codes: np.ndarray, concept: int, partner: int, features: np.ndarray, partner_codes: np.ndarray | None = None) -> float:
    """The plan's ratio a(concept) / (a(concept) + a(partner)), averaged over `features`.

    `partner_codes` (default: `codes`) gives the plan's cross terms: text codes for the
    concept against image codes for its partner (text-cat vs image-dog), and the reverse.
    Codes are clipped at 0 so the ratio stays in [0, 1]; features silent for both
    concepts are left out. nan when no feature remains.
    """
    a = np.clip(codes[concept, features], 0, None)
    b = np.clip((codes if partner_codes is None else partner_codes)[partner, features], 0, None)
    keep = (a + b) > 0
    if not keep.any():
        return float("nan")
    return float(np.mean(a[keep] / (a[keep] + b[keep])))


def off_diagonal_mean(matrix: np.ndarray) -> np.ndarray:
    """Per row, the mean over mismatched columns (j != i), ignoring nan."""
    masked = np.where(np.eye(len(matrix), dtype=bool), np.nan, matrix)
    with np.errstate(all="ignore"):
        return np.nanmean(masked, axis=1)
