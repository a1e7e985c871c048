"""One permutation test for every null in xmodal, and the bootstrap interval.

Every reported statistic is compared with draws of the same statistic under a null
(shuffled labels, re-paired concepts, random features). Two conventions hold everywhere:

- the p-value counts the observed value among the draws, (k + 1) / (n + 1), where k is the
  number of draws at least as extreme (Phipson & Smyth 2010: never 0, valid at any n);
- NaN draws (a statistic undefined under some shuffle) are left out of both k and n.

``permutation_test`` wraps scipy's ``permutation_test`` for re-pairing rows (exact
enumeration when n! is small); ``pvalue`` takes a null that a study drew itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Callable, Literal, Sequence

import numpy as np
from scipy import stats

from xmodal.errors import ConfigError

Alternative = Literal["greater", "less", "two-sided"]


def pvalue(observed: float, null: np.ndarray, alternative: Alternative = "greater") -> float:
    """(k + 1) / (n + 1): k draws of `null` at least as extreme as `observed`, n finite draws.

    two-sided measures extremeness as distance from the null's mean. NaN when `observed` is NaN
    or no draw is finite.
    """
    draws = np.asarray(null, dtype=float).ravel()
    draws = draws[np.isfinite(draws)]
    if not np.isfinite(observed) or draws.size == 0:
        return float("nan")
    if alternative == "greater":
        k = np.sum(draws >= observed)
    elif alternative == "less":
        k = np.sum(draws <= observed)
    elif alternative == "two-sided":
        centre = draws.mean()
        k = np.sum(np.abs(draws - centre) >= abs(observed - centre))
    else:
        raise ValueError(f"alternative={alternative!r}: use 'greater', 'less' or 'two-sided'")
    return float((k + 1) / (draws.size + 1))


@dataclass(frozen=True)
class NullSummary:
    """A statistic beside its null: what every table row and metric reports."""

    observed: float
    p_value: float
    null_mean: float
    null_std: float
    null_q025: float
    null_q975: float
    n_draws: int

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        return {f"{prefix}{k}": v for k, v in self.__dict__.items()}


def summarise_null(observed: float, null: np.ndarray, alternative: Alternative = "greater", p_value: float | None = None) -> NullSummary:
    """Observed value, p-value and the null's mean, spread and 95% interval (NaN draws left out)."""
    draws = np.asarray(null, dtype=float).ravel()
    finite = draws[np.isfinite(draws)]
    nan = float("nan")
    return NullSummary(
        observed=float(observed),
        p_value=pvalue(observed, finite, alternative) if p_value is None else float(p_value),
        null_mean=float(finite.mean()) if finite.size else nan,
        null_std=float(finite.std()) if finite.size else nan,
        null_q025=float(np.quantile(finite, 0.025)) if finite.size else nan,
        null_q975=float(np.quantile(finite, 0.975)) if finite.size else nan,
        n_draws=int(finite.size),
    )


def null_draws(statistic: Callable[[np.random.Generator], float], n_draws: int, seed: int) -> np.ndarray:
    """`n_draws` values of `statistic(rng)`, one seeded generator shared by all draws."""
    rng = np.random.default_rng(seed)
    return np.array([statistic(rng) for _ in range(n_draws)], dtype=float)


def repairings(groups: np.ndarray, n: int, rng: np.random.Generator) -> list[np.ndarray]:
    """n random re-pairings of the rows, each a permutation that keeps every row inside its group."""
    members = [np.flatnonzero(groups == g) for g in np.unique(groups)]
    orders = []
    for _ in range(n):
        order = np.arange(len(groups))
        for rows in members:
            order[rows] = rng.permutation(rows)
        orders.append(order)
    return orders


class NullPairing(StrEnum):
    """Which re-pairings of concepts a null draws (``experiment.null``)."""

    all = "all"  # re-pair any concept with any other
    within_category = "within_category"  # re-pair only inside a category: alignment finer than categories


def null_groups(categories: Sequence[str | None], null: NullPairing) -> np.ndarray:
    """Per concept, the group its re-pairings stay in: one group for null=all, else its category."""
    if NullPairing(null) == NullPairing.all:
        return np.zeros(len(categories), dtype=int)
    if len(set(categories)) == len(categories):
        raise ConfigError(
            "experiment.null=within_category needs categories with two or more concepts; "
            f"this dataset's are {sorted(set(map(str, categories)))}; use experiment.null=all"
        )
    return np.unique(np.asarray([str(c) for c in categories]), return_inverse=True)[1]


def permutation_test(
    statistic: Callable[[np.ndarray], float], n: int, n_permutations: int, seed: int, groups: np.ndarray | None = None
) -> tuple[float, float, np.ndarray]:
    """Observed value, one-sided p-value (greater) and null of statistic(order) over re-pairings of n rows.

    The identity order gives the observed value. With n! <= n_permutations every pairing is
    enumerated (scipy's exact test, whose p counts the identity among them); otherwise
    `n_permutations` random orders and the (k + 1) / (n + 1) p-value. With `groups` (one label
    per row, e.g. its category), rows are re-paired only inside their group (`repairings`),
    always by random draws.
    """
    if groups is not None and len(np.unique(groups)) > 1:
        observed = float(statistic(np.arange(n)))
        null = np.array([statistic(order) for order in repairings(np.asarray(groups), n_permutations, np.random.default_rng(seed))], dtype=float)
        return observed, pvalue(observed, null), null
    result = stats.permutation_test(
        (np.arange(n),),
        lambda order: statistic(np.asarray(order)),
        permutation_type="pairings",
        n_resamples=n_permutations,
        vectorized=False,
        alternative="greater",
        rng=np.random.default_rng(seed),
    )
    return float(result.statistic), float(result.pvalue), np.asarray(result.null_distribution)


def max_statistic_pvalues(observed: np.ndarray, null: np.ndarray) -> np.ndarray:
    """Per test, (k + 1) / (n + 1) against the null of the largest statistic over all tests.

    `null` is (draws, tests). The single-step max-T correction (Westfall & Young 1993): valid
    for tests picked because their statistic is large, as the features above a threshold are.
    NaN entries of a draw are left out of its maximum; a draw with none finite is left out.
    """
    draws = np.asarray(null, dtype=float)
    finite = np.isfinite(draws).any(axis=1)
    maxima = np.max(np.where(np.isfinite(draws), draws, -np.inf), axis=1)[finite]
    return np.array([pvalue(value, maxima) for value in np.asarray(observed, dtype=float)])


def bootstrap_ci(values: np.ndarray, seed: int, n_resamples: int = 1000) -> tuple[float, float]:
    """Percentile bootstrap 95% interval of the mean; a constant sample is its own interval."""
    if len(values) < 2 or np.all(values == values[0]):
        return float(np.mean(values)), float(np.mean(values))
    result = stats.bootstrap((values,), np.mean, n_resamples=n_resamples, random_state=seed, method="percentile")
    return float(result.confidence_interval.low), float(result.confidence_interval.high)
