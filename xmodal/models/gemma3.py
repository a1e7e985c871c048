"""Gemma 3 multimodal (4B, 12B, 27B and the tiny/organism builds): SigLIP tower, Gemma 3 decoder."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from xmodal.models.base import SITE_MODULES, HookSide, HookSite, ModelAdapter


class Gemma3Adapter(ModelAdapter):
    family: ClassVar[str] = "gemma3"
    # Gemma3ForConditionalGeneration.model (Gemma3Model).language_model (Gemma3TextModel).layers
    decoder_layers_path: ClassVar[str] = "model.language_model.layers"
    reuses_text_prefix: ClassVar[bool] = True  # causal text, bidirectional only within an image
    # Gemma Scope 2's hook points (sae-lens's hf_hook_name): mlp_out after the MLP's post-norm, attn_out before o_proj.
    site_modules: ClassVar[dict[HookSite, tuple[tuple[str, HookSide], ...]]] = SITE_MODULES | {
        HookSite.mlp_out: (("post_feedforward_layernorm", HookSide.output),),
    }

    def image_span_inputs(self, template: Any, start: int, end: int, prefix_cache: Any, n: int) -> dict[str, Any]:
        device = template["input_ids"].device
        return {
            "input_ids": template["input_ids"][:, start:end].expand(n, -1),
            # The image blocks of the bidirectional mask are read by position from the sequence's start.
            "token_type_ids": template["token_type_ids"][:, :end].expand(n, -1),
            "attention_mask": torch.ones(n, end, dtype=torch.long, device=device),
            "position_ids": torch.arange(start, end, device=device).expand(n, -1),
            "cache": prefix_cache,
        }

    def processor_image_mask(self, inputs: Any) -> torch.Tensor:
        # Gemma3Processor's image_token is the <start_of_image> placeholder; token_type_ids marks the soft tokens.
        return inputs["token_type_ids"] == 1

    @classmethod
    def auto_model_class(cls) -> Any:
        from transformers import Gemma3ForConditionalGeneration

        return Gemma3ForConditionalGeneration
