"""SAEEval's settings (conf/experiment/sae_eval.yaml selects them)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from xmodal.config import ExperimentConfig
from xmodal.errors import ConfigError


class AnswerSource(StrEnum):
    caption = "caption"  # each image's caption (the dataset must have them: organism_concepts does)
    concept = "concept"  # the text of each image's concept (any dataset with images)


@dataclass
class SAEEvalConfig(ExperimentConfig):
    _target_: str = "xmodal.experiments.sae_eval.experiment.SAEEval"
    name: str = "sae_eval"
    n_images: int = 32  # images (seeded choice) whose answers are scored with the SAE spliced in
    answer: AnswerSource = AnswerSource.caption  # the text after the image whose next-token loss is measured
    n_random_saes: int = 9  # random SAEs (the null) of the same architecture and width, matched in L0
    dense_fraction: float = 0.1  # a feature active on more than this share of a modality's tokens is dense

    def validate(self) -> None:
        super().validate()
        self.require_at_least_one("n_images", "n_random_saes")
        if not 0 < self.dense_fraction < 1:
            raise ConfigError(f"experiment.dense_fraction={self.dense_fraction} must lie strictly between 0 and 1")
