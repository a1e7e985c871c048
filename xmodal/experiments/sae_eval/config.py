"""SAEEval's settings (conf/experiment/sae_eval.yaml selects them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from xmodal.config import ExperimentConfig
from xmodal.errors import ConfigError


class AnswerSource(StrEnum):
    caption = "caption"  # each image's caption (the dataset must have them: organism_concepts does)
    concept = "concept"  # the text of each image's concept (any dataset with images)


class SpliceSite(StrEnum):
    image = "image"  # the reconstruction replaces resid_post at the image soft tokens only
    text = "text"  # at every other real token but BOS
    both = "both"


@dataclass
class SAEEvalConfig(ExperimentConfig):
    _target_: str = "xmodal.experiments.sae_eval.experiment.SAEEval"
    name: str = "sae_eval"
    n_images: int = 16  # images (seeded choice) whose answers are scored with the SAE spliced in
    answer: AnswerSource = AnswerSource.caption  # the text after the image whose next-token loss is measured
    n_random_saes: int = 9  # random SAEs (the null) of the same architecture and width, matched in L0
    dense_fraction: float = 0.1  # a feature active on more than this share of a modality's tokens is dense
    splice_sites: list[SpliceSite] = field(default_factory=lambda: list(SpliceSite))  # each costs 2 + n_random_saes passes

    def validate(self) -> None:
        super().validate()
        self.require_at_least_one("n_images", "n_random_saes")
        if not self.splice_sites:
            raise ConfigError("experiment.splice_sites=[] splices nowhere; use any of [image, text, both]")
        if not 0 < self.dense_fraction < 1:
            raise ConfigError(f"experiment.dense_fraction={self.dense_fraction} must lie strictly between 0 and 1")
