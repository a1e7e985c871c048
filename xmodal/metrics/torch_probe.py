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

It is minimised by L-BFGS run per problem (its own history, step and Armijo line search)
until every problem's largest gradient entry is under `tol` (scikit-learn's ``gtol`` is
1e-4 on the same scaled objective); problems that reach `max_iter` first are reported as
not converged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

HISTORY = 10  # L-BFGS curvature pairs kept per problem
ARMIJO = 1e-4  # sufficient decrease of the line search
MAX_HALVINGS = 40


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
        z = (np.asarray(x, float)[None] - self.mean[:, None]) / self.scale[:, None]
        z = np.where(self.selected[:, None], z, 0.0)
        logits = np.einsum("bnd,bdk->bnk", z, self.coef) + self.intercept[:, None]
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


class _Objective:
    """Loss and gradient of a set of problems, parameters flattened to (problems x (d*k + k))."""

    def __init__(self, x: torch.Tensor, onehot, train, selected, mean, scale, present, penalty):
        self.x, self.d, self.k = x, x.shape[1], onehot.shape[2]
        self.onehot, self.train = onehot * train[:, :, None], train  # a test row's label plays no part
        self.n_train = train.sum(dim=1)
        self.fold = torch.where(selected, 1.0 / scale, torch.zeros_like(scale))  # column factor in the raw input space
        self.shift = mean * self.fold  # b, d
        self.absent = torch.where(present, 0.0, -1e30).to(x.dtype)  # finite: 0 * it stays 0
        self.penalty = penalty  # b: 1, or 2 for two classes

    def subset(self, rows: torch.Tensor) -> "_Objective":
        part = object.__new__(_Objective)
        part.x, part.d, part.k = self.x, self.d, self.k
        for name in ("onehot", "train", "n_train", "fold", "shift", "absent", "penalty"):
            setattr(part, name, getattr(self, name)[rows])
        return part

    def __call__(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, d, k = theta.shape[0], self.d, self.k
        w = theta[:, : d * k].view(b, d, k)
        c = theta[:, d * k :]
        w_raw = w * self.fold[:, :, None]  # logits = x @ w_raw + c - shift @ w
        bias = c - torch.einsum("bd,bdk->bk", self.shift, w)
        logits = (self.x @ w_raw.permute(1, 0, 2).reshape(d, b * k)).view(-1, b, k).permute(1, 0, 2) + bias[:, None] + self.absent[:, None]
        log_p = torch.log_softmax(logits, dim=2)
        scale = self.train / self.n_train[:, None]  # b, n
        loss = -(log_p * self.onehot).sum(dim=2).mul(scale).sum(dim=1)
        loss = loss + 0.5 * self.penalty / self.n_train * (w * w).sum(dim=(1, 2))
        residual = (log_p.exp() - self.onehot) * scale[:, :, None]  # b, n, k
        grad_raw = (self.x.T @ residual.permute(1, 0, 2).reshape(-1, b * k)).view(d, b, k).permute(1, 0, 2)
        grad_c = residual.sum(dim=1)
        grad_w = grad_raw * self.fold[:, :, None] - self.shift[:, :, None] * grad_c[:, None, :]
        grad_w = grad_w + (self.penalty / self.n_train)[:, None, None] * w
        return loss, torch.cat([grad_w.reshape(b, d * k), grad_c], dim=1)


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vecdot(a, b)


def _lbfgs(objective: _Objective, n_params: int, n: int, tol: float, max_iter: int, like: torch.Tensor):
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
    done = grad.abs().amax(dim=1) <= tol
    iteration = 0
    while True:
        if done.any():  # write out the finished problems and drop them from the state
            finished = done if iteration < max_iter else torch.ones_like(done)
            result[ids[finished]] = theta[finished]
            converged[ids[finished]] = grad[finished].abs().amax(dim=1) <= tol
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
        done = (grad.abs().amax(dim=1) <= tol) | stuck
    return result, converged, iteration


def fit_probes(
    x: np.ndarray,
    labels: np.ndarray,
    train: np.ndarray,
    n_classes: int,
    budget: int | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    tol: float = 1e-5,
    max_iter: int = 2000,
    max_batch: int | None = None,
) -> BatchedProbes:
    """Fit one probe per row of `labels` (problems x rows, class indices) on the rows of `x`
    where `train` (problems x rows, bool) is set. `budget`: keep that many columns per problem by
    ANOVA F on its training rows. `dtype`: float32 on a GPU, float64 on the CPU unless given.
    Problems are fitted `max_batch` at a time (all at once by default)."""
    device = torch.device(device)
    dtype = dtype or (torch.float32 if device.type == "cuda" else torch.float64)
    x = np.asarray(x, dtype=np.float64)
    labels, train = np.atleast_2d(labels), np.atleast_2d(np.asarray(train, bool))
    n_problems, d = labels.shape[0], x.shape[1]
    batch = max_batch or n_problems
    parts = []
    centre = x.mean(axis=0)  # the fit is invariant to it; it spares float32 a cancellation
    x64 = torch.as_tensor(x - centre, device=device)
    xs = x64.to(dtype)
    for start in range(0, n_problems, batch):
        rows = slice(start, start + batch)
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
        objective = _Objective(xs, onehot64.to(dtype), tr64.to(dtype), selected, mean.to(dtype), scale.to(dtype), present, penalty)
        theta, converged, iterations = _lbfgs(objective, d * n_classes + n_classes, len(lab), tol, max_iter, xs)
        coef = theta[:, : d * n_classes].view(-1, d, n_classes).double() * selected[:, :, None]
        parts.append((selected, mean + torch.as_tensor(centre, device=device), scale, coef, theta[:, d * n_classes :].double(), present,
                      converged, iterations))  # fmt: skip
    cat = [torch.cat([p[i] for p in parts]).cpu().numpy() for i in range(7)]
    return BatchedProbes(*cat, iterations=max(p[7] for p in parts))
