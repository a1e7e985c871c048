"""LogitLens's settings (conf/experiment/lens.yaml selects them)."""

from __future__ import annotations

from dataclasses import dataclass

from xmodal.config import ExperimentConfig
from xmodal.metrics.statistics import NullPairing


@dataclass
class LensConfig(ExperimentConfig):
    _target_: str = "xmodal.experiments.lens.experiment.LogitLens"
    name: str = "lens"
    top_k: int = 10  # full-vocabulary logit lens: is a form of the concept word among the top k tokens?
    concept_top_k: int = 1  # among the concept words only (logit lens and nearest words): chance = k / concepts
    centre: bool = True  # nearest words: remove each side's mean first (Gemma's residuals share one large direction)
    n_permutations: int = 1000  # shuffled image (or word) labels for every null
    null: NullPairing = NullPairing.all  # within_category: shuffle labels only inside a concept's category
    n_example_images: int = 8  # figure: images with what their tokens say

    def validate(self) -> None:
        super().validate()
        self.require_at_least_one("top_k", "concept_top_k", "n_permutations")
