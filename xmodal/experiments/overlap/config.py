"""CrossModalOverlap's settings (conf/experiment/overlap.yaml selects them)."""

from __future__ import annotations

from dataclasses import dataclass

from xmodal.config import ExperimentConfig
from xmodal.errors import ConfigError


@dataclass
class OverlapConfig(ExperimentConfig):
    _target_: str = "xmodal.experiments.overlap.experiment.CrossModalOverlap"
    name: str = "overlap"
    top_k: int = 50  # features per concept and modality for the Jaccard overlap
    corr_threshold: float = 0.6  # the plan's bar for a cross-modal feature
    n_permutations: int = 1000
    heatmap_features: int = 20

    def validate(self) -> None:
        super().validate()
        if self.top_k < 1:
            raise ConfigError(f"experiment.top_k={self.top_k} must be at least 1")
        if self.n_permutations < 1:
            raise ConfigError(f"experiment.n_permutations={self.n_permutations} must be at least 1")
