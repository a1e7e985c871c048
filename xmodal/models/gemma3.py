"""Gemma 3 multimodal (4B, 12B, 27B and the tiny/organism builds): SigLIP tower, Gemma 3 decoder."""

from __future__ import annotations

from typing import Any, ClassVar

from xmodal.models.base import ModelAdapter


class Gemma3Adapter(ModelAdapter):
    family: ClassVar[str] = "gemma3"
    # Gemma3ForConditionalGeneration.model (Gemma3Model).language_model (Gemma3TextModel).layers
    decoder_layers_path: ClassVar[str] = "model.language_model.layers"

    @classmethod
    def auto_model_class(cls) -> Any:
        from transformers import Gemma3ForConditionalGeneration

        return Gemma3ForConditionalGeneration
