"""PaliGemma 2: SigLIP tower, Gemma 2 decoder, no chat template (image tokens, BOS, prompt, newline)."""

from __future__ import annotations

from typing import Any, ClassVar

from xmodal.models.base import ModelAdapter


class PaliGemmaAdapter(ModelAdapter):
    family: ClassVar[str] = "paligemma"
    decoder_layers_path: ClassVar[str] = "model.language_model.layers"

    @classmethod
    def auto_model_class(cls) -> Any:
        from transformers import PaliGemmaForConditionalGeneration

        return PaliGemmaForConditionalGeneration

    @property
    def chat_template(self) -> str | None:
        return None  # PaliGemma is a prefix-LM with a fixed prompt format

    def plain_prompt(self, text: str, with_image: bool) -> str:
        # The processor itself writes "<image>"*n + BOS + text + "\n" when it sees the <image> marker.
        if with_image:
            return f"{self.processor.image_token}{text}"
        return f"{self.tokenizer.bos_token}{text}\n"
