"""Linear probes on codes (scikit-learn): within a modality, and trained on one modality, tested on the other.

Every score comes with its null: chance (the majority-class rate of the test labels)
and a label-shuffled control (the same probe refit on permuted training labels,
`n_permutations` times), with a permutation p-value.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from sklearn.feature_selection import SelectKBest, f_classif
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score
from sklearn.model_selection import GroupKFold, StratifiedKFold, StratifiedShuffleSplit, cross_val_predict, permutation_test_score
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from xmodal.errors import DatasetError


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


def within_modality(
    x: np.ndarray, y: np.ndarray, seed: int, n_permutations: int, budget: int | None = None,
    train_per_class: int | None = None, groups: np.ndarray | None = None, what: str = "probe", n_jobs: int | None = None,
    train_fraction: float | None = None,
) -> ProbeScore:
    """Cross-validated probe inside one modality; null from scikit-learn's permutation_test_score.

    Low-data splits: `train_per_class` examples per class, or `train_fraction` of each class
    (seed 003's 1:9 ... 5:5), five stratified shuffle splits either way.
    `n_jobs` spreads the permutation refits over processes (-1: every core); results do not depend on it.
    """
    check_labels(y, what)
    classes, counts = np.unique(y, return_counts=True)
    if train_per_class is not None:
        short = [str(c) for c, n in zip(classes, counts) if n <= train_per_class]
        if short:
            raise DatasetError(
                f"{what}: train_per_class={train_per_class} leaves no test example for classes {short[:5]} "
                f"(they have {counts.min()} examples); lower train_per_class"
            )
        cv = StratifiedShuffleSplit(n_splits=5, train_size=train_per_class * len(classes), random_state=seed)
    elif train_fraction is not None:
        n_train = int(np.floor(train_fraction * len(y)))  # as scikit-learn's shuffle split counts it
        if round(counts.min() * train_fraction) < 1 or n_train < len(classes):
            raise DatasetError(
                f"{what}: a {train_fraction:.0%} training split of {len(y)} examples in {len(classes)} classes leaves class "
                f"{str(classes[counts.argmin()])!r} ({counts.min()} examples) or others without a training example; "
                "use more examples per class or a larger split"
            )
        cv = StratifiedShuffleSplit(n_splits=5, train_size=train_fraction, test_size=1 - train_fraction, random_state=seed)
    elif groups is not None:
        cv = GroupKFold(n_splits=min(5, len(np.unique(groups))))
    else:
        if counts.min() < 2:
            raise DatasetError(f"{what}: class {str(classes[counts.argmin()])!r} has a single example; cross-validation needs 2 per class")
        cv = StratifiedKFold(n_splits=int(min(5, counts.min())), shuffle=True, random_state=seed)
    probe = make_probe(seed, _budget(budget, x.shape[1]))
    score, null, p_value = permutation_test_score(
        probe, x, y, groups=groups, cv=cv, n_permutations=n_permutations, random_state=seed, scoring="accuracy", n_jobs=n_jobs
    )
    shuffled_splits = train_per_class is not None or train_fraction is not None
    if not shuffled_splits:
        predicted = cross_val_predict(probe, x, y, groups=groups, cv=cv)
        macro_f1 = f1_score(y, predicted, average="macro")
    else:  # shuffle splits do not cover every sample once; score F1 split by split
        scores = []
        for train, test in cv.split(x, y):
            scores.append(f1_score(y[test], probe.fit(x[train], y[train]).predict(x[test]), average="macro"))
        macro_f1 = float(np.mean(scores))
    chance = float(counts.max() / counts.sum())
    if train_per_class is not None:
        n_train = train_per_class * len(classes)
    elif train_fraction is None:
        n_train = int(len(y) * (1 - 1 / cv.get_n_splits()))  # (a fractional split set n_train above)
    weights, names = fitted_weights(probe.fit(x, y))  # the probe to keep: fitted on every sample once scored
    return ProbeScore(float(score), float(macro_f1), chance, float(null.mean()), float(np.quantile(null, 0.975)), float(p_value),
                      n_train, len(y) - n_train, weights, names)  # fmt: skip


def transfer(
    x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
    seed: int, n_permutations: int, budget: int | None = None, what: str = "transfer probe",
) -> ProbeScore:
    """Fit on one modality, score on the other; null: refit on shuffled training labels."""
    check_labels(y_train, what)
    missing = sorted(set(np.unique(y_test)) - set(np.unique(y_train)))
    if missing:
        raise DatasetError(f"{what}: test classes {missing[:5]} have no training example; every class needs both modalities")
    probe = make_probe(seed, _budget(budget, x_train.shape[1]))
    predicted = probe.fit(x_train, y_train).predict(x_test)
    accuracy = accuracy_score(y_test, predicted)
    weights, names = fitted_weights(probe)  # before the null refits the same pipeline
    rng = np.random.default_rng(seed)
    null = np.array([accuracy_score(y_test, probe.fit(x_train, rng.permutation(y_train)).predict(x_test)) for _ in range(n_permutations)])
    _, counts = np.unique(y_test, return_counts=True)
    return ProbeScore(
        float(accuracy), float(f1_score(y_test, predicted, average="macro")), float(counts.max() / counts.sum()),
        float(null.mean()), float(np.quantile(null, 0.975)), float((1 + np.sum(null >= accuracy)) / (1 + len(null))),
        len(y_train), len(y_test), weights, names,
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
            rows.append({"class": str(label), "rank": rank, "feature": int(feature), "occurrences": int(counts[feature]),
                         "n_samples": int(mine.sum()), "fraction": float(counts[feature] / mine.sum()),
                         "other_classes_fraction": float(active[~mine, feature].mean()) if (~mine).any() else float("nan")})  # fmt: skip
    return pd.DataFrame(rows, columns=["class", "rank", "feature", "occurrences", "n_samples", "fraction", "other_classes_fraction"])
