"""The organism's config schemas, plugged into xmodal's ConfigStore like any user model's.

``pyproject.toml`` names ``register_configs`` as an entry point of the ``xmodal.plugins``
group; ``xmodal.config.register_configs`` calls it. The YAML files that select these
schemas stay in ``conf/`` (model/organism*.yaml, sae/organism.yaml,
dataset/organism_concepts.yaml).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from hydra.core.config_store import ConfigStore

from xmodal.config import DatasetConfig, ModelConfig, SAEConfig
from xmodal.organism.model import Variant
from xmodal.organism.saes import SAETraining


@dataclass
class OrganismModelConfig(ModelConfig):
    """The model organism: real gemma-3-270m decoder, small trained vision tower (xmodal.organism)."""

    image_embedder_fallback: Optional[str] = "vision_tower"  # the organism runs offline; its results say so
    model_cache: str = "${paths.model_cache}"
    vision_weights: Optional[str] = None  # None: the weights shipped in xmodal/organism/weights
    lora_weights: Optional[str] = None  # a stage-2 lora.safetensors, merged into the decoder on load; None: the variant's
    variant: Variant = Variant.instruct  # instruct (stage 2) | frozen (stage 1: decoder untouched) | planted (control)


@dataclass
class OrganismBaseModelConfig(ModelConfig):
    """The organism's decoder alone: the plain gemma-3-270m from the same cached conversion."""

    model_cache: str = "${paths.model_cache}"


@dataclass
class OrganismSAEConfig(SAEConfig):
    """The SAEs shipped with the organism, at layers 5, 9, 12 and 15, for the model's variant."""

    variant: Variant = "${oc.select:model.variant,instruct}"  # type: ignore[assignment]  # follows model=organism*
    width: Optional[int] = None  # None: the narrowest shipped; -m sae.width=512,1024 sweeps the default's widths
    training: SAETraining = SAETraining.joint  # joint (image + caption tokens) | text_only (captions only; shipped for instruct, width 512)


@dataclass
class OrganismConceptsConfig(DatasetConfig):
    images_per_concept: int = 4
    seed: int = 0
    categories: list[str] = field(default_factory=lambda: ["colour", "shape", "count", "background", "word"])


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(group="model", name="base_organism", node=OrganismModelConfig)
    cs.store(group="model", name="base_organism_base", node=OrganismBaseModelConfig)
    cs.store(group="sae", name="base_organism", node=OrganismSAEConfig)
    cs.store(group="dataset", name="base_organism_concepts", node=OrganismConceptsConfig)
