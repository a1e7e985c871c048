"""Structured config schema: every key a run can take, with its type.

Hydra merges the YAML files in ``conf/`` onto these dataclasses, so a typo, an
unknown key or a value of the wrong type fails at composition, before any model
loads. Group files select their schema with a defaults entry (``base_pretrained``
and the like), following Hydra's "config groups with schema" pattern.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from xmodal.errors import ConfigError
from xmodal.layers import parse_layer


class TextPooling(str, Enum):
    mean = "mean"
    sum = "sum"
    max = "max"
    last = "last"


class ImagePooling(str, Enum):
    mean = "mean"
    sum = "sum"
    max = "max"
    topn = "topn"  # per feature: mean of its N largest values over image tokens
    eoi = "eoi"  # the first token after the image (Gemma 3: <end_of_image>)


# ---------------------------------------------------------------- model ----
@dataclass
class ModelConfig:
    _target_: str = MISSING
    name: str = MISSING  # short name used in tables, cache keys and W&B
    dtype: str = "float32"
    device: str = "auto"  # "auto": cuda when available, else cpu
    # Named layers for `layer=preset:i` (e.g. where Gemma Scope 2 has SAEs for this model).
    layer_presets: list[int] = field(default_factory=list)
    # The sae-lens release that matches this model, read by sae=gemma_scope_2.
    sae_release: Optional[str] = None
    # The conf/model/ name of the LLM this VLM's decoder came from (experiment=shift's default).
    base_model: Optional[str] = None


@dataclass
class PretrainedModelConfig(ModelConfig):
    name_or_path: str = MISSING  # hub id or local directory
    revision: str = "main"
    trust_remote_code: bool = False  # never on by default: it runs code from the hub


@dataclass
class TinyModelConfig(ModelConfig):
    """A random-weight Gemma 3 multimodal model with the real Gemma 3 tokenizer."""

    num_hidden_layers: int = 6
    hidden_size: int = 64
    intermediate_size: int = 128
    num_attention_heads: int = 2
    num_key_value_heads: int = 1
    head_dim: int = 32
    vision_hidden_size: int = 32
    vision_layers: int = 2
    vision_intermediate_size: Optional[int] = None  # None: 2 x vision_hidden_size
    vision_attention_heads: int = 2
    sliding_window: int = 64
    image_size: int = 64
    patch_size: int = 8
    mm_tokens_per_image: int = 16
    init_seed: int = 0
    tokenizer_cache: str = "${paths.model_cache}"


@dataclass
class OrganismModelConfig(ModelConfig):
    """The model organism: real gemma-3-270m decoder, small trained vision tower (xmodal.organism)."""

    model_cache: str = "${paths.model_cache}"
    vision_weights: Optional[str] = None  # None: the weights shipped in xmodal/organism/weights


@dataclass
class OrganismBaseModelConfig(ModelConfig):
    """The organism's decoder alone: the plain gemma-3-270m from the same cached conversion."""

    model_cache: str = "${paths.model_cache}"


# ------------------------------------------------------------------ sae ----
@dataclass
class SAEConfig:
    _target_: str = MISSING
    name: str = MISSING
    device: str = "auto"
    dtype: str = "float32"


@dataclass
class NoSAEConfig(SAEConfig):
    """Work on raw residuals: the 'features' are the residual dimensions."""


@dataclass
class PretrainedSAEConfig(SAEConfig):
    release: Optional[str] = MISSING  # a sae-lens release, e.g. gemma-scope-2-4b-it-res
    id_template: str = MISSING  # e.g. layer_{layer}_width_{width}_l0_{l0}
    width: str = "16k"
    l0: str = "medium"


@dataclass
class LocalSAEConfig(SAEConfig):
    path: str = MISSING  # a sae-lens directory; may contain {layer}


@dataclass
class OrganismSAEConfig(SAEConfig):
    """The SAEs shipped with the organism, at layers 5, 9, 12 and 15."""


# -------------------------------------------------------------- dataset ----
@dataclass
class DatasetConfig:
    _target_: str = MISSING
    name: str = MISSING


@dataclass
class SyntheticDatasetConfig(DatasetConfig):
    images_per_concept: int = 3
    image_size: int = 64
    seed: int = 0


@dataclass
class ImageFolderDatasetConfig(DatasetConfig):
    root: str = MISSING  # <root>/<concept>/*.jpg|png, optional <root>/concepts.csv
    max_images_per_concept: Optional[int] = None


@dataclass
class BuiltinDatasetConfig(DatasetConfig):
    image_root: Optional[str] = None  # photos as <image_root>/<concept>/*.jpg
    categories: list[str] = field(
        default_factory=lambda: ["landmarks", "animals", "objects", "scenes", "abstract"]
    )
    max_images_per_concept: Optional[int] = None


@dataclass
class HubDatasetConfig(DatasetConfig):
    """A Hugging Face hub dataset through `datasets` (needs network or its cache)."""

    path: str = MISSING  # e.g. uoft-cs/cifar100
    split: str = "test"
    image_column: str = "image"
    label_column: Optional[str] = None  # classes as concepts (CIFAR-100)
    category_column: Optional[str] = None
    text_column: Optional[str] = None  # or one concept per captioned image (COCO)
    max_images_per_concept: int = 10
    max_concepts: Optional[int] = None
    revision: Optional[str] = None


@dataclass
class OrganismConceptsConfig(DatasetConfig):
    images_per_concept: int = 4
    seed: int = 0
    categories: list[str] = field(default_factory=lambda: ["colour", "shape", "count", "background", "word"])


# ----------------------------------------------------------- experiment ----
@dataclass
class ExperimentConfig:
    _target_: str = MISSING
    name: str = MISSING


@dataclass
class OverlapConfig(ExperimentConfig):
    top_k: int = 50
    corr_threshold: float = 0.6  # the plan's bar for a cross-modal feature
    n_permutations: int = 1000
    heatmap_features: int = 20


@dataclass
class MDSConfig(ExperimentConfig):
    n_null: int = 200  # random modality swaps for the null split
    top_concepts: int = 3
    interpretability: bool = True  # I(z) and WinRate per group (needs the embedders below)
    top_m: int = 5  # top activating samples per feature for I(z) and WinRate
    text_embedder: str = "all-MiniLM-L6-v2"  # or a sentence-transformers directory / hub id
    image_embedder: str = "vision_tower"  # vision_tower (the VLM's own) | hf (image_embedder_path)
    image_embedder_path: Optional[str] = None
    zero_mask: bool = True  # zero-mask interventions with a category readout
    n_random_masks: int = 20  # random feature sets of equal size per group (the null)
    msae: bool = False  # train the paper's multimodal TopK SAE on this layer's tokens and classify its features
    msae_d_sae: int = 256
    msae_k: int = 16
    msae_epochs: float = 30.0


@dataclass
class ProbeConfig(ExperimentConfig):
    text_templates: list[str] = field(
        default_factory=lambda: [
            "{concept}", "a photo of {concept}", "an image of {concept}", "this is {concept}",
            "a picture showing {concept}", "{concept}, seen in a picture",
        ]
    )
    n_permutations: int = 100
    budget: Optional[int] = None  # keep the k most class-separating features (3, 5, 10, 50); null: all
    binarise: bool = False
    max_active_fraction: Optional[float] = None  # drop features active in more of the samples than this
    train_per_class: Optional[int] = None  # low-data splits: this many training examples per class
    attributes: list[str] = field(default_factory=lambda: ["modality", "brightness", "redness"])
    n_jobs: int = -1  # processes for the permutation refits (-1: every core); the numbers do not depend on it


@dataclass
class ShiftConfig(ExperimentConfig):
    base_model: Optional[str] = "${model.base_model}"  # a config name in conf/model/: the LLM the VLM's decoder came from
    base_model_overrides: list[str] = field(default_factory=list)  # on the command line: '...=["model.revision=abc123"]'
    text_templates: list[str] = field(default_factory=lambda: ["{concept}"])
    top_features: int = 20
    n_permutations: int = 1000


@dataclass
class SteeringConfig(ExperimentConfig):
    concept: str = "snow"  # a concept of the dataset (name or text)
    feature: Optional[int] = None  # None: the feature most specific to the concept (see feature_source)
    feature_source: str = "text"  # text (the method) | image (a positive control: a feature the concept's images use)
    mode: str = "add"  # add: + strength x scale x decoder row; clamp: feature set to strength x scale
    where: str = "image"  # image (the cross-modal test: a text feature written into the image tokens) | text | both
    strengths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 1.0, 2.0])  # x the feature's largest activation
    n_images: int = 12  # images of other concepts to describe
    control_layer: Optional[int] = None  # None: layer - 4 (or layer + 4 near the bottom)
    concept_words: dict[str, list[str]] = field(default_factory=dict)  # concept -> words that count as naming it
    prompt: str = ""  # text after the image in the user turn
    max_new_tokens: int = 12
    do_sample: bool = False  # greedy by default; sampling is seeded from `seed`
    temperature: float = 1.0
    n_bootstrap: int = 1000


@dataclass
class DASConfig(ExperimentConfig):
    """DASynthesis (seed 004). Where the seed's text lost a number, the default is xmodal's choice (see its README)."""

    concepts: list[str] = field(default_factory=lambda: ["red", "blue"])  # dataset concept names/texts, or bare words
    concepts_per_pass: int = 8  # concepts optimised together in one forward pass
    steps: int = 600
    batch_size: int = 8  # augmented copies per concept per step
    momentum: float = 0.9
    max_grad_norm: float = 1.0
    lr: Optional[float] = None  # None: layer_lr's preset
    temperature: Optional[float] = None  # None: layer_temperature's preset
    # Appendix E (Gemma 3 4B, 34 layers); other models use the entry at the nearest relative depth.
    layer_lr: dict[int, float] = field(default_factory=dict)
    layer_temperature: dict[int, float] = field(default_factory=dict)
    preset_num_layers: int = 34
    sigma_start: float = 0.2  # centre prior width (image sides), growing linearly ...
    sigma_end: float = 1.0  # ... to this at the last step
    resolutions: Optional[list[int]] = None  # component sides; None: 1, 2, 3, 4, 6, 8, 12 ... up to the image side
    shift: Optional[int] = None  # largest random shift in pixels; None: image side / 16
    noise_std: float = 0.1
    aggregation: str = "weighted"  # weighted | mean (Appendix G)
    upsample: str = "bicubic"
    prompt: str = ""  # text after the image in the user turn
    judge: str = "organism"  # organism (programmatic) | vlm (judge_model) | none
    judge_model: Optional[str] = None  # a conf/model name, for judge=vlm
    judge_samples: int = 10
    alignment_concepts: list[str] = field(default_factory=list)  # two or more dataset concepts for the apples/oranges check
    n_permutations: int = 1000
    concept_source: str = "text"  # text (seed 004) | image: a positive control, the concept's images minus all images
    concept_baseline: str = "appendix_c"  # appendix_c (seed 004) | concept_set: minus the mean of the concepts at hand too


# --------------------------------------------------------------- logger ----
@dataclass
class LoggerConfig:
    _target_: str = MISSING


@dataclass
class WandbLoggerConfig(LoggerConfig):
    project: str = "xmodal"
    entity: Optional[str] = None
    mode: str = "offline"  # offline works without account or network; `wandb sync` later
    group: Optional[str] = None  # default: the sweep directory's name
    tags: list[str] = field(default_factory=list)


# ----------------------------------------------------------- extraction ----
@dataclass
class PositionsConfig:
    """Which residual-stream positions stand for a concept, and how they are pooled."""

    text_prompt: str = "{concept}"  # user turn for the text modality
    image_prompt: str = ""  # text after the image in the user turn
    use_chat_template: bool = True
    text_pooling: TextPooling = TextPooling.mean
    image_pooling: ImagePooling = ImagePooling.mean
    top_n: int = 5
    batch_size: int = 8


@dataclass
class PathsConfig:
    cache_dir: str = MISSING
    model_cache: str = "${paths.cache_dir}/models"
    activation_cache: str = "${paths.cache_dir}/activations"


@dataclass
class Config:
    model: ModelConfig = MISSING
    sae: SAEConfig = MISSING
    dataset: DatasetConfig = MISSING
    experiment: ExperimentConfig = MISSING
    logger: LoggerConfig = MISSING
    positions: PositionsConfig = field(default_factory=PositionsConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    layer: Any = 1  # 9 | rel:0.25 | preset:0 (see xmodal/layers.py); checked in validate()
    seed: int = 0


def safe_dirname(overrides: str) -> str:
    """A sweep job's folder name from its overrides: no path separators, at most 200 characters."""
    # Hydra escapes ':' and ',' inside values with a backslash; folder names need neither escape nor '/'.
    name = (overrides or "defaults").replace("\\", "").replace(os.sep, "_")
    if len(name) > 200:
        name = f"{name[:180]}-{hashlib.sha256(name.encode()).hexdigest()[:12]}"
    return name


def register_configs() -> None:
    if not OmegaConf.has_resolver("xmodal_dirname"):
        OmegaConf.register_new_resolver("xmodal_dirname", safe_dirname)
    cs = ConfigStore.instance()
    cs.store(name="xmodal_config", node=Config)
    for group, name, node in [
        ("model", "base_pretrained", PretrainedModelConfig),
        ("model", "base_tiny", TinyModelConfig),
        ("model", "base_organism", OrganismModelConfig),
        ("model", "base_organism_base", OrganismBaseModelConfig),
        ("sae", "base_organism", OrganismSAEConfig),
        ("dataset", "base_organism_concepts", OrganismConceptsConfig),
        ("dataset", "base_hub", HubDatasetConfig),
        ("sae", "base_none", NoSAEConfig),
        ("sae", "base_pretrained", PretrainedSAEConfig),
        ("sae", "base_local", LocalSAEConfig),
        ("dataset", "base_synthetic", SyntheticDatasetConfig),
        ("dataset", "base_image_folder", ImageFolderDatasetConfig),
        ("dataset", "base_builtin", BuiltinDatasetConfig),
        ("experiment", "base_overlap", OverlapConfig),
        ("experiment", "base_mds", MDSConfig),
        ("experiment", "base_probe", ProbeConfig),
        ("experiment", "base_shift", ShiftConfig),
        ("experiment", "base_steering", SteeringConfig),
        ("experiment", "base_das", DASConfig),
        ("logger", "base_none", LoggerConfig),
        ("logger", "base_wandb", WandbLoggerConfig),
    ]:
        cs.store(group=group, name=name, node=node)


def _unknown_keys(node: DictConfig, prefix: str = "") -> list[str]:
    """Keys a schema does not declare (``+key=value`` can add them past struct mode)."""
    unknown = []
    schema = OmegaConf.get_type(node)
    declared = {f.name for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else None
    for key in node.keys():
        if declared is not None and key not in declared:
            unknown.append(f"{prefix}{key}")
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_missing():
            unknown.extend(_unknown_keys(child, f"{prefix}{key}."))
    return unknown


def validate(cfg: DictConfig) -> None:
    """Semantic checks the type system cannot express. Raises ConfigError."""
    unknown = _unknown_keys(cfg)
    if unknown:
        raise ConfigError(f"unknown config keys: {', '.join(unknown)}; check the spelling against conf/ and xmodal/config.py")
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"config keys without a value: {', '.join(missing)}; set them on the command line")
    parse_layer(cfg.layer)
    if cfg.positions.top_n < 1:
        raise ConfigError(f"positions.top_n={cfg.positions.top_n} must be at least 1")
    if cfg.positions.batch_size < 1:
        raise ConfigError(f"positions.batch_size={cfg.positions.batch_size} must be at least 1")
    if "{concept}" not in cfg.positions.text_prompt:
        raise ConfigError(
            f"positions.text_prompt={cfg.positions.text_prompt!r} must contain '{{concept}}' where the concept goes"
        )
    exp: Any = cfg.experiment
    if "top_k" in exp and exp.top_k < 1:
        raise ConfigError(f"experiment.top_k={exp.top_k} must be at least 1")
    if "n_permutations" in exp and exp.n_permutations < 1:
        raise ConfigError(f"experiment.n_permutations={exp.n_permutations} must be at least 1")
