"""RepresentationAlignment's settings (conf/experiment/alignment.yaml selects them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Optional

from xmodal.config import ExperimentConfig
from xmodal.errors import ConfigError
from xmodal.metrics.statistics import NullPairing


class Comparison(StrEnum):
    modalities = "modalities"  # one model: each concept as text against its images
    models = "models"  # the same inputs through this model and experiment.other_model


class Representation(StrEnum):
    residual = "residual"  # resid_post pooled over the concept's tokens / the image's soft tokens
    sae = "sae"  # the same, through this job's SAE (sae=...)


class Modality(StrEnum):
    text = "text"
    image = "image"


@dataclass
class AlignmentConfig(ExperimentConfig):
    _target_: str = "xmodal.experiments.alignment.experiment.RepresentationAlignment"
    name: str = "alignment"
    compare: Comparison = Comparison.modalities
    other_model: Optional[str] = "${model.base_model}"  # compare=models: a config in conf/model/
    other_model_overrides: list[str] = field(default_factory=list)  # '...=["model.revision=abc123"]'
    modality: Modality = Modality.text  # compare=models: which inputs both models read
    representation: Representation = Representation.residual
    k_neighbours: int = 5  # mutual k-NN and CKNNA; must be below the number of concepts
    n_permutations: int = 1000  # concept re-pairings for every null
    null: NullPairing = NullPairing.all

    def validate(self) -> None:
        super().validate()
        self.require_at_least_one("k_neighbours", "n_permutations")
        if self.k_neighbours < 2:
            raise ConfigError(
                f"experiment.k_neighbours={self.k_neighbours}: CKNNA needs at least 2 neighbours (as its reference implementation); use 2 or more"
            )
        if self.compare == Comparison.models:
            if not self.other_model:
                raise ConfigError(
                    "experiment.compare=models needs experiment.other_model (a config in conf/model/), "
                    "and this model config names no base_model to default to; e.g. experiment.other_model=organism_frozen"
                )
        self.require_model_overrides("other_model_overrides")
