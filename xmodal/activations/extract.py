"""Per-token resid_post at a concept's text tokens and at its images' soft tokens.

Text: the concept inside the (chat-templated) prompt; we keep every concept token.
Image: every image soft token, plus the first token after the image (end-of-image).
Pooling happens later, on SAE codes (activations/codes.py), so one extraction
serves every pooling choice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from tqdm.auto import tqdm

from xmodal.activations.capture import run_to_layers
from xmodal.config import PositionsConfig
from xmodal.data.concepts import ConceptDataset
from xmodal.errors import ConfigError
from xmodal.models.base import ModelAdapter


@dataclass
class LayerActivations:
    """resid_post of one layer for a whole concept dataset."""

    layer: int
    concepts: list[str]  # one text prompt per concept, in this order
    text_tokens: torch.Tensor  # (total concept tokens, d_model)
    text_offsets: torch.Tensor  # (n_concepts + 1,): concept i owns rows offsets[i]:offsets[i+1]
    image_concepts: list[str]  # concept of each image row
    image_sources: list[str]
    image_tokens: torch.Tensor  # (n_images, image tokens per image, d_model)
    image_eoi: torch.Tensor  # (n_images, d_model): first position after the image
    meta: dict = field(default_factory=dict)

    def text_tokens_of(self, index: int) -> torch.Tensor:
        return self.text_tokens[self.text_offsets[index] : self.text_offsets[index + 1]]


def _batches(n: int, size: int) -> list[range]:
    return [range(i, min(i + size, n)) for i in range(0, n, size)]


def extract_activations(
    adapter: ModelAdapter,
    dataset: ConceptDataset,
    layers: Sequence[int],
    positions: PositionsConfig,
    progress: bool = True,
    modalities: Sequence[str] = ("text", "image"),
) -> dict[int, LayerActivations]:
    """Run the dataset through the model once per batch and keep resid_post of all `layers`.

    A dual encoder (CLIP, SigLIP) has no residual stream: its one layer is the shared embedding.
    """
    for layer in layers:
        adapter.check_layer(layer)
    if not adapter.has_decoder:
        return {layer: embedding_activations(adapter, dataset, positions, modalities, progress, layer) for layer in layers}
    model, decoder_layers, device = adapter.model, adapter.decoder_layers(), adapter.device
    pad_id = adapter.tokenizer.pad_token_id or 0

    # Text: right-padded batches; causal attention keeps real positions unaffected by padding.
    concepts = dataset.concepts if "text" in modalities else []
    prompts = [adapter.text_prompt(positions.text_prompt, c.text, positions.use_chat_template) for c in concepts]
    text_rows: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    batches = _batches(len(prompts), positions.batch_size)
    for batch in tqdm(batches, desc=f"{adapter.name}: text", disable=not progress, leave=False):
        width = max(len(prompts[i].input_ids) for i in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            ids = prompts[i].input_ids
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention_mask[row, : len(ids)] = 1
        inputs = {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}
        captured = run_to_layers(model, decoder_layers, inputs, layers)
        for layer in layers:
            for row, i in enumerate(batch):
                text_rows[layer].append(captured[layer][row, prompts[i].concept_positions].float().cpu())
    lengths = torch.tensor([len(p.concept_positions) for p in prompts])
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])

    # Images: every image gets the same prompt, so batches need no padding.
    image_rows: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    eoi_rows: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    images = dataset.images if "image" in modalities else []
    if images and not adapter.supports_images:
        adapter.image_inputs([], "", False)  # raises the family's clear error
    batches = _batches(len(images), positions.batch_size)
    for batch in tqdm(batches, desc=f"{adapter.name}: images", disable=not progress, leave=False):
        inputs = adapter.image_inputs(
            [images[i].load() for i in batch], positions.image_prompt, positions.use_chat_template
        )
        mask = adapter.image_token_mask(inputs["input_ids"])
        captured = run_to_layers(model, decoder_layers, inputs.to(device), layers)
        for row in range(len(batch)):
            image_positions = mask[row].nonzero().squeeze(-1)
            eoi_position = int(image_positions[-1]) + 1
            for layer in layers:
                image_rows[layer].append(captured[layer][row, image_positions].float().cpu())
                eoi_rows[layer].append(captured[layer][row, eoi_position].float().cpu())

    d_model = adapter.hidden_size
    return {
        layer: LayerActivations(
            layer=layer,
            concepts=[c.name for c in concepts],
            text_tokens=torch.cat(text_rows[layer]) if text_rows[layer] else torch.empty(0, d_model),
            text_offsets=offsets,
            image_concepts=[img.concept for img in images],
            image_sources=[img.source for img in images],
            image_tokens=torch.stack(image_rows[layer]) if images else torch.empty(0, 0, d_model),
            image_eoi=torch.stack(eoi_rows[layer]) if images else torch.empty(0, d_model),
        )
        for layer in layers
    }


def embedding_activations(
    adapter: ModelAdapter, dataset: ConceptDataset, positions: PositionsConfig, modalities: Sequence[str], progress: bool = True,
    layer: int = 0,
) -> LayerActivations:
    """A dual encoder's embeddings (layer 0) or pooled tower states (layer l) in the layout of decoder
    activations: one token per text and per image.

    The text is `positions.text_prompt` with the concept in it (no chat template: CLIP has none).
    """
    text_width, image_width = adapter.width(layer, "text"), adapter.width(layer, "image")
    if text_width != image_width and set(modalities) >= {"text", "image"}:
        raise ConfigError(f"layer={layer} of {adapter.name!r}: its text tower is {text_width} wide and its vision tower "
                          f"{image_width}, so texts and images share no space there; use layer=0, the shared embedding")  # fmt: skip
    concepts = dataset.concepts if "text" in modalities else []
    texts = [positions.text_prompt.format(concept=c.text) for c in concepts]
    images = dataset.images if "image" in modalities else []
    text = [adapter.embed_texts([texts[i] for i in batch], layer) for batch in _batches(len(texts), positions.batch_size)]
    image = [
        adapter.embed_images([images[i].load() for i in batch], layer)
        for batch in tqdm(_batches(len(images), positions.batch_size), desc=f"{adapter.name}: images", disable=not progress, leave=False)
    ]
    image_tokens = torch.cat(image).unsqueeze(1) if image else torch.zeros(0, 1, image_width)
    return LayerActivations(
        layer=layer,
        concepts=[c.name for c in concepts],
        text_tokens=torch.cat(text) if text else torch.zeros(0, text_width),
        text_offsets=torch.arange(len(concepts) + 1),
        image_concepts=[img.concept for img in images],
        image_sources=[img.source for img in images],
        image_tokens=image_tokens,
        image_eoi=image_tokens[:, 0].clone(),  # its own storage: the cache writes both with safetensors
        meta={"model": adapter.name, "space": "shared embedding" if layer == 0 else f"tower hidden states after {layer} blocks"},
    )
