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


@dataclass
class ProbeConfig(ExperimentConfig):
    _target_: str = "xmodal.experiments.probe.experiment.LinearProbeTransfer"
    name: str = "probe"
    text_templates: list[str] = field(
        default_factory=lambda: [
            "{concept}", "a photo of {concept}", "an image of {concept}", "this is {concept}",
            "a picture showing {concept}", "{concept}, seen in a picture",
        ]
    )  # fmt: skip
    n_permutations: int = 100
    budget: Optional[int] = None  # keep the k most class-separating features (3, 5, 10, 50); null: all
    binarise: bool = False
    max_active_fraction: Optional[float] = None  # drop features active in more of the samples than this
    train_per_class: Optional[int] = None  # low-data splits: this many training examples per class
    attributes: list[ProbeAttribute] = field(
        default_factory=lambda: [ProbeAttribute.modality, ProbeAttribute.brightness, ProbeAttribute.redness]
    )
    n_jobs: int = -1  # processes for the permutation refits (-1: every core); the numbers do not depend on it

    def validate(self) -> None:
        super().validate()
        bad = [t for t in self.text_templates if "{concept}" not in t]
        if bad or not self.text_templates:
            raise ConfigError(f"experiment.text_templates must each contain '{{concept}}'; these do not: {bad}")
        self.require_at_least_one("n_permutations")
