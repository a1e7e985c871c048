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
until each problem's gradient norm is under `tol` (1e-3; scikit-learn stops when the largest
entry is under 1e-4, a criterion of about the same strength at these sizes; the solvers'
accuracies agree to 0.02, tests/test_probes.py); problems that reach `max_iter` first are
logged as not converged. With fewer rows than columns (SAE codes) the iterations run in the
span of each problem's standardised training rows, the same iterates at a fraction of the cost.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

log = logging.getLogger(__name__)

HISTORY = 10  # L-BFGS curvature pairs kept per problem
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
    """Row-wise dot products of two (problems x ...) tensors, as one batched matrix product (no temporary)."""
    return torch.linalg.vecdot(a.flatten(1), b.flatten(1))


def _worth_compacting(done: torch.Tensor) -> bool:
    """Drop finished problems from the state once they are a quarter of it (copying the history
    every time one finishes would cost more than carrying a few along)."""
    return bool(done.sum() * 4 >= len(done)) and bool(done.any())


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
    done = torch.linalg.vector_norm(grad, dim=1) <= tol
    iteration = 0
    while True:
        if _worth_compacting(done) or iteration >= max_iter:  # write out the finished problems and drop them from the state
            finished = done if iteration < max_iter else torch.ones_like(done)
            result[ids[finished]] = theta[finished]
            converged[ids[finished]] = torch.linalg.vector_norm(grad[finished], dim=1) <= tol
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
        done = (torch.linalg.vector_norm(grad, dim=1) <= tol) | stuck
    return result, converged, iteration


def _fit_in_row_space(x, onehot, train, selected, mean, scale, present, penalty, tol: float, max_iter: int):
    """The same L-BFGS, run in the span of each problem's standardised rows (W = Z^T A), for
    fewer rows than columns. The iterates are the primal method's (inner products taken through
    the Gram matrix G = Z Z^T), but every step costs two (rows x rows) products instead of two
    (rows x columns) ones, and a line search costs no product at all. Returns W, c, converged, iterations."""
    b, n, k = onehot.shape
    fold = torch.where(selected, 1.0 / scale, torch.zeros_like(scale))
    rows = x if x.dim() == 3 else x[None]  # each problem's own rows (its training rows), or the rows all share
    z = rows * fold[:, None] - (mean * fold)[:, None]  # b, n, d: each problem's standardised rows
    gram = z @ z.transpose(1, 2)
    kind = {"dtype": x.dtype, "device": x.device}
    y_true = onehot * train[:, :, None]
    n_train = train.sum(dim=1)
    reg = penalty / n_train  # b
    absent = torch.where(present, 0.0, -1e30).to(x.dtype)[:, None]
    weight = (train / n_train[:, None])[:, :, None]

    def evaluate(logits, a_norm, rows=None):  # rows: a subset of the running problems (None: all)
        pick = (lambda t: t) if rows is None else (lambda t: t[rows])
        log_p = torch.log_softmax(logits + pick(absent), dim=2)
        target, w = pick(y_true), pick(weight)
        loss = -(log_p * target).sum(dim=2).mul(w[:, :, 0]).sum(dim=1) + 0.5 * pick(reg) * a_norm
        return loss, (log_p.exp() - target) * w

    def inner(g_u_a, u_c, v_a, v_c):  # <u, v> in the primal, given G u
        return _dot(g_u_a, v_a) + _dot(u_c, v_c)

    ids = torch.arange(b, device=x.device)
    a_coef, c = torch.zeros(b, n, k, **kind), torch.zeros(b, k, **kind)
    out_a, out_c = torch.zeros_like(a_coef), torch.zeros_like(c)
    converged = torch.zeros(b, dtype=torch.bool, device=x.device)
    g_a_coef = torch.zeros_like(a_coef)  # G A
    a_norm = torch.zeros(b, **kind)  # ||W||^2 = <A, GA>
    logits = torch.zeros(b, n, k, **kind)
    loss, residual = evaluate(logits, a_norm)
    grad_a, grad_c = residual + reg[:, None, None] * a_coef, residual.sum(dim=1)  # W's gradient is Z^T grad_a
    g_grad_a = gram @ residual + reg[:, None, None] * g_a_coef
    hist = {key: torch.zeros(HISTORY, b, n, k, **kind) for key in ("s", "y", "gs", "gy")}
    hist_c = {key: torch.zeros(HISTORY, b, k, **kind) for key in ("s", "y")}
    rho = torch.zeros(HISTORY, b, **kind)
    gamma = torch.ones(b, **kind)
    grad_norm = inner(g_grad_a, grad_c, grad_a, grad_c).clamp(min=0).sqrt()
    done = grad_norm <= tol
    iteration = 0
    while True:
        if _worth_compacting(done) or iteration >= max_iter or (done.all() and done.numel()):
            finished = done if iteration < max_iter else torch.ones_like(done)
            out_a[ids[finished]], out_c[ids[finished]] = a_coef[finished], c[finished]
            converged[ids[finished]] = grad_norm[finished] <= tol
            keep = ~finished
            ids, a_coef, c, g_a_coef, a_norm, logits, loss = (t[keep] for t in (ids, a_coef, c, g_a_coef, a_norm, logits, loss))
            grad_a, grad_c, g_grad_a, gamma, grad_norm = (t[keep] for t in (grad_a, grad_c, g_grad_a, gamma, grad_norm))
            hist = {key: t[:, keep] for key, t in hist.items()}
            hist_c = {key: t[:, keep] for key, t in hist_c.items()}
            rho = rho[:, keep]
            gram, y_true, weight, absent, reg = gram[keep], y_true[keep], weight[keep], absent[keep], reg[keep]
        if ids.numel() == 0:
            break
        iteration += 1
        q_a, q_c = grad_a.clone(), grad_c.clone()
        alphas = []
        for back in range(HISTORY):
            j = (iteration - 2 - back) % HISTORY
            alpha = rho[j] * inner(hist["gs"][j], hist_c["s"][j], q_a, q_c)
            q_a.addcmul_(hist["y"][j], alpha[:, None, None], value=-1)
            q_c.addcmul_(hist_c["y"][j], alpha[:, None], value=-1)
            alphas.append((j, alpha))
        q_a *= gamma[:, None, None]
        q_c *= gamma[:, None]
        for j, alpha in reversed(alphas):
            beta = rho[j] * inner(hist["gy"][j], hist_c["y"][j], q_a, q_c)
            q_a.addcmul_(hist["s"][j], (alpha - beta)[:, None, None])
            q_c.addcmul_(hist_c["s"][j], (alpha - beta)[:, None])
        d_a, d_c = -q_a, -q_c
        g_d = gram @ d_a
        slope = inner(g_d, d_c, grad_a, grad_c)
        bad = slope >= 0
        if bad.any():  # not a descent direction: steepest descent for these problems
            d_a[bad], d_c[bad], g_d[bad] = -grad_a[bad], -grad_c[bad], -g_grad_a[bad]
            slope[bad] = -(grad_norm[bad] ** 2)
        if iteration == 1:  # as scipy's L-BFGS-B: the first step has length at most 1
            step = 1.0 / grad_norm.clamp(min=1.0)
        else:
            step = torch.ones_like(loss)
        delta = g_d + d_c[:, None, :]  # change of the logits per unit step
        a_dot_d, d_dot_d = _dot(g_a_coef, d_a), _dot(g_d, d_a)
        pending = torch.arange(len(ids), device=x.device)
        new_loss, new_residual = torch.empty_like(loss), torch.empty_like(logits)
        for _ in range(MAX_HALVINGS):
            t = step[pending]
            norm = a_norm[pending] + 2 * t * a_dot_d[pending] + t * t * d_dot_d[pending]
            whole = pending.numel() == len(ids)
            trial = logits + t[:, None, None] * delta if whole else logits[pending] + t[:, None, None] * delta[pending]
            f, r = evaluate(trial, norm, None if whole else pending)
            ok = f <= loss[pending] + ARMIJO * t * slope[pending]
            new_loss[pending[ok]], new_residual[pending[ok]] = f[ok], r[ok]
            pending = pending[~ok]
            if pending.numel() == 0:
                break
            step[pending] *= 0.5
        stuck = torch.zeros(len(ids), dtype=torch.bool, device=x.device)
        if pending.numel():  # no decrease at any step (the float floor): these stop where they are
            stuck[pending] = True
            step[pending] = 0.0
            _, new_residual[pending] = evaluate(logits[pending], a_norm[pending], pending)
            new_loss[pending] = loss[pending]
        t3, t2 = step[:, None, None], step[:, None]
        a_coef, c, g_a_coef = a_coef + t3 * d_a, c + t2 * d_c, g_a_coef + t3 * g_d
        a_norm = a_norm + 2 * step * a_dot_d + step * step * d_dot_d
        logits = logits + t3 * delta
        new_grad_a = new_residual + reg[:, None, None] * a_coef
        new_grad_c = new_residual.sum(dim=1)
        new_g_grad_a = gram @ new_residual + reg[:, None, None] * g_a_coef
        s_a, s_c, gs_a = t3 * d_a, t2 * d_c, t3 * g_d
        y_a, y_c, gy_a = new_grad_a - grad_a, new_grad_c - grad_c, new_g_grad_a - g_grad_a
        sy, yy = inner(gs_a, s_c, y_a, y_c), inner(gy_a, y_c, y_a, y_c)
        good = (sy > 1e-10 * yy) & (yy > 0)
        slot = (iteration - 1) % HISTORY
        g3, g2 = good[:, None, None], good[:, None]
        hist["s"][slot], hist["gs"][slot] = torch.where(g3, s_a, 0.0), torch.where(g3, gs_a, 0.0)
        hist["y"][slot], hist["gy"][slot] = torch.where(g3, y_a, 0.0), torch.where(g3, gy_a, 0.0)
        hist_c["s"][slot], hist_c["y"][slot] = torch.where(g2, s_c, 0.0), torch.where(g2, y_c, 0.0)
        rho[slot] = torch.where(good, 1.0 / torch.where(good, sy, torch.ones_like(sy)), 0.0)
        gamma = torch.where(good, sy / torch.where(good, yy, torch.ones_like(yy)), gamma)
        loss, grad_a, grad_c, g_grad_a = new_loss, new_grad_a, new_grad_c, new_g_grad_a
        grad_norm = inner(g_grad_a, grad_c, grad_a, grad_c).clamp(min=0).sqrt()
        done = (grad_norm <= tol) | stuck
    coef = z.transpose(1, 2) @ out_a  # W = Z^T A, zero outside the selected columns
    return coef, out_c, converged, iteration


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
    ANOVA F on its training rows. `dtype`: float32 on a GPU, float64 on the CPU unless given.
    Problems are fitted `max_batch` at a time; by default as many as keep the solver's state near
    `BATCH_BYTES` (all of them at the organism's size, a few at a time at CIFAR-100's)."""
    device = torch.device(device)
    dtype = dtype or torch.float32
    x = np.asarray(x, dtype=np.float64)
    labels, train = np.atleast_2d(labels), np.atleast_2d(np.asarray(train, bool))
    n_problems, d = labels.shape[0], x.shape[1]
    n_rows = int(train.sum(axis=1).max())
    per_problem = 4 * (n_rows * d + 4 * HISTORY * n_rows * n_classes if len(x) < d else 4 * HISTORY * d * n_classes)  # bytes of state
    batch = max_batch or max(1, min(n_problems, BATCH_BYTES // per_problem))
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
        args = (xs, onehot64.to(dtype), tr64.to(dtype), selected, mean.to(dtype), scale.to(dtype), present, penalty)
        if len(x) < d:  # fewer rows than columns: the same iterates, in the span of each problem's training rows
            m = int(tr64.sum(dim=1).max())
            own = torch.argsort((tr64 == 0).to(torch.int8), dim=1, stable=True)[:, :m]  # training rows first; padding has weight 0
            own_rows = (xs[own], args[1].gather(1, own[:, :, None].expand(-1, -1, n_classes)), args[2].gather(1, own))
            coef, intercept, converged, iterations = _fit_in_row_space(*own_rows, *args[3:], tol=tol, max_iter=max_iter)
        else:
            theta, converged, iterations = _lbfgs(_Objective(*args), d * n_classes + n_classes, len(lab), tol, max_iter, xs)
            coef, intercept = theta[:, : d * n_classes].view(-1, d, n_classes), theta[:, d * n_classes :]
        coef = coef.double() * selected[:, :, None]
        parts.append((selected, mean + torch.as_tensor(centre, device=device), scale, coef, intercept.double(), present, converged, iterations))
    cat = [torch.cat([p[i] for p in parts]).cpu().numpy() for i in range(7)]
    fitted = BatchedProbes(*cat, iterations=max(p[7] for p in parts))
    if not fitted.converged.all():  # as scikit-learn's ConvergenceWarning: the fit stands, the log says so
        log.warning("%d of %d probes did not reach a gradient norm of %g in %d L-BFGS steps", int((~fitted.converged).sum()), n_problems, tol, max_iter)
    return fitted
