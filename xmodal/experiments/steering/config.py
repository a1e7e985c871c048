"""SteeringEval's settings (conf/experiment/steering.yaml selects them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Optional

from xmodal.config import ExperimentConfig
from xmodal.errors import ConfigError


class FeatureSource(StrEnum):
    text = "text"  # the method: the feature most specific to the concept's text
    image = "image"  # a positive control: the feature most specific to the concept's images


class SteeringMode(StrEnum):
    add = "add"  # + strength x scale x decoder row
    clamp = "clamp"  # the feature set to strength x scale


class SteeringSite(StrEnum):
    image = "image"  # the cross-modal test: a text feature written into the image tokens
    text = "text"
    both = "both"


@dataclass
class SteeringConfig(ExperimentConfig):
    _target_: str = "xmodal.experiments.steering.experiment.SteeringEval"
    name: str = "steering"
    concept: str = "snow"  # a concept of the dataset (name or text)
    feature: Optional[int] = None  # None: the feature most specific to the concept (see feature_source)
    feature_source: FeatureSource = FeatureSource.text
    mode: SteeringMode = SteeringMode.add
    where: SteeringSite = SteeringSite.image
    strengths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 1.0, 2.0])  # x the feature's largest activation
    images: list[str] = field(default_factory=list)  # describe images of these concepts (e.g. [sea, grass]); empty: of other concepts at random
    n_images: int = 12  # at most this many images to describe (seeded choice when there are more)
    control_layer: Optional[int] = None  # None: layer - 4 (or layer + 4 near the bottom)
    concept_words: dict[str, list[str]] = field(default_factory=dict)  # concept -> words that count as naming it
    prompt: str = ""  # text after the image in the user turn
    max_new_tokens: int = 12
    do_sample: bool = False  # greedy by default; sampling is seeded from `seed`
    temperature: float = 1.0
    n_bootstrap: int = 1000

    def validate(self) -> None:
        super().validate()
        self.require_at_least_one("n_images", "n_bootstrap")
        if self.concept in self.images:
            raise ConfigError(
                f"experiment.images={list(self.images)} includes the steered concept {self.concept!r}; "
                "describe images of other concepts (the test is whether steering adds the concept)"
            )

    def strengths_with_zero(self) -> list[float]:
        """The strengths in increasing order, with 0 (the unsteered reference, always measured)."""
        values = [float(s) for s in self.strengths]
        return sorted(values if 0.0 in values else [0.0, *values])
