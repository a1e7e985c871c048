"""Qwen2.5-VL (3B, 7B, 32B, 72B): dynamic-resolution ViT, 2x2 patch merger, Qwen2.5 decoder.

Each image gets (h / 2) x (w / 2) ``<|image_pad|>`` tokens from its own ``image_grid_thw``
(patches of 14 px, merged 2x2), so images of different sizes give different token counts:
batches are padded and read by mask row (``ragged_images``).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from xmodal.models.base import ImageLayout, ModelAdapter


class Qwen2_5_VLAdapter(ModelAdapter):
    family: ClassVar[str] = "qwen2_5_vl"
    # Qwen2_5_VLForConditionalGeneration.model (Qwen2_5_VLModel).language_model (Qwen2_5_VLTextModel).layers
    decoder_layers_path: ClassVar[str] = "model.language_model.layers"
    ragged_images: ClassVar[bool] = True

    @classmethod
    def auto_model_class(cls) -> Any:
        from transformers import Qwen2_5_VLForConditionalGeneration

        return Qwen2_5_VLForConditionalGeneration

    def synthesis_side(self) -> int:
        """A multiple of patch x merge (so smart_resize keeps it) near 448 px, within the pixel budget."""
        image_processor = self.processor.image_processor
        factor = int(image_processor.patch_size) * int(image_processor.merge_size)
        largest = math.isqrt(int(image_processor.size.longest_edge)) // factor
        return factor * max(1, min(448 // factor, largest))

    def plain_prompt(self, text: str, with_image: bool) -> str:
        image = f"<|vision_start|>{self.processor.image_token}<|vision_end|>" if with_image else ""
        return f"{image}{text}"

    def image_layouts(self, inputs: Any) -> list[ImageLayout]:
        """One (rows, columns) grid per temporal slice of each image's image_grid_thw, after the merger."""
        merge = int(self.processor.image_processor.merge_size)
        layouts = []
        for t, h, w in inputs["image_grid_thw"].tolist():
            grids = [(h // merge, w // merge)] * t
            layouts.append(ImageLayout(grids, torch.ones(t * (h // merge) * (w // merge), dtype=torch.bool)))
        return layouts
