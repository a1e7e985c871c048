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

    # Pixel synthesis shows the global view alone: split, an image is first upscaled, which resamples.
    synthesis_processor_kwargs: ClassVar[dict[str, Any]] = {"do_image_splitting": False, "do_resize": False}
    # The model drops an image whose normalised pixels are all 0 as batch padding, and with its mean
    # and std of 0.5 an exact mid-grey is such an image: the neutral image is the processor's 128 grey.
    synthesis_grey: ClassVar[float] = 128 / 255

    def synthesis_side(self) -> int:
        return int(self.processor.image_processor.max_image_size["longest_edge"])

    def plain_prompt(self, text: str, with_image: bool) -> str:
        image = self.processor.image_token if with_image else ""
        return f"User:{image}{text}<end_of_utterance>\nAssistant:"

    def image_layouts(self, inputs: Any) -> list[ImageLayout]:
        return self.square_tile_layouts(inputs, int(self.processor.image_seq_len))
