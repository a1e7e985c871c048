"""Zero-mask interventions on SAE codes (seed 002, the gender case study in spirit).

Remove a set of features from each sample's codes (set them to zero), decode through
the SAE, and read the result out with a classifier fitted on the clean
reconstructions of the other samples (leave-one-out nearest centroid, as the paper
reads intervened activations by their distance to label embeddings). A feature set
matters for a modality when removing it costs more accuracy than removing as many
random features does.
"""

from __future__ import annotations

import warnings
from typing import Callable

import numpy as np
from sklearn.model_selection import LeaveOneOut
from sklearn.neighbors import NearestCentroid

from xmodal.metrics.statistics import pvalue

Decode = Callable[[np.ndarray], np.ndarray]


def loo_readout_accuracy(clean: np.ndarray, intervened: np.ndarray, labels: np.ndarray) -> float:
    """Accuracy on `intervened` rows of nearest-centroid classifiers fitted on the other clean rows."""
    hits = []
    with warnings.catch_warnings():
        # Sparse codes are often constant within a class; harmless for nearest centroid.
        warnings.filterwarnings("ignore", message=".*within_class_std_dev_.*")
        for train, test in LeaveOneOut().split(clean):
            if len(np.unique(labels[train])) < 2:
                raise ValueError("the readout needs at least two classes among the training rows")
            classifier = NearestCentroid().fit(clean[train], labels[train])
            hits.append(classifier.predict(intervened[test])[0] == labels[test][0])
    return float(np.mean(hits))


def zero_mask(codes: np.ndarray, features: np.ndarray) -> np.ndarray:
    masked = codes.copy()
    masked[:, features] = 0.0
    return masked


def zero_mask_effects(
    codes: np.ndarray,
    labels: np.ndarray,
    decode: Decode,
    feature_sets: dict[str, np.ndarray],
    candidates: np.ndarray,
    n_random: int,
    seed: int,
) -> list[dict[str, float | int | str]]:
    """Readout accuracy with nothing removed, with each named set removed, and with random sets of equal size.

    Random sets are drawn from `candidates` (the active features), `n_random` times per named set.
    """
    clean = decode(codes)
    rng = np.random.default_rng(seed)
    rows: list[dict[str, float | int | str]] = [{"removed": "none", "n_removed": 0, "accuracy": loo_readout_accuracy(clean, clean, labels)}]
    for name, features in feature_sets.items():
        accuracy = loo_readout_accuracy(clean, decode(zero_mask(codes, features)), labels)
        random_accuracy = (
            np.array(
                [
                    loo_readout_accuracy(clean, decode(zero_mask(codes, rng.choice(candidates, size=len(features), replace=False))), labels)
                    for _ in range(n_random)
                ]
            )
            if 0 < len(features) <= len(candidates)
            else np.array([np.nan])
        )
        rows.append(
            {
                "removed": name,
                "n_removed": int(len(features)),
                "accuracy": accuracy,
                "random_mean": float(np.mean(random_accuracy)),
                "random_q025": float(np.quantile(random_accuracy, 0.025)),
                "random_q975": float(np.quantile(random_accuracy, 0.975)),
                # one-sided: how often a random set of the same size costs at least as much
                "p_value": pvalue(accuracy, random_accuracy, "less"),
            }
        )
    return rows
