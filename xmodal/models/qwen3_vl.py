"""Qwen3-VL (2B, 4B, 8B, 32B; dense): dynamic-resolution ViT with 16 px patches, Qwen3 decoder, DeepStack.

Image tokens as in Qwen2.5-VL (``image_grid_thw``, 2x2 merger). DeepStack adds features of
intermediate vision layers to the image tokens' hidden states after the first decoder layers
(one per ``deepstack_visual_indexes`` entry): resid_post read at those layers is the decoder
layer's output before that addition, as transformers' ``output_hidden_states`` reports it.
"""

from __future__ import annotations

from typing import Any, ClassVar

from xmodal.models.qwen2_5_vl import Qwen2_5_VLAdapter


class Qwen3VLAdapter(Qwen2_5_VLAdapter):
    family: ClassVar[str] = "qwen3_vl"
    decoder_layers_path: ClassVar[str] = "model.language_model.layers"

    @classmethod
    def auto_model_class(cls) -> Any:
        from transformers import Qwen3VLForConditionalGeneration

        return Qwen3VLForConditionalGeneration
