"""Many L2-regularised multinomial logistic regressions fitted at once, in torch.

A probe's null refits it on every label permutation, and cross-validation refits it on
every fold: hundreds of small, independent problems on the same rows. Here they are one
batched problem: a leading dimension of problems, each with its own training rows
(a 0/1 mask), labels, standardisation and, with a budget, its own ANOVA-F feature
selection, all computed on that problem's training rows and labels only, as scikit-learn's
``Pipeline(SelectKBest(f_classif), StandardScaler(), LogisticRegression())`` does per fit.

The objective is scikit-learn's ``LogisticRegression`` (C = 1, lbfgs), scaled by the
number of training rows as scikit-learn scales it:

    mean cross-entropy of the softmax over the classes present in training
    + 0.5 * ||W||^2 / n_train        (intercept unpenalised)

With two classes scikit-learn fits one binary coefficient vector v with penalty 0.5||v||^2;
the softmax over two classes with penalty ||W||^2 (twice the multinomial one) has the same
optimum (v = w_1 - w_0, w_0 = -w_1), so two-class problems take that penalty and give
scikit-learn's binary probe, not merely the same predictions.

It is minimised by L-BFGS run per problem (its own history, step and Armijo line search) in
whitened, preconditioned coordinates (`_Whitened`): each problem's standardised training rows
are rotated onto their principal axes (one eigendecomposition per distinct set of rows and
columns: the label permutations of a fold share one), and each axis is scaled by the Hessian's
diagonal there. Standardised SAE codes are badly conditioned (a feature active in one or two
rows becomes a z-score of 10 or more), and this cuts the steps L-BFGS needs, while each step
costs two (rows x rank) products. Problems stop when their gradient norm in the original
coordinates is under `tol` (1e-3; scikit-learn stops when the largest entry is under 1e-4, a
criterion of about the same strength at these sizes; the solvers' accuracies agree to 0.02,
tests/test_probes.py); problems that reach `max_iter` first are logged as not converged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

log = logging.getLogger(__name__)

HISTORY = 5  # L-BFGS curvature pairs kept per problem
ARMIJO = 1e-4  # sufficient decrease of the line search
MAX_HALVINGS = 40
BATCH_BYTES = 2**31  # the solver state of one batch of problems (rows, Gram matrices, L-BFGS history)


@dataclass
class BatchedProbes:
    """Fitted probes, one per problem, in the input's columns: the kept columns (``selected``),
    the standardisation of the training rows (``mean``, ``scale``) and the softmax
    (``coef``: problems x features x classes, zero outside ``selected``; ``intercept``).
    ``present``: the classes each problem saw in training (the only ones it predicts)."""

    selected: np.ndarray  # bool, problems x features
    mean: np.ndarray  # problems x features
    scale: np.ndarray  # problems x features
    coef: np.ndarray  # problems x features x classes
    intercept: np.ndarray  # problems x classes
    present: np.ndarray  # bool, problems x classes
    converged: np.ndarray  # bool, problems
    iterations: int

    def decision(self, x: np.ndarray) -> np.ndarray:
        """Logits (problems x rows x classes); absent classes at -inf."""
        z = (torch.as_tensor(np.asarray(x, float))[None] - torch.as_tensor(self.mean)[:, None]) / torch.as_tensor(self.scale)[:, None]
        z = torch.where(torch.as_tensor(self.selected)[:, None], z, 0.0)
        logits = (z @ torch.as_tensor(self.coef) + torch.as_tensor(self.intercept)[:, None]).numpy()  # batched BLAS, float64
        return np.where(self.present[:, None], logits, -np.inf)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Class index per problem and row (problems x rows)."""
        return self.decision(x).argmax(axis=2)

    def weights(self, problem: int, class_names: np.ndarray) -> tuple[dict[str, np.ndarray], list[str]]:
        """One problem's parameters in the layout of ``probes.fitted_weights`` (scikit-learn's):
        kept columns, standardisation, coef (classes x kept columns, or 1 x kept for two classes:
        the second class's logit minus the first's) and intercept."""
        columns = np.flatnonzero(self.selected[problem])
        present = np.flatnonzero(self.present[problem])
        coef = self.coef[problem][np.ix_(columns, present)].T
        intercept = self.intercept[problem, present]
        if len(present) == 2:
            coef, intercept = coef[1:] - coef[:1], intercept[1:] - intercept[:1]
        weights = {
            "columns": columns.astype(np.int64),
            "scale_mean": self.mean[problem, columns].astype(np.float32),
            "scale_std": self.scale[problem, columns].astype(np.float32),
            "coef": coef.astype(np.float32),
            "intercept": intercept.astype(np.float32),
        }
        return weights, [str(c) for c in np.asarray(class_names)[present]]


def anova_f(x: torch.Tensor, onehot: torch.Tensor, train: torch.Tensor) -> torch.Tensor:
    """scikit-learn's f_classif per problem on its training rows (problems x features; NaN for a
    feature constant in training). x: rows x features; onehot: problems x rows x classes; train: problems x rows."""
    member = onehot * train[:, :, None]
    n_class = member.sum(dim=1)  # b, k
    n = n_class.sum(dim=1)  # b
    n_groups = (n_class > 0).sum(dim=1).to(x.dtype)
    sums = torch.einsum("bnk,nd->bkd", member, x)
    total = sums.sum(dim=1)  # b, d
    squares = train @ (x * x)  # b, d
    ss_all = squares - total**2 / n[:, None]
    ss_between = (sums**2 / n_class.clamp(min=1)[:, :, None]).sum(dim=1) - total**2 / n[:, None]
    ss_within = ss_all - ss_between
    ms_between = ss_between / (n_groups - 1)[:, None]
    ms_within = ss_within / (n - n_groups)[:, None]
    return ms_between / ms_within


def select_top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """SelectKBest's mask: the k highest scores, NaN lowest, ties to the later column (stable sort)."""
    clean = torch.nan_to_num(scores, nan=-torch.inf)
    order = torch.argsort(clean, dim=1, stable=True)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    mask.scatter_(1, order[:, -k:], True)
    return mask


def standardisation(x64: torch.Tensor, train: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """StandardScaler's mean and scale per problem on its training rows (float64; constant
    features get scale 1, with scikit-learn's test for constancy)."""
    n = train.sum(dim=1, keepdim=True)
    mean = train @ x64 / n
    var = train @ (x64 * x64) / n - mean**2
    var = var.clamp(min=0)
    eps = torch.finfo(torch.float64).eps
    constant = var <= n * eps * var + (n * mean * eps) ** 2
    scale = torch.where(constant, torch.ones_like(var), var.sqrt())
    return mean, scale


class _Whitened:
    """The objective (module docstring) in whitened, preconditioned coordinates, one problem per leading index.

    With Z = U S V^T a problem's standardised training rows, every W that matters lies in V's
    span: W = V B, logits = (U S) B + c and ||W|| = ||B||, so the problem is a logistic regression
    on the orthogonal columns U S (rows x rank). Its Hessian is close to diagonal there,
    S^2 q / n + reg (q: the softmax's curvature per row), so each coordinate is scaled by the
    square root of that diagonal (theta = sqrt(P) B), and the intercept by sqrt(q). L-BFGS then
    sees a problem whose curvature is about 1 in every direction, not the 10^4 spread of the
    standardised SAE codes, and needs a few tens of steps instead of hundreds. Stopping is on the
    gradient norm in W's coordinates, so `tol` keeps its meaning."""

    def __init__(self, design, onehot, weight, absent, ridge, unscale, intercept_factor):
        self.design, self.onehot, self.weight, self.absent = design, onehot, weight, absent  # b,n,r  b,n,k  b,n  b,k
        self.ridge, self.unscale, self.intercept_factor = ridge, unscale, intercept_factor  # b,r  b,(r*k+k)  b
        self.r, self.k = design.shape[2], onehot.shape[2]

    def subset(self, rows: torch.Tensor) -> "_Whitened":
        parts = (self.design, self.onehot, self.weight, self.absent, self.ridge, self.unscale, self.intercept_factor)
        return _Whitened(*(t[rows] for t in parts))

    def __call__(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, r, k = theta.shape[0], self.r, self.k
        w = theta[:, : r * k].view(b, r, k)
        c = theta[:, r * k :] * self.intercept_factor[:, None]
        log_p = torch.log_softmax(self.design @ w + (c + self.absent)[:, None], dim=2)
        loss = -(log_p * self.onehot).sum(dim=2).mul(self.weight).sum(dim=1) + 0.5 * (self.ridge[:, :, None] * w * w).sum(dim=(1, 2))
        residual = (log_p.exp() - self.onehot) * self.weight[:, :, None]
        grad_w = self.design.transpose(1, 2) @ residual + self.ridge[:, :, None] * w
        grad_c = residual.sum(dim=1) * self.intercept_factor[:, None]
        return loss, torch.cat([grad_w.reshape(b, r * k), grad_c], dim=1)

    def grad_norm(self, grad: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vector_norm(grad * self.unscale, dim=1)


def _whitening(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U S, S^2, basis) of each problem's standardised rows z (b x n x d), from the smaller of the
    two Gram matrices: with n < d, basis = U and W = z^T U S^-1 B; otherwise basis = V and W = V B."""
    wide = z.shape[1] < z.shape[2]
    gram = (z @ z.transpose(1, 2)) if wide else (z.transpose(1, 2) @ z)
    eigenvalues, basis = torch.linalg.eigh(gram.double())  # float32's eigh fails on the many zero eigenvalues of sparse codes
    eigenvalues, basis = eigenvalues.clamp(min=0).to(z.dtype), basis.to(z.dtype)
    if wide:
        return basis * eigenvalues.sqrt()[:, None, :], eigenvalues, basis
    return z @ basis, eigenvalues, basis


def _fit_whitened(rows, onehot, train, selected, mean, scale, present, penalty, tol: float, max_iter: int):
    """Fit every problem by L-BFGS on `_Whitened`. rows: each problem's own rows (b x n x d; rows
    outside training have train 0). Problems sharing their rows and columns (the label
    permutations of one fold, without a budget) share one eigendecomposition.
    Returns W (b x d x k, standardised columns), c, converged, iterations."""
    b, n, k = onehot.shape
    d = rows.shape[2]
    fold = torch.where(selected, 1.0 / scale, torch.zeros_like(scale))
    z = (rows * fold[:, None] - (mean * fold)[:, None]) * train[:, :, None]  # standardised training rows, zero elsewhere
    columns = None
    if not selected.all():  # a budget: the problem is its kept columns only (select_top keeps the same number for each)
        columns = torch.argsort(selected.to(torch.int8), dim=1, descending=True, stable=True)[:, : int(selected.sum(dim=1).max())]
        z = z.gather(2, columns[:, None, :].expand(-1, n, -1))
    key = torch.cat([train, selected.to(train.dtype), mean, scale], dim=1)
    unique, which = torch.unique(key, dim=0, return_inverse=True)
    firsts = torch.zeros(len(unique), dtype=torch.long, device=z.device).scatter_(0, which, torch.arange(b, device=z.device))
    first = firsts[which]
    same = (rows[first] == rows).flatten(1).all(dim=1)  # the key holds no rows: a problem with other rows gets its own
    firsts = torch.cat([firsts, torch.nonzero(~same).flatten()])
    which = torch.where(same, which, len(unique) + torch.cumsum(~same, 0) - 1)
    design, eigenvalues, basis = _whitening(z[firsts])
    n_train = train.sum(dim=1)
    n_present = present.sum(dim=1).to(z.dtype)
    curvature = (1 / n_present) * (1 - 1 / n_present)  # the softmax's p(1 - p) at the start, all classes equal
    reg = penalty / n_train
    precondition = (curvature / n_train)[:, None] * eigenvalues[which] + reg[:, None]  # the Hessian's diagonal, b x r
    root = precondition.sqrt()
    intercept_factor = 1 / curvature.sqrt()
    r = design.shape[2]
    unscale = torch.cat([root[:, :, None].expand(-1, -1, k).reshape(b, r * k), (1 / intercept_factor)[:, None].expand(-1, k)], dim=1)
    objective = _Whitened(
        design[which] / root[:, None, :],
        onehot * train[:, :, None],
        train / n_train[:, None],
        torch.where(present, 0.0, -1e30).to(z.dtype),
        reg[:, None] / precondition,
        unscale,
        intercept_factor,
    )
    theta, converged, iterations = _lbfgs(objective, r * k + k, b, tol, max_iter, z)
    coords = theta[:, : r * k].view(b, r, k) / root[:, :, None]  # B
    intercept = theta[:, r * k :] * intercept_factor[:, None]
    if z.shape[1] < z.shape[2]:
        values = eigenvalues[which]
        inverse = torch.where(values > values.amax(dim=1, keepdim=True) * 1e-10, values.rsqrt(), torch.zeros_like(values))
        coef = z.transpose(1, 2) @ (basis[which] @ (coords * inverse[:, :, None]))
    else:
        coef = basis[which] @ coords
    if columns is not None:
        coef = torch.zeros(b, d, k, dtype=coef.dtype, device=coef.device).scatter_(1, columns[:, :, None].expand(-1, -1, k), coef)
    return coef, intercept, converged, iterations


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise dot products of two (problems x ...) tensors."""
    return (a * b).flatten(1).sum(dim=1)


def _worth_compacting(done: torch.Tensor) -> bool:
    """Drop finished problems from the state once they are a quarter of it (copying the history
    every time one finishes would cost more than carrying a few along)."""
    return bool(done.sum() * 4 >= len(done)) and bool(done.any())


def _lbfgs(objective: _Whitened, n_params: int, n: int, tol: float, max_iter: int, like: torch.Tensor):
    """Per-problem L-BFGS with Armijo backtracking; returns parameters, converged mask, iterations.

    The state (parameters, history) holds only the problems still running: one that converges
    is written out and dropped, so the cost follows the problems left."""
    kind = {"dtype": like.dtype, "device": like.device}
    result = torch.zeros(n, n_params, **kind)
    converged = torch.zeros(n, dtype=torch.bool, device=like.device)
    ids = torch.arange(n, device=like.device)
    part = objective
    theta = torch.zeros(n, n_params, **kind)
    loss, grad = part(theta)
    s_hist = torch.zeros(HISTORY, n, n_params, **kind)
    y_hist = torch.zeros_like(s_hist)
    rho = torch.zeros(HISTORY, n, **kind)
    gamma = torch.ones(n, **kind)
    done = part.grad_norm(grad) <= tol
    iteration = 0
    while True:
        if _worth_compacting(done) or iteration >= max_iter:  # write out the finished problems and drop them from the state
            finished = done if iteration < max_iter else torch.ones_like(done)
            result[ids[finished]] = theta[finished]
            converged[ids[finished]] = part.grad_norm(grad)[finished] <= tol
            keep = ~finished
            ids, theta, loss, grad, gamma = ids[keep], theta[keep], loss[keep], grad[keep], gamma[keep]
            s_hist, y_hist, rho = s_hist[:, keep], y_hist[:, keep], rho[:, keep]
            part = objective.subset(ids)
        if ids.numel() == 0 or iteration >= max_iter:
            if ids.numel():
                result[ids] = theta
            break
        iteration += 1
        # two-loop recursion, newest pair first; a skipped pair has rho 0 and no effect
        q = grad.clone()
        alphas = []
        for back in range(HISTORY):
            j = (iteration - 2 - back) % HISTORY
            alpha = rho[j] * _dot(s_hist[j], q)
            q.sub_(y_hist[j] * alpha[:, None])
            alphas.append((j, alpha))
        q.mul_(gamma[:, None])
        for j, alpha in reversed(alphas):
            beta = rho[j] * _dot(y_hist[j], q)
            q.add_(s_hist[j] * (alpha - beta)[:, None])
        direction = q.neg_()
        slope = _dot(direction, grad)
        bad = slope >= 0
        if bad.any():  # not a descent direction: steepest descent for these problems
            direction[bad] = -grad[bad]
            slope[bad] = -_dot(grad[bad], grad[bad])
        if iteration == 1:  # as scipy's L-BFGS-B: the first step has length at most 1
            step = 1.0 / torch.linalg.vector_norm(grad, dim=1).clamp(min=1.0)
        else:
            step = torch.ones_like(loss)
        new_loss, new_grad = part(theta + step[:, None] * direction)
        failed = ~(new_loss <= loss + ARMIJO * step * slope)
        for _ in range(MAX_HALVINGS):
            if not failed.any():
                break
            rows = torch.nonzero(failed).flatten()
            step[rows] *= 0.5
            f, g = part.subset(rows)(theta[rows] + step[rows, None] * direction[rows])
            new_loss[rows], new_grad[rows] = f, g
            failed[rows] = ~(f <= loss[rows] + ARMIJO * step[rows] * slope[rows])
        stuck = failed  # no decrease at any step (the float floor): these stop where they are
        if stuck.any():
            step[stuck], new_loss[stuck], new_grad[stuck] = 0.0, loss[stuck], grad[stuck]
        s = step[:, None] * direction
        y = new_grad - grad
        sy, yy = _dot(s, y), _dot(y, y)
        good = (sy > 1e-10 * yy) & (yy > 0)
        slot = (iteration - 1) % HISTORY
        s_hist[slot] = torch.where(good[:, None], s, 0.0)
        y_hist[slot] = torch.where(good[:, None], y, 0.0)
        rho[slot] = torch.where(good, 1.0 / torch.where(good, sy, torch.ones_like(sy)), 0.0)
        gamma = torch.where(good, sy / torch.where(good, yy, torch.ones_like(yy)), gamma)
        theta += s
        loss, grad = new_loss, new_grad
        done = (part.grad_norm(grad) <= tol) | stuck
    return result, converged, iteration


def fit_probes(
    x: np.ndarray,
    labels: np.ndarray,
    train: np.ndarray,
    n_classes: int,
    budget: int | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    tol: float = 1e-3,
    max_iter: int = 2000,
    max_batch: int | None = None,
) -> BatchedProbes:
    """Fit one probe per row of `labels` (problems x rows, class indices) on the rows of `x`
    where `train` (problems x rows, bool) is set. `budget`: keep that many columns per problem by
    ANOVA F on its training rows. `dtype`: the solver's (float32 unless given; eigendecompositions in float64).
    Problems are fitted `max_batch` at a time; by default as many as keep the solver's state near
    `BATCH_BYTES` (all of them at the organism's size, a few at a time at CIFAR-100's)."""
    device = torch.device(device)
    dtype = dtype or torch.float32
    x = np.asarray(x, dtype=np.float64)
    labels, train = np.atleast_2d(labels), np.atleast_2d(np.asarray(train, bool))
    n_problems, d = labels.shape[0], x.shape[1]
    n_rows = int(train.sum(axis=1).max())
    rank = min(n_rows, d)
    per_problem = 4 * (3 * n_rows * d + 2 * n_rows * rank + (2 * HISTORY + 6) * (rank + 1) * n_classes)  # bytes of state
    batch = max_batch or max(1, min(n_problems, BATCH_BYTES // per_problem))
    parts = []
    centre = x.mean(axis=0)  # the fit is invariant to it; it spares float32 a cancellation
    x64 = torch.as_tensor(x - centre, device=device)
    xs = x64.to(dtype)
    # Batches of problems with the same number of training rows: a batch's tensors have as many rows as
    # its largest problem, and the full-data fit beside the cross-validation folds would pad every fold.
    sizes = train.sum(axis=1)
    order = np.argsort(sizes, kind="stable")
    batches = [chunk for size in np.unique(sizes) for chunk in np.array_split(order[sizes[order] == size], -(-int((sizes == size).sum()) // batch))]
    for rows in batches:
        lab = torch.as_tensor(labels[rows], device=device)
        tr64 = torch.as_tensor(train[rows], device=device, dtype=torch.float64)
        onehot64 = torch.nn.functional.one_hot(lab, n_classes).to(torch.float64)
        present = (onehot64 * tr64[:, :, None]).sum(dim=1) > 0
        mean, scale = standardisation(x64, tr64)
        if budget is not None and budget < d:
            selected = select_top(anova_f(x64, onehot64, tr64), budget)
        else:
            selected = torch.ones(len(lab), d, dtype=torch.bool, device=device)
        penalty = torch.where(present.sum(dim=1) == 2, 2.0, 1.0).to(dtype)
        args = (xs, onehot64.to(dtype), tr64.to(dtype), selected, mean.to(dtype), scale.to(dtype), present, penalty)
        m = int(tr64.sum(dim=1).max())
        own = torch.argsort((tr64 == 0).to(torch.int8), dim=1, stable=True)[:, :m]  # each problem's training rows first
        own_rows = (xs[own], args[1].gather(1, own[:, :, None].expand(-1, -1, n_classes)), args[2].gather(1, own))
        coef, intercept, converged, iterations = _fit_whitened(*own_rows, *args[3:], tol=tol, max_iter=max_iter)
        coef = coef.double() * selected[:, :, None]
        parts.append((selected, mean + torch.as_tensor(centre, device=device), scale, coef, intercept.double(), present, converged, iterations))
    back = np.argsort(np.concatenate(batches), kind="stable")  # the problems' own order
    cat = [torch.cat([p[i] for p in parts]).cpu().numpy()[back] for i in range(7)]
    fitted = BatchedProbes(*cat, iterations=max(p[7] for p in parts))
    if not fitted.converged.all():  # as scikit-learn's ConvergenceWarning: the fit stands, the log says so
        log.warning("%d of %d probes did not reach a gradient norm of %g in %d L-BFGS steps", int((~fitted.converged).sum()), n_problems, tol, max_iter)
    return fitted
