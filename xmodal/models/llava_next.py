"""LLaVA-NeXT (LLaVA 1.6: Mistral 7B, Vicuna 7B/13B, 34B): CLIP tower, anyres tiles with newline tokens.

Each image is read as a base view (patches x patches) followed by its anyres tiles stitched into
one grid, unpadded to the image's aspect, with a learned newline token after every row of that
grid. All of them sit in the ``<image>`` token mask; the newlines are marked in the layout and
left out of pooling.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from xmodal.models.base import ImageLayout, ModelAdapter


class LlavaNextAdapter(ModelAdapter):
    family: ClassVar[str] = "llava_next"
    decoder_layers_path: ClassVar[str] = "model.language_model.layers"
    ragged_images: ClassVar[bool] = True

    @classmethod
    def auto_model_class(cls) -> Any:
        from transformers import LlavaNextForConditionalGeneration

        return LlavaNextForConditionalGeneration

    def synthesis_side(self) -> int:
        """The tile side: one tile, and a base image that needs no resize (padding is a constant)."""
        image_processor = self.processor.image_processor
        size = getattr(image_processor, "crop_size", None) or image_processor.size
        return int(size.height or size.shortest_edge)

    def plain_prompt(self, text: str, with_image: bool) -> str:
        # llava-v1.6-mistral's format, for checkpoints that ship no chat template.
        image = f"{self.processor.image_token}\n" if with_image else ""
        return f"[INST] {image}{text} [/INST]"

    def image_layouts(self, inputs: Any) -> list[ImageLayout]:
        """Base grid, then the unpadded tile grid (rows x columns, one newline token after each row)."""
        from transformers.image_processing_utils import select_best_resolution

        processor = self.processor
        height, width = inputs["pixel_values"].shape[-2:]
        patches_h, patches_w = height // processor.patch_size, width // processor.patch_size
        layouts = []
        for orig_h, orig_w in inputs["image_sizes"].tolist():
            best_h, best_w = select_best_resolution([orig_h, orig_w], processor.image_processor.image_grid_pinpoints)
            # the processor's own count: (rows x columns of the unpadded grid, rows = its newline tokens)
            unpadded, rows = processor._get_unpadded_features(orig_h, orig_w, patches_h, patches_w, best_h // height, best_w // width)
            cols = unpadded // rows
            layouts.append(self._layout(patches_h, patches_w, rows, cols))
        return layouts

    @staticmethod
    def _layout(patches_h: int, patches_w: int, rows: int, cols: int) -> ImageLayout:
        content = torch.ones(patches_h * patches_w + rows * (cols + 1), dtype=torch.bool)
        content[patches_h * patches_w + cols :: cols + 1] = False  # the newline after each tile row
        return ImageLayout([(patches_h, patches_w), (rows, cols)], content)
