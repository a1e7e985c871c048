"""Linear probes on codes: within a modality, and trained on one modality, tested on the other.

Every score comes with its null: chance (the majority-class rate of the test labels)
and a label-shuffled control (the same probe refit on permuted training labels,
`n_permutations` times), with a permutation p-value.

Two solvers fit the same probe (standardise, optionally keep the `budget` best columns by
ANOVA F, L2 logistic regression with C = 1): ``torch`` (xmodal.metrics.torch_probe) fits
every fold and every permutation of a probe as one batched problem, on the GPU when there
is one; ``sklearn`` refits scikit-learn's Pipeline one problem at a time, the reference.
Both draw the same label permutations and the same splits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from sklearn.feature_selection import SelectKBest, f_classif
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score
from sklearn.model_selection import (
    GroupKFold,
    StratifiedGroupKFold,
    StratifiedKFold,
    StratifiedShuffleSplit,
    cross_val_predict,
    permutation_test_score,
)
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from xmodal.errors import DatasetError
from xmodal.metrics.statistics import pvalue
from xmodal.metrics.torch_probe import fit_probes

SOLVERS = ("torch", "sklearn")


@dataclass
class ProbeScore:
    accuracy: float
    macro_f1: float
    chance: float
    shuffled_mean: float
    shuffled_q975: float
    p_value: float
    n_train: int
    n_test: int
    weights: dict[str, np.ndarray] | None = field(default=None, repr=False)  # the probe fitted on all its training data
    classes: list[str] = field(default_factory=list)

    def as_row(self) -> dict[str, float]:
        return {k: v for k, v in self.__dict__.items() if k not in ("weights", "classes")}


def fitted_weights(probe: Pipeline) -> tuple[dict[str, np.ndarray], list[str]]:
    """A fitted probe's parameters, enough to reproduce its predictions: the input columns it kept
    (``columns``), the standardisation (``scale_mean``, ``scale_std``), then the logistic regression
    (``coef``: classes x kept columns, or 1 x kept columns for two classes; ``intercept``)."""
    n_inputs = probe.named_steps["scale"].n_features_in_ if "select" not in probe.named_steps else probe.named_steps["select"].n_features_in_
    columns = probe.named_steps["select"].get_support(indices=True) if "select" in probe.named_steps else np.arange(n_inputs)
    scale, clf = probe.named_steps["scale"], probe.named_steps["clf"]
    weights = {
        "columns": np.asarray(columns, dtype=np.int64),
        "scale_mean": np.asarray(scale.mean_, dtype=np.float32),
        "scale_std": np.asarray(scale.scale_, dtype=np.float32),
        "coef": np.asarray(clf.coef_, dtype=np.float32),
        "intercept": np.asarray(clf.intercept_, dtype=np.float32),
    }
    return weights, [str(c) for c in clf.classes_]


def make_probe(seed: int, budget: int | None = None) -> Pipeline:
    """Standardise, optionally keep the `budget` most class-separating features (ANOVA F), then logistic regression."""
    steps = []
    if budget:
        steps.append(("select", SelectKBest(f_classif, k=budget)))
    steps += [("scale", StandardScaler()), ("clf", LogisticRegression(max_iter=2000, random_state=seed))]
    return Pipeline(steps)


def prepare_features(x: np.ndarray, binarise: bool = False, keep: np.ndarray | None = None) -> np.ndarray:
    x = np.asarray(x, float)
    if keep is not None:
        x = x[:, keep]
    return (x > 0).astype(float) if binarise else x


def over_represented(x: np.ndarray, max_active_fraction: float) -> np.ndarray:
    """Mask of features to keep: those active (> 0) in at most this fraction of samples."""
    return (np.asarray(x) > 0).mean(axis=0) <= max_active_fraction


def check_labels(y: np.ndarray, what: str) -> None:
    classes, counts = np.unique(y, return_counts=True)
    if len(classes) < 2:
        raise DatasetError(f"{what}: a probe needs at least 2 classes, got {len(classes)} ({list(classes)})")


def _budget(budget: int | None, n_features: int) -> int | None:
    return None if budget is None or budget >= n_features else budget


def shuffle_labels(y: np.ndarray, groups: np.ndarray | None, rng: np.random.Generator | np.random.RandomState) -> np.ndarray:
    """y permuted over all rows, or only among rows of the same group; the draws of
    scikit-learn's own shuffle in permutation_test_score, so both solvers see the same nulls."""
    if groups is None:
        return y[rng.permutation(len(y))]
    order = np.arange(len(groups))
    for group in np.unique(groups):
        rows = groups == group
        order[rows] = rng.permutation(order[rows])
    return y[order]


def split_shortfall(y: np.ndarray, train_per_class: int | None = None, train_fraction: float | None = None) -> str | None:
    """Why a low-data split cannot be drawn from these labels (None when it can)."""
    classes, counts = np.unique(y, return_counts=True)
    if train_per_class is not None:
        short = [str(c) for c, n in zip(classes, counts) if n <= train_per_class]
        if short:
            return (
                f"train_per_class={train_per_class} leaves no test example for classes {short[:5]} (they have {counts.min()} examples); lower train_per_class"
            )
    if train_fraction is not None:
        n_train = int(np.floor(train_fraction * len(y)))  # as scikit-learn's shuffle split counts it
        if round(counts.min() * train_fraction) < 1 or n_train < len(classes):
            return (
                f"a {train_fraction:.0%} training split of {len(y)} examples in {len(classes)} classes leaves class "
                f"{str(classes[counts.argmin()])!r} ({counts.min()} examples) or others without a training example; "
                "use more examples per class or a larger split"
            )
    return None


def concept_grouped_splits(y: np.ndarray, concepts: np.ndarray, seed: int, what: str) -> list[tuple[np.ndarray, np.ndarray]] | None:
    """Folds that keep every concept on one side, when a class holds several concepts (label=category):
    stratified by class, grouped by concept. None when every class is one concept, or every concept one
    sample (COCO's caption-image pairs): plain folds leak nothing then."""
    per_class = pd.Series(concepts).groupby(y).nunique()
    if (per_class <= 1).all() or pd.Series(concepts).value_counts().max() <= 1:  # one concept a class, or one sample a concept
        return None
    if per_class.min() < 2:
        raise DatasetError(
            f"{what}: class {str(per_class.idxmin())!r} holds a single concept, so it cannot be tested on a concept it was not "
            "trained on; give every category two or more concepts, or use experiment.label=concept"
        )
    cv = StratifiedGroupKFold(n_splits=int(min(5, per_class.min())), shuffle=True, random_state=seed)
    return list(cv.split(np.zeros(len(y)), y, concepts))


def within_modality(
    x: np.ndarray,
    y: np.ndarray,
    seed: int,
    n_permutations: int,
    budget: int | None = None,
    train_per_class: int | None = None,
    groups: np.ndarray | None = None,
    what: str = "probe",
    n_jobs: int | None = None,
    train_fraction: float | None = None,
    concepts: np.ndarray | None = None,
    solver: str = "torch",
    device: str | None = None,
) -> ProbeScore:
    """Cross-validated probe inside one modality; null: the probe refit on permuted labels
    (scikit-learn's permutation_test_score, or the same permutations and splits in one batch with torch).

    Low-data splits: `train_per_class` examples per class, or `train_fraction` of each class
    (seed 003's 1:9 ... 5:5), five stratified shuffle splits either way.
    `groups`: folds keep each group on one side, and labels are permuted within groups (the
    attribute probes: an image's variants). `concepts`: each sample's concept; when a class holds
    several (label=category), folds keep each concept on one side and labels are permuted over all rows.
    `n_jobs` spreads scikit-learn's refits over processes (-1: every core); results do not depend on it.
    """
    check_labels(y, what)
    if solver not in SOLVERS:
        raise ValueError(f"solver={solver!r}: use one of {SOLVERS}")
    classes, counts = np.unique(y, return_counts=True)
    shortfall = split_shortfall(y, train_per_class, train_fraction)
    if shortfall is not None:
        raise DatasetError(f"{what}: {shortfall}")
    grouped = concept_grouped_splits(y, concepts, seed, what) if concepts is not None and groups is None else None
    if grouped is not None and (train_per_class is not None or train_fraction is not None):
        raise DatasetError(
            f"{what}: a low-data split (train_per_class, train_split) is not grouped by concept, and with "
            "label=category it would test on concepts seen in training; drop the split or use label=concept"
        )
    if train_per_class is not None:
        cv = StratifiedShuffleSplit(n_splits=5, train_size=train_per_class * len(classes), random_state=seed)
    elif train_fraction is not None:
        cv = StratifiedShuffleSplit(n_splits=5, train_size=train_fraction, test_size=1 - train_fraction, random_state=seed)
    elif grouped is not None:
        cv = grouped
    elif groups is not None:
        cv = GroupKFold(n_splits=min(5, len(np.unique(groups))))
    else:
        if counts.min() < 2:
            raise DatasetError(f"{what}: class {str(classes[counts.argmin()])!r} has a single example; cross-validation needs 2 per class")
        cv = StratifiedKFold(n_splits=int(min(5, counts.min())), shuffle=True, random_state=seed)
    shuffled_splits = train_per_class is not None or train_fraction is not None
    if solver == "sklearn":
        score, null, p_value, macro_f1, (weights, names) = _sklearn_within(x, y, cv, groups, seed, n_permutations, budget, n_jobs, shuffled_splits)
    else:
        score, null, p_value, macro_f1, (weights, names) = _torch_within(x, y, cv, groups, seed, n_permutations, budget, device, shuffled_splits)
    chance = float(counts.max() / counts.sum())
    if train_per_class is not None:
        n_train = train_per_class * len(classes)
    elif train_fraction is not None:
        n_train = int(np.floor(train_fraction * len(y)))
    else:
        n_folds = len(cv) if isinstance(cv, list) else cv.get_n_splits()
        n_train = int(len(y) * (1 - 1 / n_folds))
    return ProbeScore(
        float(score), float(macro_f1), chance, float(null.mean()), float(np.quantile(null, 0.975)), float(p_value), n_train, len(y) - n_train, weights, names
    )


def _sklearn_within(x, y, cv, groups, seed, n_permutations, budget, n_jobs, shuffled_splits):
    """The reference: scikit-learn's permutation_test_score, one Pipeline refit per fold and permutation."""
    probe = make_probe(seed, _budget(budget, x.shape[1]))
    score, null, p_value = permutation_test_score(
        probe, x, y, groups=groups, cv=cv, n_permutations=n_permutations, random_state=seed, scoring="accuracy", n_jobs=n_jobs
    )
    if not shuffled_splits:
        predicted = cross_val_predict(probe, x, y, groups=groups, cv=cv)
        macro_f1 = f1_score(y, predicted, average="macro")
    else:  # shuffle splits do not cover every sample once; score F1 split by split
        scores = []
        for train, test in cv.split(x, y):
            scores.append(f1_score(y[test], probe.fit(x[train], y[train]).predict(x[test]), average="macro"))
        macro_f1 = float(np.mean(scores))
    return score, null, p_value, macro_f1, fitted_weights(probe.fit(x, y))  # the probe to keep: fitted on every sample once scored


def _splits(cv, x: np.ndarray, y: np.ndarray, groups: np.ndarray | None) -> list[tuple[np.ndarray, np.ndarray]]:
    """The folds for these labels: fixed folds as given, or the splitter's (which may depend on y, as in scikit-learn)."""
    return cv if isinstance(cv, list) else list(cv.split(x, y, groups))


def _torch_within(x, y, cv, groups, seed, n_permutations, budget, device, shuffled_splits):
    """Every fold of the observed labels and of each permutation, and the final fit on all rows: one batched fit.
    Permutations and folds are scikit-learn's (its RandomState shuffle, then the splitter on the shuffled labels)."""
    classes, codes = np.unique(y, return_inverse=True)
    random_state = np.random.RandomState(seed)
    label_sets = [codes] + [shuffle_labels(codes, groups, random_state) for _ in range(n_permutations)]
    problems = [(j, train, test) for j, labels in enumerate(label_sets) for train, test in _splits(cv, x, labels, groups)]
    train_mask = np.zeros((len(problems) + 1, len(y)), dtype=bool)
    for b, (_, train, _) in enumerate(problems):
        train_mask[b, train] = True
    train_mask[-1] = True  # the probe to keep: fitted on every sample
    labels = np.stack([label_sets[j] for j, _, _ in problems] + [codes])
    fitted = fit_probes(x, labels, train_mask, len(classes), _budget(budget, x.shape[1]), device or "cpu")
    predicted = fitted.predict(x)
    fold_accuracy = np.array([np.mean(predicted[b, test] == labels[b, test]) for b, (_, _, test) in enumerate(problems)])
    which = np.array([j for j, _, _ in problems])
    per_set = np.array([fold_accuracy[which == j].mean() for j in range(len(label_sets))])
    observed = [(b, test) for b, (j, _, test) in enumerate(problems) if j == 0]
    if not shuffled_splits:
        out_of_fold = np.empty(len(y), dtype=int)
        for b, test in observed:
            out_of_fold[test] = predicted[b, test]
        macro_f1 = f1_score(y, classes[out_of_fold], average="macro")
    else:
        macro_f1 = float(np.mean([f1_score(y[test], classes[predicted[b, test]], average="macro") for b, test in observed]))
    null = per_set[1:]
    return per_set[0], null, pvalue(per_set[0], null), macro_f1, fitted.weights(len(problems), classes)


def transfer(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    seed: int,
    n_permutations: int,
    budget: int | None = None,
    what: str = "transfer probe",
    null_groups: np.ndarray | None = None,
    solver: str = "torch",
    device: str | None = None,
) -> ProbeScore:
    """Fit on one modality, score on the other; null: refit on shuffled training labels, over all
    training rows or, with `null_groups` (each training row's category), only within a group."""
    check_labels(y_train, what)
    if solver not in SOLVERS:
        raise ValueError(f"solver={solver!r}: use one of {SOLVERS}")
    missing = sorted(set(np.unique(y_test)) - set(np.unique(y_train)))
    if missing:
        raise DatasetError(f"{what}: test classes {missing[:5]} have no training example; every class needs both modalities")
    rng = np.random.default_rng(seed)
    if solver == "sklearn":
        probe = make_probe(seed, _budget(budget, x_train.shape[1]))
        predicted = probe.fit(x_train, y_train).predict(x_test)
        weights, names = fitted_weights(probe)  # before the null refits the same pipeline
        null = np.array([accuracy_score(y_test, probe.fit(x_train, shuffle_labels(y_train, null_groups, rng)).predict(x_test)) for _ in range(n_permutations)])
    else:
        classes, codes = np.unique(y_train, return_inverse=True)
        labels = np.stack([codes] + [shuffle_labels(codes, null_groups, rng) for _ in range(n_permutations)])
        fitted = fit_probes(x_train, labels, np.ones_like(labels, dtype=bool), len(classes), _budget(budget, x_train.shape[1]), device or "cpu")
        all_predicted = classes[fitted.predict(x_test)]
        predicted = all_predicted[0]
        weights, names = fitted.weights(0, classes)
        null = (all_predicted[1:] == np.asarray(y_test)[None]).mean(axis=1)
    accuracy = accuracy_score(y_test, predicted)
    _, counts = np.unique(y_test, return_counts=True)
    return ProbeScore(
        float(accuracy),
        float(f1_score(y_test, predicted, average="macro")),
        float(counts.max() / counts.sum()),
        float(null.mean()),
        float(np.quantile(null, 0.975)),
        pvalue(accuracy, null),
        len(y_train),
        len(y_test),
        weights,
        names,
    )


def shared_features(codes: np.ndarray, labels: np.ndarray, per_class: int) -> pd.DataFrame:
    """Per class, the `per_class` features active (> 0) in most of its samples (seed 003's "top 2
    features shared across 100 instances"), with how often each is active in the other classes'
    samples: the null a shared feature has to beat to say anything about its class."""
    active = np.asarray(codes) > 0
    rows = []
    for label in np.unique(labels):
        mine = labels == label
        counts = active[mine].sum(axis=0)
        for rank, feature in enumerate(np.argsort(-counts, kind="stable")[:per_class], start=1):
            if counts[feature] == 0:
                break
            rows.append(
                {
                    "class": str(label),
                    "rank": rank,
                    "feature": int(feature),
                    "occurrences": int(counts[feature]),
                    "n_samples": int(mine.sum()),
                    "fraction": float(counts[feature] / mine.sum()),
                    "other_classes_fraction": float(active[~mine, feature].mean()) if (~mine).any() else float("nan"),
                }
            )
    return pd.DataFrame(rows, columns=["class", "rank", "feature", "occurrences", "n_samples", "fraction", "other_classes_fraction"])
