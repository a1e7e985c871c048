"""Build the organism: a Gemma3ForConditionalGeneration with the real 270M decoder.

The language model is google/gemma-3-270m (frozen, from `language_model`); the SigLIP
vision tower and projector are small and come from the shipped safetensors file (or
start random, for training). The image soft token is `<unused0>` (id 6): the 270M
vocabulary has no `<image_soft_token>`, and a reserved, never-trained id carries no
meaning of its own.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from enum import StrEnum
from importlib.resources import files
from pathlib import Path
from typing import Any, Sequence

import torch

from xmodal.errors import ModelLoadError
from xmodal.models.base import resolve_device, resolve_dtype
from xmodal.models.gemma3 import Gemma3Adapter
from xmodal.models.text_only import TextOnlyAdapter
from xmodal.models.tokenizer import gemma3_processor, gemma3_tokenizer, special_token_ids
from xmodal.organism.language_model import language_model_config, load_language_model

log = logging.getLogger(__name__)

# The organism's vision side: 64x64 images, 8x8 patches, pooled to 16 image tokens.
VISION = dict(hidden_size=192, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4, image_size=64, patch_size=8)
MM_TOKENS_PER_IMAGE = 16
SHIPPED_VISION_WEIGHTS = "vision.safetensors"
END_OF_TURN_ID = 106  # <end_of_turn> in the Gemma 3 vocabulary


SHIPPED_LORA_WEIGHTS = "lora.safetensors"


class Variant(StrEnum):
    instruct = "instruct"  # the default: stage 2, projector and decoder (LoRA) trained on the instruction mix
    frozen = "frozen"  # stage 1 only: the decoder is the untouched gemma-3-270m
    planted = "planted"  # positive control: stage 2 plus a loss that plants text-image alignment at one layer


DEFAULT_VARIANT = Variant.instruct


def shipped_weights_dir(variant: str = DEFAULT_VARIANT) -> Path:
    """Where a variant's shipped weights live: weights/<variant>/ (vision, LoRA unless frozen, saes/width_<W>/)."""
    return Path(str(files("xmodal.organism").joinpath("weights"))) / variant


def organism_config(model_cache: str | Path) -> Any:
    from transformers import Gemma3Config

    text_config = language_model_config(model_cache).to_dict()
    return Gemma3Config(text_config=text_config, vision_config=VISION, mm_tokens_per_image=MM_TOKENS_PER_IMAGE, **special_token_ids())


def vision_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trained part of the organism: vision tower and projector."""
    return {name: tensor for name, tensor in model.state_dict().items() if name.startswith(("model.vision_tower.", "model.multi_modal_projector."))}


def build_organism(
    model_cache: str | Path,
    vision_weights: str | Path | None,
    init_seed: int = 0,
    dtype: torch.dtype = torch.float32,
    lora_weights: str | Path | None = None,
) -> torch.nn.Module:
    """The organism model; `vision_weights=None` gives a fresh random vision side (for training).

    `lora_weights` (stage 2, a file written by ``python -m xmodal.organism.train stage=instruct``)
    are merged into the decoder on load, so the model is a plain Gemma 3 again.
    """
    from safetensors.torch import load_file
    from transformers import Gemma3ForConditionalGeneration
    from transformers.initialization import no_init_weights

    config = organism_config(model_cache)
    language_model = load_language_model(model_cache, dtype=torch.float32)
    # Every weight is overwritten below when vision weights are given: skip the random init (seconds).
    initialisation = contextlib.nullcontext() if vision_weights is None else no_init_weights()
    with torch.random.fork_rng(devices=[]), initialisation:
        torch.manual_seed(init_seed)
        model = Gemma3ForConditionalGeneration(config)
        if vision_weights is None:
            init_projector(model, language_model)
    model.model.language_model.load_state_dict(language_model.model.state_dict())
    model.lm_head.weight = model.model.language_model.embed_tokens.weight  # tied, as in the 270M
    # Answers end with <end_of_turn> (as in Gemma 3's chat format): generation stops there too.
    model.generation_config.eos_token_id = [config.text_config.eos_token_id, END_OF_TURN_ID]
    if vision_weights is not None:
        path = Path(vision_weights).expanduser()
        if not path.exists():
            raise ModelLoadError(f"organism vision weights not found at {path}; reinstall xmodal or train them (python -m xmodal.organism.train)")
        state = {k: v.float() for k, v in load_file(str(path)).items()}
        missing, unexpected = model.load_state_dict(state, strict=False)
        wrong = [k for k in missing if k.startswith(("model.vision_tower.", "model.multi_modal_projector."))]
        if wrong or unexpected:
            raise ModelLoadError(f"organism vision weights at {path} do not fit the organism: missing {wrong[:3]}, unexpected {unexpected[:3]}")
    if lora_weights is not None:
        load_lora(model.model.language_model, lora_weights)
        merge_lora(model.model.language_model)
    return model.to(dtype)


# ------------------------------------------------------------------ LoRA --
def add_lora(language_model: torch.nn.Module, rank: int, alpha: float, targets: Sequence[str]) -> torch.nn.Module:
    """LoRA adapters (peft) on the decoder's `targets` projections, in place; B starts at zero, so nothing changes yet."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0, bias="none")
    return inject_adapter_in_model(config, language_model)


def lora_state_dict(language_model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor for name, tensor in language_model.state_dict().items() if ".lora_" in name}


def save_lora(language_model: torch.nn.Module, path: Path, rank: int, alpha: float, targets: Sequence[str]) -> None:
    """The adapters alone, in fp16 safetensors, with the shape they need in the metadata; written atomically."""
    from safetensors.torch import save_file

    state = {k: v.detach().to(torch.float16).contiguous().cpu() for k, v in lora_state_dict(language_model).items()}
    metadata = {"format": "pt", "what": "xmodal organism decoder LoRA", "lora": json.dumps({"rank": rank, "alpha": alpha, "targets": list(targets)})}
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp), metadata=metadata)
    tmp.replace(path)


def load_lora(language_model: torch.nn.Module, path: str | Path) -> None:
    """Add the adapters a LoRA file describes and load them; a missing or misshapen file is one ModelLoadError."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelLoadError(f"organism LoRA weights not found at {path}; train them (python -m xmodal.organism.train stage=instruct) or reinstall xmodal")
    with safe_open(str(path), framework="pt") as handle:
        shape = json.loads((handle.metadata() or {}).get("lora", "null") or "null")
    if not shape:
        raise ModelLoadError(f"{path} is not an organism LoRA file (no 'lora' metadata); give the lora.safetensors that stage=instruct wrote")
    add_lora(language_model, int(shape["rank"]), float(shape["alpha"]), shape["targets"])
    expected = lora_state_dict(language_model)
    state = {k: v.float() for k, v in load_file(str(path)).items()}
    wrong = sorted(set(expected) ^ set(state)) + [k for k in state if k in expected and state[k].shape != expected[k].shape]
    if wrong:
        raise ModelLoadError(f"organism LoRA weights at {path} do not fit the decoder (e.g. {wrong[0]}); they were trained for another model")
    language_model.load_state_dict(state, strict=False)


def merge_lora(language_model: torch.nn.Module) -> None:
    """Fold every adapter into its base weight and put the plain projection back (peft's merge, then unwrap)."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(language_model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(language_model.get_submodule(parent_name), child, module.get_base_layer())


def init_projector(model: torch.nn.Module, language_model: torch.nn.Module) -> None:
    """Random projector whose outputs have the size of the decoder's scaled text embeddings.

    transformers starts it at zero, which would make every image the same.
    """
    embed = language_model.model.embed_tokens
    text_rms = (embed.weight.float().pow(2).mean() ** 0.5 * embed.embed_scale).item()
    projector = model.model.multi_modal_projector.mm_input_projection_weight
    torch.nn.init.normal_(projector, std=text_rms / projector.shape[0] ** 0.5)


def organism(
    name: str = "organism",
    model_cache: str = "~/.cache/xmodal/models",
    vision_weights: str | None = None,
    dtype: str = "float32",
    device: str = "auto",
    layer_presets: Sequence[int] = (5, 9, 12, 15),
    sae_release: str | None = None,
    lora_weights: str | None = None,
    variant: str = DEFAULT_VARIANT,
) -> Gemma3Adapter:
    """The organism as an ordinary Gemma 3 adapter: the same code path as Gemma 3 4B.

    `variant` picks the shipped weights (instruct: stage 2, whose LoRA is merged into the
    decoder when the weights load; frozen: stage 1; planted: the positive control);
    `vision_weights` and `lora_weights` replace them.
    """
    if variant not in {v.value for v in Variant}:
        raise ModelLoadError(f"organism variant {variant!r} is not shipped; the variants are {', '.join(Variant)}")
    shipped = shipped_weights_dir(variant)
    weights = Path(vision_weights).expanduser() if vision_weights else shipped / SHIPPED_VISION_WEIGHTS
    lora = Path(lora_weights).expanduser() if lora_weights else (shipped / SHIPPED_LORA_WEIGHTS if variant != "frozen" else None)
    for path, stage in ((weights, ""), (lora, " stage=instruct")):
        if path is not None and not path.is_file():
            raise ModelLoadError(f"organism weights not found at {path}; train them (python -m xmodal.organism.train{stage}) or reinstall xmodal")
    torch_device, torch_dtype = resolve_device(device), resolve_dtype(dtype)
    hf_config = organism_config(model_cache)

    def load_model() -> torch.nn.Module:
        log.info("Loading the organism (gemma-3-270m + vision weights %s%s)", weights, f" + LoRA {lora}" if lora else "")
        return build_organism(model_cache, weights, dtype=torch_dtype, lora_weights=lora).to(torch_device).eval()

    def load_processor() -> Any:
        return gemma3_processor(gemma3_tokenizer(model_cache), VISION["image_size"], MM_TOKENS_PER_IMAGE)

    identity = {"family": "gemma3", "name_or_path": "xmodal-organism", "vision_weights": _file_digest(weights), "dtype": dtype}
    if lora is not None:  # the activation cache keys on it: another decoder, other activations
        identity["lora_weights"] = _file_digest(lora)
    return Gemma3Adapter(name, hf_config, load_model, load_processor, identity, torch_device, layer_presets, sae_release)


def organism_base(
    name: str = "organism_base",
    model_cache: str = "~/.cache/xmodal/models",
    dtype: str = "float32",
    device: str = "auto",
    layer_presets: Sequence[int] = (5, 9, 12, 15),
    sae_release: str | None = None,
) -> TextOnlyAdapter:
    """The organism's decoder alone: the plain gemma-3-270m, from the same cached conversion."""
    torch_device, torch_dtype = resolve_device(device), resolve_dtype(dtype)
    hf_config = language_model_config(model_cache)

    def load_model() -> torch.nn.Module:
        return load_language_model(model_cache, dtype=torch_dtype).to(torch_device).eval()

    identity = {"family": "text_only", "name_or_path": "xmodal-gemma-3-270m-gguf", "dtype": dtype}
    return TextOnlyAdapter(name, hf_config, load_model, lambda: gemma3_tokenizer(model_cache), identity, torch_device, layer_presets, sae_release)


def _file_digest(path: Path) -> str:
    if not path.exists():
        return "missing"
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def encode_captioned(adapter: Gemma3Adapter, pairs: Sequence[tuple[Any, Any]]) -> tuple[dict[str, torch.Tensor], int]:
    """(image, scene) pairs in the organism's training format, right-padded, and where captions start.

    User turn: the image; model turn: the caption and <end_of_turn>. Every row has the
    same prompt, so the caption starts at the same index in all of them.
    """
    processor = adapter.processor
    processor.tokenizer.padding_side = "right"  # positions then match unpadded inference
    prompt = adapter.render_prompt("", True, use_chat_template=True)
    encoded = processor(
        text=[prompt + scene.caption + "<end_of_turn>" for _, scene in pairs],
        images=[[image] for image, _ in pairs],
        return_tensors="pt",
        padding=True,
        add_special_tokens=False,
    )
    caption_start = len(processor(text=[prompt], images=[[pairs[0][0]]], add_special_tokens=False)["input_ids"][0])
    return encoded, caption_start
