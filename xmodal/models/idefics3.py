"""Idefics3 (HuggingFaceM4/Idefics3-8B-Llama3) and SmolVLM / SmolVLM2: SigLIP tower, pixel shuffle, Llama decoder.

Image splitting: an image is resized, cut into up to 4 x 4 tiles of 364 px (512 on SmolVLM),
each tile read as ``image_seq_len`` ``<image>`` tokens behind ``<fake_token_around_image><row_i_col_j>``,
then the whole image downscaled (``<global-img>``). Separator tokens sit outside the image-token
mask; the layout lists one square grid per tile, in raster order, the global image last.
"""

from __future__ import annotations

from typing import Any, ClassVar

from xmodal.models.base import ImageLayout, ModelAdapter


class Idefics3Adapter(ModelAdapter):
    family: ClassVar[str] = "idefics3"
    # Idefics3ForConditionalGeneration.model (Idefics3Model).text_model (LlamaModel).layers
    decoder_layers_path: ClassVar[str] = "model.text_model.layers"
    final_norm_path: ClassVar[str] = "model.text_model.norm"
    ragged_images: ClassVar[bool] = True

    @classmethod
    def auto_model_class(cls) -> Any:
        from transformers import Idefics3ForConditionalGeneration

        return Idefics3ForConditionalGeneration

    def plain_prompt(self, text: str, with_image: bool) -> str:
        image = self.processor.image_token if with_image else ""
        return f"User:{image}{text}<end_of_utterance>\nAssistant:"

    def image_layouts(self, inputs: Any) -> list[ImageLayout]:
        return self.square_tile_layouts(inputs, int(self.processor.image_seq_len))
