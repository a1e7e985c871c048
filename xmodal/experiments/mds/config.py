"""MDSClassifier's settings (conf/experiment/mds.yaml selects them)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Optional

from xmodal.config import ExperimentConfig
from xmodal.errors import ConfigError
from xmodal.models.embedders import MINILM


class ImageEmbedderKind(StrEnum):
    vision_tower = "vision_tower"  # the VLM's own vision tower, mean-pooled
    hf = "hf"  # a Hugging Face image model at image_embedder_path


@dataclass
class MDSConfig(ExperimentConfig):
    _target_: str = "xmodal.experiments.mds.experiment.MDSClassifier"
    name: str = "mds"
    n_null: int = 200  # random modality swaps for the null split
    top_concepts: int = 3
    interpretability: bool = True  # I(z) and WinRate per group (needs the embedders below)
    top_m: int = 5  # top activating samples per feature for I(z) and WinRate
    text_embedder: str = MINILM  # or a sentence-transformers directory / hub id
    image_embedder: ImageEmbedderKind = ImageEmbedderKind.vision_tower
    image_embedder_path: Optional[str] = None
    zero_mask: bool = True  # zero-mask interventions with a category readout
    n_random_masks: int = 20  # random feature sets of equal size per group (the null)
    msae: bool = False  # train the paper's multimodal TopK SAE on this layer's tokens and classify its features
    msae_d_sae: int = 256
    msae_k: int = 16
    msae_epochs: float = 30.0

    def validate(self) -> None:
        super().validate()
        self.require_at_least_one("n_null", "top_m")
        if self.interpretability and self.image_embedder == ImageEmbedderKind.hf and not self.image_embedder_path:
            raise ConfigError("experiment.image_embedder=hf needs experiment.image_embedder_path (a hub id or directory)")
