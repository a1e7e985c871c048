"""Embedding-based interpretability of features (seed 002, eqs. 5 and 6).

For a feature z, take the embeddings of its top-m activating samples (Z+) and of m
random samples (Z-), both L2-normalised, and compare their inter-sample similarities
S+ = Z+ Z+^T and S- = Z- Z-^T off the diagonal:

    I(z) = mean_{i != j} (S+_ij - S-_ij) / S-_ij        (relative similarity gain)
    W(z) = mean_{i != j} 1[S+_ij > S-_ij]               (WinRate)

A feature whose top samples mean the same thing scores I > 0 and W > 0.5. The null
is the same score with Z+ drawn at random too: I near 0, W near 0.5, and its spread
says how far a score must be from those to mean something.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def _normalise(embeddings: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    return embeddings / np.where(norms > 0, norms, 1.0)


def _scores(top: np.ndarray, random: np.ndarray) -> tuple[float, float]:
    s_plus, s_minus = top @ top.T, random @ random.T
    off = ~np.eye(len(top), dtype=bool)
    plus, minus = s_plus[off], s_minus[off]
    with np.errstate(divide="ignore", invalid="ignore"):
        relative = (plus - minus) / minus
    return float(np.nanmean(np.where(np.isfinite(relative), relative, np.nan))), float(np.mean(plus > minus))


def feature_interpretability(
    codes: np.ndarray, embeddings: np.ndarray, features: np.ndarray, m: int, seed: int
) -> pd.DataFrame:
    """I(z) and W(z) for each feature in `features`, with a random-sample null per feature.

    codes: (samples, features) activations; embeddings: (samples, d) from the embedder.
    Features active on fewer than m samples get NaN (their top-m would include silent samples).
    """
    if len(codes) != len(embeddings):
        raise ValueError(f"{len(codes)} code rows but {len(embeddings)} embeddings; they must be the same samples")
    if m < 2:
        raise ValueError(f"m={m}: the scores compare pairs of top samples, so m must be at least 2")
    z = _normalise(np.asarray(embeddings, dtype=np.float64))
    rng = np.random.default_rng(seed)
    rows = []
    for feature in features:
        activation = codes[:, feature]
        n_active = int(np.sum(activation > 0))
        row = {"feature": int(feature), "n_active_samples": n_active}
        if n_active < m or len(codes) < 2 * m:
            rows.append(row | {"I": np.nan, "W": np.nan, "I_null": np.nan, "W_null": np.nan})
            continue
        top = np.argsort(-activation, kind="stable")[:m]
        random = rng.choice(len(codes), size=m, replace=False)
        other = rng.choice(len(codes), size=m, replace=False)
        i_score, w_score = _scores(z[top], z[random])
        i_null, w_null = _scores(z[other], z[random])
        rows.append(row | {"I": i_score, "W": w_score, "I_null": i_null, "W_null": w_null})
    return pd.DataFrame(rows, columns=["feature", "n_active_samples", "I", "W", "I_null", "W_null"])
