"""Every family adapter loads a checkpoint from a local directory and reads the right positions.

Each test saves a tiny random model of the family's real transformers class (with the
real Gemma tokenizer) to disk with save_pretrained, loads it back through the
adapter's from_pretrained, and checks resid_post against output_hidden_states and
the image positions against the processor's image-token mask.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from xmodal.activations.capture import run_to_layers
from xmodal.models import Gemma3Adapter, LlavaAdapter, PaliGemmaAdapter, TextOnlyAdapter
from xmodal.models.tokenizer import IMAGE_SOFT_TOKEN, gemma3_chat_template, gemma3_tokenizer

TINY_TEXT = dict(vocab_size=262144, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1, head_dim=16)


def _tokenizer(tiny):
    # A fresh copy of the cached Gemma 3 tokenizer: some processors (PaliGemma) change the
    # tokenizer they are given, and the session's tiny model must not see that.
    return gemma3_tokenizer("~/.cache/xmodal/models")


def save_gemma3(path, tiny):
    tiny.model.save_pretrained(path)
    tiny.processor.save_pretrained(path)
    return Gemma3Adapter, tiny.hf_config.mm_tokens_per_image


def save_llava(path, tiny):
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tok = _tokenizer(tiny)
    config = LlavaConfig(
        text_config=dict(model_type="gemma", **TINY_TEXT),
        vision_config=dict(
            model_type="clip_vision_model",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
            projection_dim=32,
        ),
        image_token_id=tok.convert_tokens_to_ids(IMAGE_SOFT_TOKEN),
    )
    LlavaForConditionalGeneration(config).save_pretrained(path)
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tok,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=gemma3_chat_template().replace("<start_of_image>", IMAGE_SOFT_TOKEN),
    )
    processor.save_pretrained(path)
    return LlavaAdapter, (32 // 8) ** 2


def save_paligemma(path, tiny):
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration, PaliGemmaProcessor, SiglipImageProcessor

    tok = _tokenizer(tiny)
    config = PaliGemmaConfig(
        text_config=dict(model_type="gemma2", **TINY_TEXT),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8, projection_dim=32),
        image_token_id=tok.convert_tokens_to_ids(IMAGE_SOFT_TOKEN),
        projection_dim=32,
    )
    config.text_config.num_image_tokens = 16
    PaliGemmaForConditionalGeneration(config).save_pretrained(path)
    image_processor = SiglipImageProcessor(size={"height": 32, "width": 32})
    image_processor.image_seq_length = 16
    PaliGemmaProcessor(image_processor=image_processor, tokenizer=tok).save_pretrained(path)
    return PaliGemmaAdapter, 16


def save_gemma2_text(path, tiny):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    Gemma2ForCausalLM(Gemma2Config(**TINY_TEXT)).save_pretrained(path)
    _tokenizer(tiny).save_pretrained(path)
    return TextOnlyAdapter, 0


@pytest.mark.parametrize("family", [save_gemma3, save_llava, save_paligemma, save_gemma2_text], ids=lambda f: f.__name__[5:])
def test_family_loads_from_local_directory_and_reads_right_positions(family, tiny, tmp_path):
    torch.manual_seed(0)
    adapter_class, n_image_tokens = family(tmp_path / "ckpt", tiny)
    adapter = adapter_class.from_pretrained("local", str(tmp_path / "ckpt"), dtype="float32", device="cpu")
    layers = list(range(adapter.num_layers - 1))

    prompt = adapter.text_prompt("{concept}", "a red apple", use_chat_template=True)
    assert adapter.tokenizer.decode([prompt.input_ids[i] for i in prompt.concept_positions]).strip() == "a red apple"
    all_inputs = [{"input_ids": torch.tensor([prompt.input_ids])}]
    if adapter.supports_images:
        image_inputs = adapter.image_inputs([Image.new("RGB", (40, 30), (200, 30, 30))], "What is it?", True)
        assert int(adapter.image_token_mask(image_inputs["input_ids"]).sum()) == n_image_tokens
        all_inputs.append(dict(image_inputs))
    for inputs in all_inputs:
        captured = run_to_layers(adapter.model, adapter.decoder_layers(), inputs, layers)
        with torch.inference_mode():
            reference = adapter.model(**inputs, output_hidden_states=True, use_cache=False).hidden_states
        for layer in layers:
            torch.testing.assert_close(captured[layer], reference[layer + 1], rtol=0, atol=1e-5)
