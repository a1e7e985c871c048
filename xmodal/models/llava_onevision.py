"""LLaVA-OneVision (Qwen2 0.5B/7B/72B): SigLIP tower, anyres_max_9 tiles with newline tokens.

The layout of LLaVA-NeXT (a base view, then the unpadded tile grid with a newline token after
each row), with the base grid's side from the processor's ``num_image_tokens`` and the tile grid
shrunk when it holds more than 9 base views' worth of tokens (the processor's own count).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

from xmodal.models.base import ImageLayout
from xmodal.models.llava_next import LlavaNextAdapter


class LlavaOnevisionAdapter(LlavaNextAdapter):
    family: ClassVar[str] = "llava_onevision"
    decoder_layers_path: ClassVar[str] = "model.language_model.layers"

    @classmethod
    def auto_model_class(cls) -> Any:
        from transformers import LlavaOnevisionForConditionalGeneration

        return LlavaOnevisionForConditionalGeneration

    def plain_prompt(self, text: str, with_image: bool) -> str:
        # the Qwen2 ChatML format of llava-onevision-qwen2, for checkpoints that ship no chat template
        image = f"{self.processor.image_token}\n" if with_image else ""
        return f"<|im_start|>user\n{image}{text}<|im_end|>\n<|im_start|>assistant\n"

    def image_layouts(self, inputs: Any) -> list[ImageLayout]:
        from transformers.image_processing_utils import select_best_resolution

        processor = self.processor
        height, width = inputs["pixel_values"].shape[-2:]
        side = int(math.isqrt(processor.num_image_tokens))
        layouts = []
        for orig_h, orig_w in inputs["image_sizes"].tolist():
            best_h, best_w = select_best_resolution([orig_h, orig_w], processor.image_processor.image_grid_pinpoints)
            unpadded, rows = processor._get_unpadded_features(orig_h, orig_w, side, side, best_h // height, best_w // width)
            layouts.append(self._layout(side, side, rows, unpadded // rows))
        return layouts
