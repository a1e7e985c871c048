"""Tiny random models of each VLM family's real transformers class, built locally (`model=tiny_<family>`).

Random weights: for tests and mechanics only; their numbers say nothing about the real models.
Each goes through its family's adapter, real model class and real processor (without the video
part, see family_tokenizer.images_only_processor), with a byte-level tokenizer that carries the
family's special tokens and a short chat template in the family's format. Image sizes are small
(patches of 8 px) so that a forward pass takes milliseconds, and the dynamic-resolution families
keep their dynamic resolution: a wide image gets more tokens than a square one.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from xmodal.errors import ConfigError
from xmodal.models.base import ModelAdapter, resolve_device, resolve_dtype
from xmodal.models.family_tokenizer import byte_level_tokenizer, images_only_processor


@dataclass
class TinyBuild:
    """What one family needs: its adapter class, config, model class and processor factory."""

    adapter_class: type[ModelAdapter]
    hf_config: Any
    model_class: Any
    processor: Callable[[], Any]


@dataclass
class TextSize:
    num_hidden_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def config(self, vocab_size: int, **extra: Any) -> dict[str, Any]:
        return dict(
            vocab_size=vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            **extra,
        )


def _chatml_template(image: str) -> str:
    """Qwen's ChatML format; `image` is what one image item becomes."""
    return (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}" + image + "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
        "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )


def _mistral_template(image: str) -> str:
    """llava-v1.6-mistral's [INST] format."""
    return (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] "
        "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}" + image + "\n{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
        "{% endfor %}{% endif %} [/INST]{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
    )


def _clip_vision(hidden: int = 32) -> dict[str, Any]:
    return dict(
        model_type="clip_vision_model",
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        projection_dim=hidden,
    )


# ---------------------------------------------------------------- families ----
def _qwen2_5_vl(text: TextSize) -> TinyBuild:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from xmodal.models.qwen2_5_vl import Qwen2_5_VLAdapter

    template = _chatml_template("<|vision_start|><|image_pad|><|vision_end|>")
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    named = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>", "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"}
    tokenizer = byte_level_tokenizer(specials, template, eos_token="<|im_end|>", pad_token="<|endoftext|>", extra_special_tokens=named)
    ids = {f"{key}_id": tokenizer.convert_tokens_to_ids(token) for key, token in named.items()}
    head_dim = text.head_dim
    section = [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16]  # the real 16/24/24 of 128, scaled
    config = Qwen2_5_VLConfig(
        text_config=text.config(len(tokenizer), rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=section)),
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=text.hidden_size,
            patch_size=8,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=32,
            fullatt_block_indexes=[1],
        ),
        **ids,
    )

    def processor() -> Any:
        # 16x16 to 64x64 pixels: 1x1 to 4x4 merged tokens, the image's aspect kept
        image_processor = Qwen2VLImageProcessorPil(size={"shortest_edge": 16 * 16, "longest_edge": 64 * 64}, patch_size=8, merge_size=2, temporal_patch_size=2)
        return images_only_processor(Qwen2_5_VLProcessor, image_processor=image_processor, tokenizer=tokenizer, chat_template=template)

    return TinyBuild(Qwen2_5_VLAdapter, config, Qwen2_5_VLForConditionalGeneration, processor)


def _llava_next(text: TextSize) -> TinyBuild:
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    from xmodal.models.llava_next import LlavaNextAdapter

    template = _mistral_template("<image>")
    tokenizer = byte_level_tokenizer(
        ["<unk>", "<s>", "</s>", "<image>", "<pad>"],
        template,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )
    pinpoints = [[32, 32], [32, 64], [64, 32], [64, 64]]  # anyres: 1x1, 1x2, 2x1 and 2x2 tiles of 32 px
    config = LlavaNextConfig(
        text_config=dict(model_type="mistral", head_dim=text.head_dim, **text.config(len(tokenizer))),
        vision_config=_clip_vision(),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=pinpoints,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )

    def processor() -> Any:
        image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_grid_pinpoints=pinpoints)
        return LlavaNextProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=8,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
            chat_template=template,
        )

    return TinyBuild(LlavaNextAdapter, config, LlavaNextForConditionalGeneration, processor)


def _qwen3_vl(text: TextSize) -> TinyBuild:
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from xmodal.models.qwen3_vl import Qwen3VLAdapter

    template = _chatml_template("<|vision_start|><|image_pad|><|vision_end|>")
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    named = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>", "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"}
    tokenizer = byte_level_tokenizer(specials, template, eos_token="<|im_end|>", pad_token="<|endoftext|>", extra_special_tokens=named)
    ids = {f"{key}_id": tokenizer.convert_tokens_to_ids(token) for key, token in named.items()}
    half = text.head_dim // 2
    section = [half - 2 * (5 * half // 16), 5 * half // 16, 5 * half // 16]  # the real 24/20/20 of 64, scaled
    config = Qwen3VLConfig(
        text_config=text.config(
            len(tokenizer), head_dim=text.head_dim, rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=section, mrope_interleaved=True)
        ),
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=text.hidden_size,
            patch_size=8,
            spatial_merge_size=2,
            temporal_patch_size=2,
            num_position_embeddings=64,
            deepstack_visual_indexes=[0],
        ),
        **ids,
    )

    def processor() -> Any:
        image_processor = Qwen2VLImageProcessorPil(
            size={"shortest_edge": 16 * 16, "longest_edge": 64 * 64},
            patch_size=8,
            merge_size=2,
            temporal_patch_size=2,
            image_mean=[0.5] * 3,
            image_std=[0.5] * 3,
        )
        return images_only_processor(Qwen3VLProcessor, image_processor=image_processor, tokenizer=tokenizer, chat_template=template)

    return TinyBuild(Qwen3VLAdapter, config, Qwen3VLForConditionalGeneration, processor)


def _llava_onevision(text: TextSize) -> TinyBuild:
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

    from xmodal.models.llava_onevision import LlavaOnevisionAdapter

    template = _chatml_template("<image>\n")
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]
    named = {"image_token": "<image>", "video_token": "<video>"}
    tokenizer = byte_level_tokenizer(specials, template, eos_token="<|im_end|>", pad_token="<|endoftext|>", extra_special_tokens=named)
    pinpoints = [[32, 32], [32, 64], [64, 32], [64, 64], [64, 96], [96, 64]]
    config = LlavaOnevisionConfig(
        text_config=dict(model_type="qwen2", **text.config(len(tokenizer))),
        vision_config=dict(
            model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
        ),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=pinpoints,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        vision_aspect_ratio="anyres_max_9",
    )

    def processor() -> Any:
        image_processor = LlavaOnevisionImageProcessorPil(size={"height": 32, "width": 32}, image_grid_pinpoints=pinpoints)
        return images_only_processor(
            LlavaOnevisionProcessor,
            image_processor=image_processor,
            tokenizer=tokenizer,
            chat_template=template,
            num_image_tokens=16,
            vision_feature_select_strategy="full",
            vision_aspect_ratio="anyres_max_9",
        )

    return TinyBuild(LlavaOnevisionAdapter, config, LlavaOnevisionForConditionalGeneration, processor)


def _internvl(text: TextSize) -> TinyBuild:
    from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLProcessor
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    from xmodal.models.internvl import InternVLAdapter

    template = _chatml_template("<IMG_CONTEXT>\n")
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"]
    named = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"}
    tokenizer = byte_level_tokenizer(specials, template, eos_token="<|im_end|>", pad_token="<|endoftext|>", extra_special_tokens=named)
    for key, token in named.items():
        setattr(tokenizer, f"{key}_id", tokenizer.convert_tokens_to_ids(token))
    config = InternVLConfig(
        text_config=dict(model_type="qwen2", **text.config(len(tokenizer))),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=[32, 32], patch_size=[8, 8]),
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=4,  # (32 / 8)^2 patches, pixel-shuffled by 0.5: 2 x 2 tokens per tile
        downsample_ratio=0.5,
    )

    def processor() -> Any:
        image_processor = GotOcr2ImageProcessorPil(size={"height": 32, "width": 32}, crop_to_patches=True, min_patches=1, max_patches=6)
        return images_only_processor(InternVLProcessor, image_processor=image_processor, tokenizer=tokenizer, chat_template=template, image_seq_length=4)

    return TinyBuild(InternVLAdapter, config, InternVLForConditionalGeneration, processor)


def _idefics3_tokenizer() -> tuple[Any, str]:
    template = (
        "{{ bos_token }}{% for m in messages %}{{ m['role'] | capitalize }}:"
        "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}<image>{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
        "{% endfor %}{% endif %}<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
    )
    tiles = [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>", *tiles]
    named = {
        "image_token": "<image>",
        "fake_image_token": "<fake_token_around_image>",
        "global_image_token": "<global-img>",
        "end_of_utterance_token": "<end_of_utterance>",
    }
    tokenizer = byte_level_tokenizer(
        specials, template, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>", pad_token="<|end_of_text|>", extra_special_tokens=named
    )
    return tokenizer, template


def _idefics3_config(config_class: Any, text: TextSize, tokenizer: Any) -> Any:
    return config_class(
        text_config=dict(model_type="llama", head_dim=text.head_dim, **text.config(len(tokenizer))),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        scale_factor=2,  # (32 / 8)^2 patches, shuffled by 2: 2 x 2 tokens per tile
    )


def _idefics3(text: TextSize) -> TinyBuild:
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    from xmodal.models.idefics3 import Idefics3Adapter

    tokenizer, template = _idefics3_tokenizer()
    config = _idefics3_config(Idefics3Config, text, tokenizer)

    def processor() -> Any:
        image_processor = Idefics3ImageProcessorPil(size={"longest_edge": 64}, max_image_size={"longest_edge": 32}, do_image_splitting=True)
        return Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=4, chat_template=template)

    return TinyBuild(Idefics3Adapter, config, Idefics3ForConditionalGeneration, processor)


def _smolvlm(text: TextSize) -> TinyBuild:
    """Idefics3's tokens and splitting with SmolVLM's class and processor (which needs num2words)."""
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration, SmolVLMProcessor
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil
    from transformers.processing_utils import ProcessorMixin

    from xmodal.models.smolvlm import SmolVLMAdapter

    tokenizer, template = _idefics3_tokenizer()
    config = _idefics3_config(SmolVLMConfig, text, tokenizer)

    class SmolVLMImagesProcessor(SmolVLMProcessor):
        def apply_chat_template(self, conversation: Any, chat_template: str | None = None, **kwargs: Any) -> Any:
            # SmolVLM's own override only adds the video processor's frame settings, and there is none
            return ProcessorMixin.apply_chat_template(self, conversation, chat_template=chat_template, **kwargs)

    def processor() -> Any:
        image_processor = SmolVLMImageProcessorPil(size={"longest_edge": 64}, max_image_size={"longest_edge": 32}, do_image_splitting=True)
        return images_only_processor(SmolVLMImagesProcessor, image_processor=image_processor, tokenizer=tokenizer, image_seq_len=4, chat_template=template)

    return TinyBuild(SmolVLMAdapter, config, SmolVLMForConditionalGeneration, processor)


def _gemma4(text: TextSize) -> TinyBuild:
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration, Gemma4Processor
    from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    from xmodal.models.gemma4 import Gemma4Adapter

    template = (
        "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
        "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}<image_soft_token>{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
        "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
    )
    named = {
        "image_token": "<image_soft_token>",
        "boi_token": "<start_of_image>",
        "eoi_token": "<end_of_image>",
        "audio_token": "<audio_soft_token>",
        "boa_token": "<start_of_audio>",
        "eoa_token": "<end_of_audio>",
    }
    specials = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>", *named.values(), "<|video|>"]
    tokenizer = byte_level_tokenizer(specials, template, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", extra_special_tokens=named)
    ids = {key: tokenizer.convert_tokens_to_ids(token) for key, token in named.items()}
    for key, token_id in ids.items():
        setattr(tokenizer, f"{key}_id", token_id)
    layer_types = ["sliding_attention"] * (text.num_hidden_layers - 1) + ["full_attention"]
    config = Gemma4Config(
        text_config=dict(
            head_dim=text.head_dim,
            hidden_size_per_layer_input=0,
            vocab_size_per_layer_input=len(tokenizer),
            sliding_window=64,
            layer_types=layer_types,
            pad_token_id=0,
            eos_token_id=1,
            bos_token_id=2,
            **text.config(len(tokenizer)),
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=16,
            patch_size=4,
            pooling_kernel_size=3,
            position_embedding_size=256,
        ),
        audio_config=None,
        image_token_id=ids["image_token"],
        boi_token_id=ids["boi_token"],
        eoi_token_id=ids["eoi_token"],
        video_token_id=tokenizer.convert_tokens_to_ids("<|video|>"),
        audio_token_id=None,
        boa_token_id=None,
        eoa_token_index=None,
    )

    def processor() -> Any:
        # 4 px patches pooled 3 x 3, at most 70 soft tokens: about 100 x 100 px, the aspect kept
        image_processor = Gemma4ImageProcessorPil(patch_size=4, max_soft_tokens=70, pooling_kernel_size=3)
        return images_only_processor(
            Gemma4Processor,
            feature_extractor=Gemma4AudioFeatureExtractor(),
            image_processor=image_processor,
            tokenizer=tokenizer,
            chat_template=template,
            image_seq_length=70,
        )

    return TinyBuild(Gemma4Adapter, config, Gemma4ForConditionalGeneration, processor)


FAMILIES: dict[str, Callable[[TextSize], TinyBuild]] = {
    "qwen2_5_vl": _qwen2_5_vl,
    "llava_next": _llava_next,
    "qwen3_vl": _qwen3_vl,
    "llava_onevision": _llava_onevision,
    "internvl": _internvl,
    "idefics3": _idefics3,
    "smolvlm": _smolvlm,
    "gemma4": _gemma4,
}


def tiny_family(
    family: str,
    name: str | None = None,
    num_hidden_layers: int = 4,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_attention_heads: int = 2,
    num_key_value_heads: int = 1,
    init_seed: int = 0,
    dtype: str = "float32",
    device: str = "auto",
    layer_presets: Sequence[int] = (),
    sae_release: str | None = None,
) -> ModelAdapter:
    """A random-weight model of `family`'s real transformers class, through the family's adapter."""
    if family not in FAMILIES:
        raise ConfigError(f"model.family={family!r} has no tiny build; pick one of {', '.join(FAMILIES)}")
    text = TextSize(num_hidden_layers, hidden_size, intermediate_size, num_attention_heads, num_key_value_heads)
    build = FAMILIES[family](text)
    torch_device, torch_dtype = resolve_device(device), resolve_dtype(dtype)

    def load_model() -> torch.nn.Module:
        with torch.random.fork_rng(devices=[]), torch_device:
            torch.manual_seed(init_seed)
            model = build.model_class._from_config(build.hf_config, dtype=torch_dtype)
        return model.to(device=torch_device, dtype=torch_dtype).eval()

    config_hash = hashlib.sha256(json.dumps(build.hf_config.to_dict(), sort_keys=True, default=str).encode()).hexdigest()
    identity = {"family": family, "name_or_path": f"xmodal-tiny-{family}:{config_hash[:16]}", "init_seed": init_seed, "dtype": dtype}
    return build.adapter_class(name or f"tiny_{family}", build.hf_config, load_model, build.processor, identity, torch_device, layer_presets, sae_release)
