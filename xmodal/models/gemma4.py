"""Gemma 4 (the multimodal sizes): a vision tower with aspect-preserving variable resolution, Gemma 4 decoder.

An image is resized, keeping its aspect, to at most ``max_soft_tokens`` (70 to 1120; 280 by
default) pooled 3 x 3 patch blocks, so a wide image gets a wide grid of soft tokens between
``boi`` and ``eoi``. The grid of each image is read from its ``image_position_ids`` (x, y of every
patch; padding at -1).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from xmodal.models.base import ImageLayout, ModelAdapter


class Gemma4Adapter(ModelAdapter):
    family: ClassVar[str] = "gemma4"
    # Gemma4ForConditionalGeneration.model (Gemma4Model).language_model (Gemma4TextModel).layers
    decoder_layers_path: ClassVar[str] = "model.language_model.layers"
    final_norm_path: ClassVar[str] = "model.language_model.norm"
    ragged_images: ClassVar[bool] = True

    @classmethod
    def auto_model_class(cls) -> Any:
        from transformers import Gemma4ForConditionalGeneration

        return Gemma4ForConditionalGeneration

    def synthesis_side(self) -> int:
        """The side a square image is resized to under the soft-token budget: a multiple of pooling x patch."""
        image_processor = self.processor.image_processor
        patch, pooling = int(image_processor.patch_size), int(image_processor.pooling_kernel_size)
        budget = int(image_processor.max_soft_tokens) * pooling**2 * patch**2
        return max(1, math.isqrt(budget) // (pooling * patch)) * pooling * patch

    def image_layouts(self, inputs: Any) -> list[ImageLayout]:
        """rows x columns of pooled patch blocks, from the largest patch coordinates of each image."""
        pool = int(self.processor.image_processor.pooling_kernel_size)
        layouts = []
        for positions in inputs["image_position_ids"]:
            cols = (int(positions[..., 0].max()) + 1) // pool
            rows = (int(positions[..., 1].max()) + 1) // pool
            layouts.append(ImageLayout([(rows, cols)], torch.ones(rows * cols, dtype=torch.bool)))
        return layouts
