"""LinearProbeTransfer's settings (conf/experiment/probe.yaml selects them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Optional

from xmodal.config import ExperimentConfig
from xmodal.errors import ConfigError


class ProbeAttribute(StrEnum):
    modality = "modality"  # text rows against image rows
    brightness = "brightness"  # images made 50% darker against 50% brighter
    redness = "redness"  # red channel x0.5 against x1.5


class ProbeFeatures(StrEnum):
    decoder = "decoder"  # resid_post at the layer, through the SAE (sae=none: the residuals themselves)
    vision_tower = "vision_tower"  # the VLM's own vision tower, patch states mean-pooled (seed 001's MODE, seed 003's ViT baseline)


class ProbeLabel(StrEnum):
    concept = "concept"  # each concept is a class
    category = "category"  # each concept's category is (seed 001's COCO supercategories: animal, vehicle, food, indoor)


class ProbeSolver(StrEnum):
    torch = "torch"  # every fold and label permutation of a probe as one batched fit, on the model's device
    sklearn = "sklearn"  # scikit-learn's Pipeline refit one problem at a time: the reference


class ProbeNull(StrEnum):
    """How the transfer probes' null permutes the training labels."""

    all = "all"  # over every training row
    within_category = "within_category"  # only among rows of the same category: transfer finer than categories


class TrainSplit(StrEnum):
    """Seed 003's low-data splits: training to test examples per class."""

    r1_9 = "1:9"
    r2_8 = "2:8"
    r3_7 = "3:7"
    r4_6 = "4:6"
    r5_5 = "5:5"

    @property
    def train_fraction(self) -> float:
        train, test = (int(part) for part in self.value.split(":"))
        return train / (train + test)


@dataclass
class ProbeConfig(ExperimentConfig):
    _target_: str = "xmodal.experiments.probe.experiment.LinearProbeTransfer"
    name: str = "probe"
    text_templates: list[str] = field(
        default_factory=lambda: [
            "{concept}",
            "a photo of {concept}",
            "an image of {concept}",
            "this is {concept}",
            "a picture showing {concept}",
            "{concept}, seen in a picture",
        ]
    )
    n_permutations: int = 100
    budget: Optional[int] = None  # keep the k most class-separating features (3, 5, 10, 50); null: all
    binarise: bool = False
    max_active_fraction: Optional[float] = None  # drop features active in more of the samples than this
    train_per_class: Optional[int] = None  # low-data splits: this many training examples per class
    # or as seed 003 gives them, train:test per class: one of TrainSplit's values, "1:9" ... "5:5" (a str
    # field because OmegaConf checks an enum by member name, and "1:9" cannot be one; validate() checks it)
    train_split: Optional[str] = None
    features: ProbeFeatures = ProbeFeatures.decoder
    label: ProbeLabel = ProbeLabel.concept
    top_n_curve: list[int] = field(default_factory=list)  # seed 003's top-N: image probes at each N (e.g. [1, 5, 10, 50]) and with all
    shared_features_per_class: int = 2  # per class, the features active in most of its images (0: no table)
    attributes: list[ProbeAttribute] = field(default_factory=lambda: [ProbeAttribute.modality, ProbeAttribute.brightness, ProbeAttribute.redness])
    solver: ProbeSolver = ProbeSolver.torch
    null: ProbeNull = ProbeNull.all
    n_jobs: int = -1  # solver=sklearn: processes for the permutation refits (-1: every core); the numbers do not depend on it

    def validate(self) -> None:
        super().validate()
        bad = [t for t in self.text_templates if "{concept}" not in t]
        if bad or not self.text_templates:
            raise ConfigError(f"experiment.text_templates must each contain '{{concept}}'; these do not: {bad}")
        self.require_at_least_one("n_permutations")
        splits = [t.value for t in TrainSplit]
        if self.train_split is not None and str(self.train_split) not in splits:
            raise ConfigError(f"experiment.train_split={self.train_split!r}; use {', '.join(splits)} (training:test examples per class)")
        if self.train_split is not None and self.train_per_class is not None:
            raise ConfigError(
                f"experiment.train_split={self.train_split} and experiment.train_per_class={self.train_per_class} both set the training size; keep one"
            )
        if self.null == ProbeNull.within_category and self.label == ProbeLabel.category:
            raise ConfigError(
                "experiment.null=within_category shuffles concept labels inside each category, which with "
                "experiment.label=category changes nothing; use experiment.null=all, or experiment.label=concept"
            )
        if any(n < 1 for n in self.top_n_curve):
            raise ConfigError(f"experiment.top_n_curve={list(self.top_n_curve)} must hold counts of 1 or more")
        if self.shared_features_per_class < 0:
            raise ConfigError(f"experiment.shared_features_per_class={self.shared_features_per_class} must be 0 (no table) or more")
        if self.features == ProbeFeatures.vision_tower and self.top_n_curve:
            raise ConfigError(
                "experiment.top_n_curve ranks SAE features per image token; with experiment.features=vision_tower there are none: set experiment.top_n_curve=[]"
            )
