"""Modality Dominance Score (MDS) of SAE features, as defined in seed 002 (Multi-Faceted Monosemanticity).

For feature k over m matched pairs: R(k) = mean_i  Z_I[i,k] / (Z_I[i,k] + Z_T[i,k]), with
pairs where both activations are zero left out. Features split at the mean plus or
minus one standard deviation of R over features: ImgD above, TextD below, CrossD between.
"""

from __future__ import annotations

import numpy as np

GROUPS = ("ImgD", "CrossD", "TextD")
INACTIVE = "inactive"


def modality_dominance(image: np.ndarray, text: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """MDS per feature and the number of pairs it was averaged over (nan where never active).

    Codes must be non-negative (SAE activations); negative values are clipped to 0.
    """
    image = np.clip(np.asarray(image, float), 0, None)
    text = np.clip(np.asarray(text, float), 0, None)
    total = image + text
    active = total > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.where(active, image / np.where(active, total, 1.0), np.nan)
        counts = active.sum(axis=0)
        mds = np.where(counts > 0, np.nansum(ratio, axis=0) / np.maximum(counts, 1), np.nan)
    return mds, counts


def dominance_groups(mds: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Group of each feature ('ImgD', 'CrossD', 'TextD' or 'inactive') and the split's mean and std."""
    finite = np.isfinite(mds)
    mu, sigma = float(np.mean(mds[finite])), float(np.std(mds[finite]))
    groups = np.full(mds.shape, INACTIVE, dtype=object)
    groups[finite & (mds > mu + sigma)] = "ImgD"
    groups[finite & (mds < mu - sigma)] = "TextD"
    groups[finite & (mds >= mu - sigma) & (mds <= mu + sigma)] = "CrossD"
    return groups, mu, sigma


def swapped_modalities(image: np.ndarray, text: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Null: within each pair, swap which code is called 'image' with probability 1/2."""
    swap = rng.random(len(image)) < 0.5
    return np.where(swap[:, None], text, image), np.where(swap[:, None], image, text)
