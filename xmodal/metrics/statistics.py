"""Intervals shared by the studies."""

from __future__ import annotations

import numpy as np
from scipy import stats


def bootstrap_ci(values: np.ndarray, seed: int, n_resamples: int = 1000) -> tuple[float, float]:
    """Percentile bootstrap 95% interval of the mean; a constant sample is its own interval."""
    if len(values) < 2 or np.all(values == values[0]):
        return float(np.mean(values)), float(np.mean(values))
    result = stats.bootstrap((values,), np.mean, n_resamples=n_resamples, random_state=seed, method="percentile")
    return float(result.confidence_interval.low), float(result.confidence_interval.high)
