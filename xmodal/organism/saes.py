"""SAEs on the organism's residual stream: gather activations, train with sae-lens, evaluate.

``python -m xmodal.organism.train_saes`` trains one TopK SAE per layer (5, 9, 12, 15:
the layers of Gemma Scope 2's 270M release) on a mix of image tokens and caption
tokens, the positions xmodal's experiments read. Caption tokens come from both
places a concept's text appears: the model's caption after an image, and a user
turn holding the caption alone. Chat-template and BOS tokens are left out: their
residuals are outliers that would take features away from concepts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from xmodal.activations.capture import run_to_layers
from xmodal.errors import SAEError
from xmodal.models.base import ModelAdapter
from xmodal.organism import world
from xmodal.organism.model import DEFAULT_VARIANT, encode_captioned, shipped_weights_dir
from xmodal.saes.loading import FeatureSpace
from xmodal.saes.quality import sae_quality as quality_by_modality

log = logging.getLogger(__name__)

SAE_LAYERS = (5, 9, 12, 15)
IMAGE, TEXT = "image", "text"


class SAETraining(StrEnum):
    """What a shipped organism SAE was trained on (sae.training)."""

    joint = "joint"  # image tokens and caption tokens (python -m xmodal.organism.train_saes): weights/<variant>/saes/
    text_only = "text_only"  # caption tokens only, as Gemma Scope trained on text (experiments/sae_eval/README.md): saes_text_only/


SAE_FOLDERS = {SAETraining.joint: "saes", SAETraining.text_only: "saes_text_only"}


def shipped_widths(variant: str = DEFAULT_VARIANT, training: str = SAETraining.joint) -> list[int]:
    """The SAE widths shipped for a variant, one folder each (weights/<variant>/saes/width_<W>/)."""
    root = shipped_weights_dir(variant) / SAE_FOLDERS[SAETraining(training)]
    return sorted(int(d.name.removeprefix("width_")) for d in root.glob("width_*") if d.is_dir())


def shipped_sae_dir(layer: int, variant: str = DEFAULT_VARIANT, width: int | None = None, training: str = SAETraining.joint) -> Path:
    """The folder of a shipped SAE; `width` None: the narrowest shipped for the variant."""
    if width is None:
        width = shipped_widths(variant, training)[0]
    return shipped_weights_dir(variant) / SAE_FOLDERS[SAETraining(training)] / f"width_{width}" / f"layer_{layer}"


def organism_sae(
    name: str,
    layer: int,
    device: str = "auto",
    dtype: str = "float32",
    variant: str = DEFAULT_VARIANT,
    width: int | None = None,
    training: str = SAETraining.joint,
) -> FeatureSpace:
    """The shipped SAE of an organism variant for `layer` (one of 5, 9, 12, 15) at `width` (None: the narrowest),
    trained on image and caption tokens (`training` joint) or on caption tokens only (text_only)."""
    from xmodal.saes.loading import local_sae

    training = SAETraining(str(getattr(training, "value", training)))
    if layer not in SAE_LAYERS:
        raise SAEError(f"sae={name} has SAEs at layers {', '.join(map(str, SAE_LAYERS))}, not layer={layer}; pick one of those layers or use sae=none")
    widths = shipped_widths(str(variant), training)
    if not widths:
        if training == SAETraining.text_only:
            raise SAEError(
                f"no text-only SAEs are shipped for the {variant} organism (only for {DEFAULT_VARIANT}); use model=organism, or "
                "train them with python -m xmodal.sae_train 'training.modalities=[text]' and load them with sae=local"
            )
        raise SAEError(f"no SAEs are shipped for the {variant} organism; train them (python -m xmodal.organism.train_saes) or use sae=none")
    chosen = widths[0] if width is None else int(width)
    if chosen not in widths:
        raise SAEError(f"sae.width={width} is not shipped for the {variant} organism ({training}); the widths are {', '.join(map(str, widths))}")
    return local_sae(name, str(shipped_sae_dir(layer, str(variant), chosen, training)), layer, device=device, dtype=dtype)


@dataclass
class TokenActivations:
    """resid_post rows per layer, with the kind of token each row came from."""

    by_layer: dict[int, torch.Tensor]  # layer -> (tokens, d_model)
    kind: np.ndarray  # "image" or "text", one per row


@torch.inference_mode()
def gather_activations(adapter: ModelAdapter, layers: Sequence[int], seed: int, n_images: int, batch_size: int = 16) -> TokenActivations:
    """Image tokens and caption tokens of `n_images` fresh captioned images."""
    from tqdm.auto import tqdm

    tokenizer = adapter.tokenizer
    end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    chunks: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    kinds: list[np.ndarray] = []
    pairs = list(world.captioned_images(seed, n_images))
    for start in tqdm(range(0, n_images, batch_size), desc=f"activations (seed {seed})", unit="batch"):
        batch = pairs[start : start + batch_size]
        captions = [scene.caption for _, scene in batch]
        # The caption as the model's answer to the image ...
        with_image, caption_start = encode_captioned(adapter, batch)
        caption_mask = torch.zeros_like(with_image["input_ids"], dtype=torch.bool)
        caption_mask[:, caption_start:] = True
        caption_mask &= with_image["attention_mask"].bool() & (with_image["input_ids"] != end_of_turn)
        image_mask = adapter.image_token_mask(with_image["input_ids"])
        # ... and as a user turn on its own.
        prompts = [adapter.text_prompt("{concept}", c, use_chat_template=True) for c in captions]
        width = max(len(p.input_ids) for p in prompts)
        text_ids = torch.full((len(prompts), width), tokenizer.pad_token_id)
        text_mask = torch.zeros((len(prompts), width), dtype=torch.bool)
        text_attention = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            text_ids[row, : len(prompt.input_ids)] = torch.tensor(prompt.input_ids)
            text_attention[row, : len(prompt.input_ids)] = 1
            text_mask[row, prompt.concept_positions] = True

        inputs = {k: v.to(adapter.device) for k, v in with_image.items()}
        image_run = run_to_layers(adapter.model, adapter.decoder_layers(), inputs, layers)
        text_inputs = {"input_ids": text_ids.to(adapter.device), "attention_mask": text_attention.to(adapter.device)}
        text_run = run_to_layers(adapter.model, adapter.decoder_layers(), text_inputs, layers)
        for layer in layers:
            chunks[layer] += [
                image_run[layer][image_mask].float().cpu(),
                image_run[layer][caption_mask].float().cpu(),
                text_run[layer][text_mask].float().cpu(),
            ]
        kinds += [np.full(int(image_mask.sum()), IMAGE), np.full(int(caption_mask.sum() + text_mask.sum()), TEXT)]
    return TokenActivations({layer: torch.cat(rows) for layer, rows in chunks.items()}, np.concatenate(kinds))


def sae_quality(sae: Any, activations: TokenActivations, layer: int) -> list[dict[str, Any]]:
    """Fraction of variance explained and L0 per token kind, and the dead fraction over all tokens."""
    masks = {kind: torch.as_tensor(activations.kind == kind) for kind in (IMAGE, TEXT)}
    return [{"layer": layer} | row for row in quality_by_modality(sae, activations.by_layer[layer], masks)]
