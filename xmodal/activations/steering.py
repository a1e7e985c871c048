"""Steer resid_post (or the SAE's site: mlp_out, attn_out) of one decoder layer along an SAE feature,
during a forward pass or generation.

Two modes:
- ``add``: resid += value * direction (the feature's decoder row), at the chosen positions;
- ``clamp``: set the feature's activation to ``value``, keeping everything the SAE does
  not explain: resid += (value - a(resid)) * direction, with a(resid) the feature's
  current activation from the SAE encoder.

Positions: ``image`` (image soft tokens of the prompt), ``text`` (every other prompt
position and every generated token) or ``both``. With a KV cache, the prompt goes
through in one pass and each generated token after it alone, so a pass as long as
the prompt is the prompt, and any other pass is generated text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ContextManager

import torch
from torch import nn

from xmodal.activations.capture import output_replaced
from xmodal.models.base import HookPoint

WHERE = ("image", "text", "both")
MODES = ("add", "clamp")


@dataclass
class Steering:
    direction: torch.Tensor  # (d_model,)
    value: float
    mode: str = "add"
    where: str = "both"
    feature_activation: Callable[[torch.Tensor], torch.Tensor] | None = None  # clamp: (..., d_model) -> (...)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"steering mode {self.mode!r}; use one of {MODES}")
        if self.where not in WHERE:
            raise ValueError(f"steering positions {self.where!r}; use one of {WHERE}")
        if self.mode == "clamp" and self.feature_activation is None:
            raise ValueError("clamp steering needs the feature's encoder (feature_activation)")


def steering_mask(where: str, image_mask: torch.Tensor, seq_len: int) -> torch.Tensor:
    """(batch, seq_len) positions to steer in a pass of `seq_len` tokens (the prompt, or one generated token)."""
    batch, prompt_len = image_mask.shape
    if seq_len == prompt_len:
        is_image = image_mask
    else:
        is_image = torch.zeros(batch, seq_len, dtype=torch.bool, device=image_mask.device)
    if where == "image":
        return is_image
    if where == "text":
        return ~is_image
    return torch.ones_like(is_image)


def steered(hidden: torch.Tensor, steering: Steering, mask: torch.Tensor) -> torch.Tensor:
    direction = steering.direction.to(hidden.device, hidden.dtype)
    if steering.mode == "add":
        delta = steering.value * direction.expand_as(hidden)
    else:
        current = steering.feature_activation(hidden).to(hidden.dtype)  # (batch, seq)
        delta = (steering.value - current)[..., None] * direction
    return hidden + mask[..., None].to(hidden.dtype) * delta


def steer(decoder_layer: nn.Module | HookPoint, steering: Steering, image_mask: torch.Tensor) -> ContextManager[None]:
    """Within the block, every forward pass through `decoder_layer` has its output steered; a HookPoint
    (``ModelAdapter.hook_point(layer, site)``) steers that site instead (mlp_out, attn_out)."""
    return output_replaced(decoder_layer, lambda hidden: steered(hidden, steering, steering_mask(steering.where, image_mask, hidden.shape[1])))
