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
    top_examples: int = 8  # figures 2-4: each group's two busiest features with their top images and texts (0: none)
    interpretability: bool = True  # I(z) and WinRate per group (needs the embedders below)
    top_m: int = 5  # top activating samples per feature for I(z) and WinRate
    text_embedder: str = MINILM  # or a sentence-transformers directory / hub id
    # The paper's image embedder, independent of the model under study. Where it cannot be loaded
    # (offline, not in the cache), the fallback is used and result.json says so (image_embedder_is_fallback);
    # null: stop instead. conf/experiment/mds.yaml takes the model config's choice: vision_tower on the
    # organism and tiny, null (stop with one line) on every real model.
    image_embedder: ImageEmbedderKind = ImageEmbedderKind.hf
    image_embedder_path: Optional[str] = "google/vit-base-patch16-224-in21k"
    image_embedder_fallback: Optional[ImageEmbedderKind] = None
    zero_mask: bool = True  # zero-mask interventions with a category readout
    n_random_masks: int = 20  # random feature sets of equal size per group (the null)
    msae: bool = False  # train the paper's multimodal TopK SAE on this layer's tokens and classify its features
    msae_d_sae: int = 1024  # the paper's MSAE width
    msae_k: int = 16
    msae_epochs: float = 30.0

    def validate(self) -> None:
        super().validate()
        self.require_at_least_one("n_null", "top_m")
        if self.top_examples < 0:
            raise ConfigError(f"experiment.top_examples={self.top_examples} must be 0 (none) or more")
        if self.interpretability and self.image_embedder == ImageEmbedderKind.hf and not self.image_embedder_path:
            raise ConfigError("experiment.image_embedder=hf needs experiment.image_embedder_path (a hub id or directory)")
