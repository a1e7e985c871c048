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
import typing
from dataclasses import dataclass, field
from enum import Enum
from importlib.metadata import entry_points
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
    topn_per_token = "topn_per_token"  # seed 003: each token keeps its N largest features, then sum over tokens
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
    # Where a study's model-independent image embedder (experiment=mds) cannot load: use this model's
    # own vision tower instead ("vision_tower"; only for offline mechanics models: the organism, tiny),
    # or stop (null). The result records which embedder was used either way.
    image_embedder_fallback: Optional[str] = None


@dataclass
class PretrainedModelConfig(ModelConfig):
    name_or_path: str = MISSING  # hub id or local directory
    revision: str = "main"
    trust_remote_code: bool = False  # never on by default: it runs code from the hub
    # Several GPUs: accelerate places whole decoder layers across them ("auto", "balanced", or a
    # {module: device} map); `max_memory` caps each, e.g. {0: 70GiB, 1: 70GiB}. null: one device.
    device_map: Optional[Any] = None
    max_memory: Optional[dict[str, str]] = None


@dataclass
class TinyClipModelConfig(ModelConfig):
    """A random-weight CLIPModel with a byte-level CLIP tokenizer, built on disk once (mechanics only)."""

    image_embedder_fallback: Optional[str] = "vision_tower"  # mechanics only, offline
    cache_dir: str = "${paths.model_cache}"
    hidden_size: int = 32
    projection_dim: int = 32
    num_layers: int = 2
    image_size: int = 32
    patch_size: int = 8
    init_seed: int = 0


@dataclass
class TinyModelConfig(ModelConfig):
    """A random-weight Gemma 3 multimodal model with the real Gemma 3 tokenizer."""

    image_embedder_fallback: Optional[str] = "vision_tower"  # mechanics only, offline
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
class TinyFamilyModelConfig(ModelConfig):
    """A random-weight model of a VLM family's real transformers class (xmodal.models.tiny_families)."""

    family: str = MISSING  # qwen2_5_vl, llava_next, ...
    num_hidden_layers: int = 4
    hidden_size: int = 64
    intermediate_size: int = 128
    num_attention_heads: int = 2
    num_key_value_heads: int = 1
    init_seed: int = 0


# ------------------------------------------------------------------ sae ----
class SAESite(str, Enum):
    """Where in a decoder layer an SAE reads (and a steered feature writes)."""

    resid_post = "resid_post"  # the layer's output (every study reads this)
    mlp_out = "mlp_out"
    attn_out = "attn_out"  # Gemma Scope 2's attention SAEs read the heads' outputs before W_O (hook_z)


class L0Size(str, Enum):
    small = "small"
    medium = "medium"  # not in the -all releases (every layer), which have small and big
    big = "big"


class GemmaTuning(str, Enum):
    model = "model"  # the release of the selected model (model.sae_release)
    pt = "pt"  # pretrained Gemma 3
    it = "it"  # instruction-tuned Gemma 3


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
    site: SAESite = SAESite.resid_post  # where the SAE must read; another site is refused in one line


@dataclass
class GemmaScope2SAEConfig(SAEConfig):
    """Gemma Scope 2 through sae-lens's directory: the choices pick an id that exists (xmodal/saes/gemma_scope_2.py)."""

    release: Optional[str] = MISSING  # the model's residual-stream release (gemma-scope-2-4b-it-res); the rest picks its siblings
    site: SAESite = SAESite.resid_post  # res, mlp or att release
    width: str = "16k"  # 16k | 65k | 262k | 1m (which exist depends on the release)
    l0: L0Size = L0Size.medium
    all_layers: bool = False  # the -all releases: every layer (widths 16k and 262k, l0 small and big)
    transcoder: bool = False  # the transcoder releases: read the MLP's input, write its output (site must be mlp_out)
    affine: bool = False  # transcoders: the variant with a linear skip connection (ids ending _affine)
    tuning: GemmaTuning = GemmaTuning.model


@dataclass
class LocalSAEConfig(SAEConfig):
    path: str = MISSING  # a sae-lens directory; may contain {layer}
    site: SAESite = SAESite.resid_post  # where the SAE must read; another site is refused in one line
    # The layer the SAE was trained on, required when its cfg.json records no hook_name (the
    # layer check reads the hook name otherwise).
    layer: Optional[int] = None


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
class CocoDatasetConfig(DatasetConfig):
    """COCO 2017 on disk: <root>/<split>/*.jpg and <root>/annotations/{instances,captions}_<split>.json."""

    root: str = MISSING
    split: str = "val2017"
    supercategories: list[str] = field(default_factory=lambda: ["animal", "vehicle", "food", "indoor"])
    images_per_category: int = 50
    max_caption_words: int = 64
    seed: int = 0


@dataclass
class BuiltinDatasetConfig(DatasetConfig):
    image_root: Optional[str] = None  # photos as <image_root>/<concept>/*.jpg
    categories: list[str] = field(default_factory=lambda: ["landmarks", "animals", "objects", "scenes", "abstract"])
    max_images_per_concept: Optional[int] = None


@dataclass
class AppendixEDatasetConfig(DatasetConfig):
    """Seed 004's Appendix E list: bare concepts, each with a category, no images."""

    categories: list[str] = field(default_factory=list)  # [] is all 14, e.g. [animal, season]


@dataclass
class SentencesDatasetConfig(DatasetConfig):
    """Whole sentences, text only: the shipped shift set, or a file of 'category<TAB>sentence' lines."""

    path: Optional[str] = None  # None: xmodal/data/shift_sentences.txt


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


# ----------------------------------------------------------- experiment ----
@dataclass
class ExperimentConfig:
    """Base of every study's config; each study keeps its subclass beside its class.

    ``_target_`` names the Experiment class, which takes the config object as its one
    argument. ``validate()`` holds every check that needs no data, so that a bad value
    fails before a model loads.
    """

    _target_: str = MISSING
    name: str = MISSING

    def validate(self) -> None:
        """Raise ConfigError for a value no run could use; subclasses extend it.

        Here: every enum field holds one of its values. Hydra checks that at composition
        already; this also covers configs built in Python (``OverlapConfig(top_k=...)``).
        """
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            choices = _enum_of(hints[f.name])
            if choices is None:
                continue
            value = getattr(self, f.name)
            for item in value if isinstance(value, (list, tuple)) else [value]:
                if item is not None and item not in {c.value for c in choices}:  # None: an Optional left unset
                    raise ConfigError(f"experiment.{f.name}={item!r}; use {_one_of([c.value for c in choices])}")

    def require_model_overrides(self, name: str) -> None:
        """A list of overrides for a second model (experiment.<name>) may only set model.* keys."""
        bad = [o for o in getattr(self, name) if not str(o).startswith("model.")]
        if bad:
            raise ConfigError(f"experiment.{name} may only set model.* keys; got {bad}")

    def require_at_least_one(self, *names: str) -> None:
        """Counts that must be 1 or more (permutations, features, images ...)."""
        for name in names:
            value = getattr(self, name)
            if value < 1:
                raise ConfigError(f"experiment.{name}={value} must be at least 1")


def _enum_of(hint: Any) -> type[Enum] | None:
    """The Enum behind a field type (E, Optional[E] or list[E]), else None."""
    candidates = [hint, *typing.get_args(hint)]
    return next((c for c in candidates if isinstance(c, type) and issubclass(c, Enum)), None)


def _one_of(values: list[str]) -> str:
    return values[0] if len(values) == 1 else f"{', '.join(values[:-1])} or {values[-1]}"


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
AUTO = "auto"


def check_batch_size(value: Any) -> None:
    """One line on a value that is neither a positive whole number nor `auto`."""
    if value == AUTO:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"positions.batch_size={value!r} must be a whole number of at least 1, or auto (the largest that fits the GPU)")


@dataclass
class PositionsConfig:
    """Which residual-stream positions stand for a concept, and how they are pooled."""

    text_prompt: str = "{concept}"  # user turn for the text modality
    image_prompt: str = ""  # text after the image in the user turn
    use_chat_template: bool = True
    text_pooling: TextPooling = TextPooling.mean
    image_pooling: ImagePooling = ImagePooling.mean
    top_n: int = 5
    batch_size: Any = 8  # a whole number, or auto: the largest batch that fits the GPU (activations/batch_size.py)
    num_workers: int = 0  # DataLoader worker processes that decode and resize images while the model runs
    # Each concept text cut to its first N tokens of the model's own tokenizer (seed 001 cuts captions at 64)
    max_concept_tokens: Optional[int] = None


@dataclass
class PathsConfig:
    cache_dir: str = MISSING
    model_cache: str = "${paths.cache_dir}/models"
    activation_cache: str = "${paths.cache_dir}/activations"
    # When a job extracts activations, also extract and cache the model's preset layers in the
    # same forward pass, so that a -m layer sweep over them pays for one extraction, not four.
    cache_preset_layers: bool = True


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


PLUGIN_GROUP = "xmodal.plugins"  # entry points called by register_configs(): models, SAEs and datasets from outside the framework


def register_configs() -> None:
    """Store the framework's schemas in Hydra's ConfigStore, then let each plugin store its own.

    A plugin is an entry point in the ``xmodal.plugins`` group (pyproject.toml) naming a function
    that takes no argument; the model organism plugs in this way, as any user's model would.
    The study schemas are stored by ``xmodal.experiments.register_experiment_configs``.
    """
    if not OmegaConf.has_resolver("xmodal_dirname"):
        OmegaConf.register_new_resolver("xmodal_dirname", safe_dirname)
    cs = ConfigStore.instance()
    cs.store(name="xmodal_config", node=Config)
    for group, name, node in [
        ("model", "base_pretrained", PretrainedModelConfig),
        ("model", "base_tiny", TinyModelConfig),
        ("model", "base_tiny_clip", TinyClipModelConfig),
        ("model", "base_tiny_family", TinyFamilyModelConfig),
        ("dataset", "base_hub", HubDatasetConfig),
        ("sae", "base_none", NoSAEConfig),
        ("sae", "base_pretrained", PretrainedSAEConfig),
        ("sae", "base_local", LocalSAEConfig),
        ("sae", "base_gemma_scope_2", GemmaScope2SAEConfig),
        ("dataset", "base_synthetic", SyntheticDatasetConfig),
        ("dataset", "base_image_folder", ImageFolderDatasetConfig),
        ("dataset", "base_builtin", BuiltinDatasetConfig),
        ("dataset", "base_appendix_e", AppendixEDatasetConfig),
        ("dataset", "base_sentences", SentencesDatasetConfig),
        ("dataset", "base_coco", CocoDatasetConfig),
        ("logger", "base_none", LoggerConfig),
        ("logger", "base_wandb", WandbLoggerConfig),
    ]:
        cs.store(group=group, name=name, node=node)
    for plugin in entry_points(group=PLUGIN_GROUP):
        plugin.load()()


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
    check_batch_size(cfg.positions.batch_size)
    if cfg.positions.num_workers < 0:
        raise ConfigError(f"positions.num_workers={cfg.positions.num_workers} must be 0 (load images in the main process) or more")
    if cfg.positions.max_concept_tokens is not None and cfg.positions.max_concept_tokens < 1:
        raise ConfigError(f"positions.max_concept_tokens={cfg.positions.max_concept_tokens} must be at least 1, or null to keep whole texts")
    if "{concept}" not in cfg.positions.text_prompt:
        raise ConfigError(f"positions.text_prompt={cfg.positions.text_prompt!r} must contain '{{concept}}' where the concept goes")
    experiment = OmegaConf.to_object(cfg.experiment)  # the study's config dataclass
    if isinstance(experiment, ExperimentConfig):
        experiment.validate()
