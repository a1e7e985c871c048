"""CKNNA against the reference implementation (issue 27, item 6).

The reference is platonic-rep's ``metrics.py`` (``AlignmentMetrics.cknna`` with its defaults,
unbiased=True and distance_agnostic=False), which its pipeline calls on L2-normalised features.
``reference_cknna`` below writes that definition out again as plain loops, independently of
xmodal's vectorised code: inner-product kernels of the normalised rows; per row i, the mask of
the j != i among the top k of both kernels' row i; the unbiased HSIC of Song et al. (2012, eq. 5)
of the two masked kernels, sum_ij K_ij L_ji + sum(K) sum(L) / ((n-1)(n-2)) - 2 sum(K L) / (n-2),
over n (n - 3); divided by sqrt(HSIC_KK HSIC_LL) + 1e-6.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from xmodal.metrics import alignment as A


def reference_cknna(a: np.ndarray, b: np.ndarray, k: int) -> float:
    n = len(a)

    def kernel(x: np.ndarray) -> list[list[float]]:
        rows = [list(r / math.sqrt(sum(v * v for v in r))) for r in x]
        return [[sum(p * q for p, q in zip(rows[i], rows[j])) for j in range(n)] for i in range(n)]

    def neighbours(g: list[list[float]]) -> list[set[int]]:
        return [set(sorted((j for j in range(n) if j != i), key=lambda j: -g[i][j])[:k]) for i in range(n)]

    def masked_hsic(g: list[list[float]], h: list[list[float]], keep: list[set[int]]) -> float:
        gm = [[g[i][j] if j in keep[i] else 0.0 for j in range(n)] for i in range(n)]
        hm = [[h[i][j] if j in keep[i] else 0.0 for j in range(n)] for i in range(n)]
        trace = sum(gm[i][j] * hm[j][i] for i in range(n) for j in range(n))
        total_g, total_h = sum(map(sum, gm)), sum(map(sum, hm))
        product = sum(gm[i][m] * hm[m][j] for i in range(n) for m in range(n) for j in range(n))
        return (trace + total_g * total_h / ((n - 1) * (n - 2)) - 2 * product / (n - 2)) / (n * (n - 3))

    ka, kb = kernel(a), kernel(b)
    near_a, near_b = neighbours(ka), neighbours(kb)
    both = [near_a[i] & near_b[i] for i in range(n)]
    return masked_hsic(ka, kb, both) / (math.sqrt(masked_hsic(ka, ka, near_a) * masked_hsic(kb, kb, near_b)) + 1e-6)


def paired(seed: int, n: int = 16, noise: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Two views of one latent structure, different widths, partly aligned."""
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(n, 5))
    return latent @ rng.normal(size=(5, 24)) + noise * rng.normal(size=(n, 24)), latent @ rng.normal(size=(5, 12)) + noise * rng.normal(size=(n, 12))


@pytest.mark.parametrize(("seed", "k"), [(0, 2), (1, 5), (2, 10), (3, 15)])
def test_cknna_equals_the_reference_implementation(seed, k):
    a, b = paired(seed)
    assert A.cknna(a, b, k) == pytest.approx(reference_cknna(a, b, k), abs=1e-6)


def test_cknna_on_unrelated_and_on_identical_sides():
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(16, 24)), rng.normal(size=(16, 8))
    assert A.cknna(a, b, 5) == pytest.approx(reference_cknna(a, b, 5), abs=1e-6)
    assert A.cknna(a, 2 * a, 5) == pytest.approx(reference_cknna(a, 2 * a, 5), abs=1e-6)


def test_the_reference_needs_two_neighbours_and_the_paper_form_stays_available():
    a, b = paired(0)
    with pytest.raises(ValueError, match="CKNNA needs k >= 2"):
        A.cknna(a, b, 1)
    assert A.cknna_paper_eq(a, b, 5) != pytest.approx(A.cknna(a, b, 5), abs=1e-6)  # the two forms differ


def test_the_study_refuses_one_neighbour_before_a_model_loads():
    from xmodal.errors import ConfigError
    from xmodal.experiments.alignment.config import AlignmentConfig
    from xmodal.experiments.alignment.experiment import RepresentationAlignment

    with pytest.raises(ConfigError, match="experiment.k_neighbours=1: CKNNA needs at least 2 neighbours"):
        RepresentationAlignment(AlignmentConfig(k_neighbours=1))
