"""FeatureCards's settings (conf/experiment/features.yaml selects them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Optional

from xmodal.config import ExperimentConfig
from xmodal.errors import ConfigError


class FeatureSelection(StrEnum):
    crossmodal = "crossmodal"  # highest Pearson r across concepts between text and image activation (overlap's cross-modal features)
    image = "image"  # most active on images (pooled, mean over images)
    text = "text"  # most active on the concept words


@dataclass
class FeaturesConfig(ExperimentConfig):
    _target_: str = "xmodal.experiments.features.experiment.FeatureCards"
    name: str = "features"
    features: list[int] = field(default_factory=list)  # these SAE features; empty: choose n_features by `select`
    select: FeatureSelection = FeatureSelection.crossmodal
    n_features: int = 6
    top_images: int = 6  # per card: the most activating images, each with its heat map
    top_texts: int = 8  # per card: the most activating concept words
    n_permutations: int = 1000  # cross-modal r: concept re-pairings; MDS: modality swaps
    neuronpedia_model_id: Optional[str] = None  # export: Neuronpedia's model id (default: the model's name)
    neuronpedia_sae_set: Optional[str] = None  # export: e.g. "gemmascope-2-res-16k" (default: the SAE's name)

    def validate(self) -> None:
        super().validate()
        self.require_at_least_one("n_features", "top_images", "top_texts", "n_permutations")
        negative = [f for f in self.features if f < 0]
        if negative:
            raise ConfigError(f"experiment.features={list(self.features)} holds negative ids {negative}; SAE features count from 0")
