"""SmolVLM and SmolVLM2 (256M, 500M, 2.2B): Idefics3's image splitting with a SmolLM2 decoder."""

from __future__ import annotations

from typing import Any, ClassVar

from xmodal.models.idefics3 import Idefics3Adapter


class SmolVLMAdapter(Idefics3Adapter):
    family: ClassVar[str] = "smolvlm"
    decoder_layers_path: ClassVar[str] = "model.text_model.layers"
    final_norm_path: ClassVar[str] = "model.text_model.norm"

    @classmethod
    def auto_model_class(cls) -> Any:
        from transformers import SmolVLMForConditionalGeneration

        return SmolVLMForConditionalGeneration
