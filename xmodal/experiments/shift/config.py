"""RepresentationShift's settings (conf/experiment/shift.yaml selects them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Optional

from xmodal.config import ExperimentConfig
from xmodal.errors import ConfigError


class PromptSet(StrEnum):
    concepts = "concepts"  # the dataset's concept words, in each of text_templates
    sentences = "sentences"  # whole sentences (seed 001): the shipped set, or sentences_file


@dataclass
class ShiftConfig(ExperimentConfig):
    _target_: str = "xmodal.experiments.shift.experiment.RepresentationShift"
    name: str = "shift"
    base_model: Optional[str] = "${model.base_model}"  # a config name in conf/model/: the LLM the VLM's decoder came from
    base_model_overrides: list[str] = field(default_factory=list)  # on the command line: '...=["model.revision=abc123"]'
    prompts: PromptSet = PromptSet.concepts
    sentences_file: Optional[str] = None  # prompts=sentences: 'category<TAB>sentence' lines; None: xmodal/data/shift_sentences.txt
    text_templates: list[str] = field(default_factory=lambda: ["{concept}"])
    top_features: int = 20
    n_permutations: int = 1000

    def validate(self) -> None:
        super().validate()
        if not self.base_model:
            raise ConfigError(
                "experiment=shift needs a base LLM, and this model config names none (model.base_model); "
                "set experiment.base_model to a config in conf/model/, e.g. experiment.base_model=gemma2_2b"
            )
        self.require_model_overrides("base_model_overrides")
        self.require_at_least_one("n_permutations")
