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
    ablate = "ablate"  # the feature clamped to 0 (the plan's safety-transfer test); strengths do not apply


class SteeringInputs(StrEnum):
    images = "images"  # describe images (the plan's direction: a text feature changes what the model sees)
    texts = "texts"  # text-only prompts (the reverse direction: an image feature changes what the model writes)


class SteeringSite(StrEnum):
    image = "image"  # the cross-modal test: a text feature written into the image tokens
    text = "text"
    both = "both"


DEFAULT_STRENGTHS = [0.0, 0.25, 0.5, 1.0, 2.0]


@dataclass
class SteeringConfig(ExperimentConfig):
    _target_: str = "xmodal.experiments.steering.experiment.SteeringEval"
    name: str = "steering"
    concept: str = "snow"  # a concept of the dataset (name or text)
    feature: Optional[int] = None  # None: the feature most specific to the concept (see feature_source)
    feature_source: FeatureSource = FeatureSource.text
    mode: SteeringMode = SteeringMode.add
    where: SteeringSite = SteeringSite.image
    strengths: list[float] = field(default_factory=lambda: list(DEFAULT_STRENGTHS))  # x the feature's largest activation
    images: list[str] = field(
        default_factory=list
    )  # describe images of these concepts (e.g. [sea, grass]); empty: of other concepts at random (ablate: of the concept itself)
    inputs: SteeringInputs = SteeringInputs.images
    text_prompts: list[str] = field(default_factory=list)  # inputs=texts: the text-only prompts steered (each one input; no image)
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
        if self.inputs == SteeringInputs.texts:
            if not self.text_prompts:
                raise ConfigError("experiment.inputs=texts needs experiment.text_prompts=[...], the text-only prompts to steer")
            if self.where == SteeringSite.image:
                raise ConfigError("experiment.inputs=texts has no image tokens to steer at experiment.where=image; use experiment.where=text or both")
        if self.mode == SteeringMode.ablate and [float(s) for s in self.strengths] != DEFAULT_STRENGTHS:
            raise ConfigError(
                f"experiment.mode=ablate clamps the feature to 0, so experiment.strengths={list(self.strengths)} cannot apply; leave it unset, or use mode=clamp"
            )
        if self.concept in self.images and self.mode != SteeringMode.ablate:
            raise ConfigError(
                f"experiment.images={list(self.images)} includes the steered concept {self.concept!r}; "
                "describe images of other concepts (the test is whether steering adds the concept), or use mode=ablate"
            )

    def strengths_with_zero(self) -> list[float]:
        """The strengths in increasing order, with 0 (the unsteered reference, always measured).

        Under mode=ablate there is one steered level, written as strength 1 in the tables: the feature clamped to 0.
        """
        if self.mode == SteeringMode.ablate:
            return [0.0, 1.0]
        values = [float(s) for s in self.strengths]
        return sorted(values if 0.0 in values else [0.0, *values])
