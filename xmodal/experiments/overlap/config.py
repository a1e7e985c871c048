"""CrossModalOverlap's settings (conf/experiment/overlap.yaml selects them)."""

from __future__ import annotations

from dataclasses import dataclass

from xmodal.config import ExperimentConfig
from xmodal.metrics.statistics import NullPairing


@dataclass
class OverlapConfig(ExperimentConfig):
    _target_: str = "xmodal.experiments.overlap.experiment.CrossModalOverlap"
    name: str = "overlap"
    top_k: int = 50  # features per concept and modality for the Jaccard overlap
    corr_threshold: float = 0.6  # the plan's bar for a cross-modal feature
    min_crossmodal_features: int = 10  # the plan's success bar: at least this many features above corr_threshold, each beyond the null
    n_permutations: int = 1000
    null: NullPairing = NullPairing.all  # within_category: re-pair only inside a category (alignment finer than categories)
    heatmap_features: int = 20

    def validate(self) -> None:
        super().validate()
        self.require_at_least_one("top_k", "n_permutations", "min_crossmodal_features")
