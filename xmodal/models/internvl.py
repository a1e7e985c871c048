"""InternVL 3 / 3.5 (the -hf checkpoints): InternViT tower, pixel-shuffle projector, Qwen2.5 decoder.

An image is cut into 1 to 12 tiles of 448 px by its aspect, plus a thumbnail of the whole image
when there is more than one tile; each tile gives ``image_seq_length`` ``<IMG_CONTEXT>`` tokens
(16 x 16 on the real models) between ``<img>`` and ``</img>``. The layout lists one square grid
per tile, tiles in raster order, the thumbnail last.
"""

from __future__ import annotations

from typing import Any, ClassVar

from xmodal.models.base import ImageLayout, ModelAdapter


class InternVLAdapter(ModelAdapter):
    family: ClassVar[str] = "internvl"
    decoder_layers_path: ClassVar[str] = "model.language_model.layers"
    ragged_images: ClassVar[bool] = True

    @classmethod
    def auto_model_class(cls) -> Any:
        from transformers import InternVLForConditionalGeneration

        return InternVLForConditionalGeneration

    def synthesis_side(self) -> int:
        """One tile's side: a square image of it is one tile, with no thumbnail."""
        return int(self.processor.image_processor.size.height)

    def plain_prompt(self, text: str, with_image: bool) -> str:
        image = f"{self.processor.image_token}\n" if with_image else ""
        return f"<|im_start|>user\n{image}{text}<|im_end|>\n<|im_start|>assistant\n"

    def image_layouts(self, inputs: Any) -> list[ImageLayout]:
        return self.square_tile_layouts(inputs, int(self.processor.image_seq_length))
