"""Representation alignment without an SAE: CKA and the nearest-neighbour kernels of
Huh et al. (2024), "The Platonic Representation Hypothesis".

Each function takes two matrices whose rows are paired (row i of ``a`` and row i of ``b``
describe the same item, e.g. one concept as text and as images) and whose widths may
differ. No library on the registry implements these kernels with the paper's definitions,
so they are written out here, short and in numpy.
"""

from __future__ import annotations

from typing import Callable

import numpy as np


def _check_paired(a: np.ndarray, b: np.ndarray, minimum: int) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[0]:
        raise ValueError(f"alignment needs two (n, d) matrices with the same n; got {a.shape} and {b.shape}")
    if a.shape[0] < minimum:
        raise ValueError(f"alignment needs at least {minimum} paired rows; got {a.shape[0]}")
    return a, b


def linear_kernel(x: np.ndarray) -> np.ndarray:
    """Gram matrix of the column-centred rows."""
    x = x - x.mean(axis=0, keepdims=True)
    return x @ x.T


def hsic_biased(k: np.ndarray, l: np.ndarray) -> float:  # noqa: E741 (the papers' name for the second kernel)
    """Gretton et al. (2005): tr(K H L H) / (n - 1)^2."""
    n = k.shape[0]
    h = np.eye(n) - 1.0 / n
    return float(np.trace(k @ h @ l @ h)) / (n - 1) ** 2


def hsic_unbiased(k: np.ndarray, l: np.ndarray) -> float:  # noqa: E741
    """Song et al. (2012): the unbiased estimator, on kernels with their diagonals zeroed."""
    n = k.shape[0]
    k, l = k.copy(), l.copy()  # noqa: E741
    np.fill_diagonal(k, 0.0)
    np.fill_diagonal(l, 0.0)
    ones = np.ones(n)
    term = np.trace(k @ l) + (ones @ k @ ones) * (ones @ l @ ones) / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * (ones @ k @ l @ ones)
    return float(term) / (n * (n - 3))


def _flat(kernel: np.ndarray, self_hsic: float) -> bool:
    """HSIC(K, K) is quadratic in K; against the kernel's own scale, zero means a kernel flat off its diagonal."""
    return self_hsic <= 1e-9 * (np.linalg.norm(kernel) / kernel.shape[0]) ** 2


def cka(a: np.ndarray, b: np.ndarray, unbiased: bool = False) -> float:
    """Linear CKA (Kornblith et al. 2019): 1 for representations equal up to rotation and scale."""
    a, b = _check_paired(a, b, 4 if unbiased else 2)
    hsic = hsic_unbiased if unbiased else hsic_biased
    k, l = linear_kernel(a), linear_kernel(b)  # noqa: E741
    self_k, self_l = hsic(k, k), hsic(l, l)
    if _flat(k, self_k) or _flat(l, self_l):  # no structure to align: 0/0 up to rounding
        return float("nan")
    return float(hsic(k, l) / np.sqrt(self_k * self_l))


def _unit_rows(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)


def nearest_neighbours(x: np.ndarray, k: int) -> np.ndarray:
    """(n, n) boolean: entry (i, j) says j is among row i's k nearest rows by cosine (i itself excluded)."""
    similarity = _unit_rows(x) @ _unit_rows(x).T
    np.fill_diagonal(similarity, -np.inf)
    order = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
    mask = np.zeros_like(similarity, dtype=bool)
    np.put_along_axis(mask, order, True, axis=1)
    return mask


def _check_k(n: int, k: int) -> None:
    if not 1 <= k < n:
        raise ValueError(f"k nearest neighbours needs 1 <= k < n (the number of paired rows); got k={k}, n={n}")


def mutual_knn(a: np.ndarray, b: np.ndarray, k: int) -> float:
    """Mean over rows of |kNN_a(i) ∩ kNN_b(i)| / k: 1 when both spaces agree on every row's neighbours."""
    a, b = _check_paired(a, b, 2)
    _check_k(a.shape[0], k)
    return float((nearest_neighbours(a, k) & nearest_neighbours(b, k)).sum(axis=1).mean() / k)


def cknna(a: np.ndarray, b: np.ndarray, k: int) -> float:
    """Centred kernel nearest-neighbour alignment, as the reference implementation computes it.

    The reference is platonic-rep's ``AlignmentMetrics.cknna`` (Huh et al. 2024, unbiased form),
    on L2-normalised rows as its pipeline feeds it: K and L are the cosine kernels of the two
    sides; row i keeps the pairs (i, j) where j is among i's k nearest rows (by the kernel, i
    itself excluded) in both spaces; CKNNA is the unbiased HSIC (Song et al.) of the two masked
    kernels over the square root of each kernel's own, with the reference's 1e-6 added to that
    root so that values compare with published ones. nan when a self-alignment is not positive.
    The paper's equation form, which xmodal reported before, is ``cknna_paper_eq``.
    """
    a, b = _check_paired(a, b, 4)
    _check_k(a.shape[0], k)
    if k < 2:
        raise ValueError(f"CKNNA needs k >= 2 nearest neighbours (as the reference implementation); got k={k}")
    kernel_a, kernel_b = _unit_rows(a) @ _unit_rows(a).T, _unit_rows(b) @ _unit_rows(b).T
    near_a, near_b = nearest_neighbours(a, k), nearest_neighbours(b, k)
    self_a = hsic_unbiased(near_a * kernel_a, near_a * kernel_a)
    self_b = hsic_unbiased(near_b * kernel_b, near_b * kernel_b)
    if not self_a * self_b > 0:
        return float("nan")
    both = near_a & near_b
    return float(hsic_unbiased(both * kernel_a, both * kernel_b) / (np.sqrt(self_a * self_b) + 1e-6))


def _knn_alignment(k_a: np.ndarray, k_b: np.ndarray, mask: np.ndarray) -> float:
    """Σ_i Σ_j mask(i, j) (K_ij − E_l K_il)(L_ij − E_l L_il), each kernel centred per row."""
    centred_a = k_a - k_a.mean(axis=1, keepdims=True)
    centred_b = k_b - k_b.mean(axis=1, keepdims=True)
    return float((mask * centred_a * centred_b).sum())


def cknna_paper_eq(a: np.ndarray, b: np.ndarray, k: int) -> float:
    """CKNNA as the paper's equation reads (xmodal's ``cknna`` before it followed the reference code).

    CKA restricted to the pairs (i, j) where j is a k-nearest neighbour of i in both spaces,
    normalised by each space's alignment with itself over its own neighbours, each kernel
    centred per row. Its values differ from the reference implementation's and from published
    ones; kept to compare with earlier xmodal results.
    """
    a, b = _check_paired(a, b, 2)
    _check_k(a.shape[0], k)
    kernel_a, kernel_b = _unit_rows(a) @ _unit_rows(a).T, _unit_rows(b) @ _unit_rows(b).T
    near_a, near_b = nearest_neighbours(a, k), nearest_neighbours(b, k)
    self_a = _knn_alignment(kernel_a, kernel_a, near_a)
    self_b = _knn_alignment(kernel_b, kernel_b, near_b)
    denominator = np.sqrt(max(self_a, 0.0) * max(self_b, 0.0))
    return float(_knn_alignment(kernel_a, kernel_b, near_a & near_b) / denominator) if denominator > 0 else float("nan")


# name -> f(a, b, k); CKA ignores k
ALIGNMENT_FUNCTIONS: dict[str, Callable[[np.ndarray, np.ndarray, int], float]] = {
    "cka": lambda a, b, k: cka(a, b),
    "cka_unbiased": lambda a, b, k: cka(a, b, unbiased=True),
    "mutual_knn": mutual_knn,
    "cknna": cknna,
}
ALIGNMENT_METRICS = tuple(ALIGNMENT_FUNCTIONS)


def alignment_scores(a: np.ndarray, b: np.ndarray, k: int) -> dict[str, float]:
    """Every alignment measure of two paired representations, by name."""
    return {name: f(a, b, k) for name, f in ALIGNMENT_FUNCTIONS.items()}
