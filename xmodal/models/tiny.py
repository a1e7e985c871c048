"""A random-weight Gemma 3 multimodal model with the real Gemma 3 tokenizer, for tests and mechanics.

Its numbers say nothing about real VLMs. It goes through the same Gemma3Adapter as
Gemma 3 4B, so every code path (processor, image tokens, hooks) is the real one.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Sequence

import torch

from xmodal.models.base import resolve_device, resolve_dtype
from xmodal.models.gemma3 import Gemma3Adapter
from xmodal.models.text_only import TextOnlyAdapter
from xmodal.models.tokenizer import gemma3_processor, gemma3_tokenizer, special_token_ids


def tiny_gemma3(
    name: str = "tiny",
    tokenizer_cache: str = "~/.cache/xmodal/models",
    num_hidden_layers: int = 6,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_attention_heads: int = 2,
    num_key_value_heads: int = 1,
    head_dim: int = 32,
    vision_hidden_size: int = 32,
    vision_layers: int = 2,
    vision_intermediate_size: int | None = None,  # None: 2 x vision_hidden_size
    vision_attention_heads: int = 2,
    sliding_window: int = 64,
    image_size: int = 64,
    patch_size: int = 8,
    mm_tokens_per_image: int = 16,
    init_seed: int = 0,
    dtype: str = "float32",
    device: str = "auto",
    layer_presets: Sequence[int] = (),
    sae_release: str | None = None,
) -> Gemma3Adapter:
    from transformers import Gemma3Config

    tokenizer_holder: dict[str, Any] = {}

    def tokenizer() -> Any:
        if "tok" not in tokenizer_holder:
            tokenizer_holder["tok"] = gemma3_tokenizer(tokenizer_cache)
        return tokenizer_holder["tok"]

    ids = special_token_ids()
    hf_config = Gemma3Config(
        text_config=dict(
            vocab_size=262144,
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_hidden_layers=num_hidden_layers,
            num_attention_heads=num_attention_heads,
            num_key_value_heads=num_key_value_heads,
            head_dim=head_dim,
            sliding_window=sliding_window,
        ),
        vision_config=dict(
            hidden_size=vision_hidden_size,
            intermediate_size=vision_intermediate_size or 2 * vision_hidden_size,
            num_hidden_layers=vision_layers,
            num_attention_heads=vision_attention_heads,
            image_size=image_size,
            patch_size=patch_size,
        ),
        mm_tokens_per_image=mm_tokens_per_image,
        **ids,
    )
    torch_device, torch_dtype = resolve_device(device), resolve_dtype(dtype)

    def load_model() -> torch.nn.Module:
        from transformers import Gemma3ForConditionalGeneration

        with torch.random.fork_rng(devices=[]), torch_device:
            torch.manual_seed(init_seed)
            # built on the target device in the target dtype: a random 4B never exists in fp32 on the host
            model = Gemma3ForConditionalGeneration._from_config(hf_config, dtype=torch_dtype)
            # The projector starts at zero in transformers; random, so image tokens carry the image.
            projector = model.model.multi_modal_projector.mm_input_projection_weight
            torch.nn.init.normal_(projector, std=vision_hidden_size**-0.5)
        return model.to(device=torch_device, dtype=torch_dtype).eval()

    def load_processor() -> Any:
        return gemma3_processor(tokenizer(), image_size, mm_tokens_per_image)

    config_hash = hashlib.sha256(json.dumps(hf_config.to_dict(), sort_keys=True, default=str).encode()).hexdigest()
    identity = {"family": "gemma3", "name_or_path": f"xmodal-tiny:{config_hash[:16]}", "init_seed": init_seed, "dtype": dtype}
    return Gemma3Adapter(name, hf_config, load_model, load_processor, identity, torch_device, layer_presets, sae_release)


def tiny_gemma3_text(name: str = "tiny_text", **vlm_kwargs: Any) -> TextOnlyAdapter:
    """The tiny VLM's own language model as a text-only Gemma 3 model (same weights, same tokenizer).

    The text-only counterpart of `tiny`: RepresentationShift between the two must be
    zero, because tiny's decoder was never trained on images.
    """
    from transformers import Gemma3ForCausalLM

    vlm = tiny_gemma3(name=f"{name}-source", **vlm_kwargs)
    text_config = vlm.hf_config.text_config

    def load_model() -> torch.nn.Module:
        source = vlm.model
        model = Gemma3ForCausalLM(text_config)
        model.model.load_state_dict(source.model.language_model.state_dict())
        model.lm_head.load_state_dict(source.lm_head.state_dict())
        return model.to(device=vlm.device, dtype=next(source.parameters()).dtype).eval()

    identity = {**vlm.identity, "family": "text_only", "from": "tiny language model"}
    return TextOnlyAdapter(name, text_config, load_model, lambda: vlm.tokenizer, identity, vlm.device, vlm.layer_presets)
