"""Text-only Gemma 2 / Gemma 3 base models, for comparing a VLM's decoder with the LLM it came from."""

from __future__ import annotations

from typing import Any, ClassVar

from xmodal.models.base import ModelAdapter


class TextOnlyAdapter(ModelAdapter):
    family: ClassVar[str] = "text_only"
    decoder_layers_path: ClassVar[str] = "model.layers"
    final_norm_path: ClassVar[str] = "model.norm"
    supports_images: ClassVar[bool] = False

    @classmethod
    def auto_model_class(cls) -> Any:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM

    @classmethod
    def auto_processor_class(cls) -> Any:
        from transformers import AutoTokenizer

        return AutoTokenizer

    @property
    def image_token_id(self) -> int | None:
        return None
