"""LLaVA 1.5 (Vicuna 7B/13B) and Intel/llava-gemma-2b: CLIP tower, MLP projector, Llama or Gemma decoder."""

from __future__ import annotations

from typing import Any, ClassVar

from xmodal.models.base import ModelAdapter


class LlavaAdapter(ModelAdapter):
    family: ClassVar[str] = "llava"
    decoder_layers_path: ClassVar[str] = "model.language_model.layers"

    @classmethod
    def auto_model_class(cls) -> Any:
        from transformers import LlavaForConditionalGeneration

        return LlavaForConditionalGeneration

    def plain_prompt(self, text: str, with_image: bool) -> str:
        # LLaVA 1.5's conversation format, for checkpoints that ship no chat template.
        image = f"{self.processor.image_token}\n" if with_image else ""
        return f"USER: {image}{text} ASSISTANT:"
