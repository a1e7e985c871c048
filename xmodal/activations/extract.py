"""Per-token resid_post at a concept's text tokens and at its images' soft tokens.

Text: the concept inside the (chat-templated) prompt; we keep every concept token.
Image: every image soft token, plus the first token after the image (end-of-image).
Pooling happens later, on SAE codes (activations/codes.py), so one extraction
serves every pooling choice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from xmodal.activations.batch_size import resolve_batch_size
from xmodal.activations.capture import run_to_layers, site_points
from xmodal.config import PositionsConfig
from xmodal.data.concepts import ConceptDataset
from xmodal.errors import ConfigError
from xmodal.models.base import ImageLayout, ModelAdapter, TextPrompt


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

    # The reads a study makes of image tokens, shared with the on-disk readout (readout.LayerReadout).
    @property
    def tokens_per_image(self) -> int:
        return int(self.image_tokens.shape[1])

    def image_token_mean(self) -> torch.Tensor:
        """(n_images, d_model): each image's mean token."""
        return self.image_tokens.float().mean(dim=1)

    def image_token_rows(self) -> torch.Tensor:
        """(every image token, d_model), image by image."""
        return self.image_tokens.reshape(-1, self.image_tokens.shape[-1]).float()


def _batches(n: int, size: int) -> list[range]:
    return [range(i, min(i + size, n)) for i in range(0, n, size)]


def text_batch_rows(adapter: ModelAdapter, prompts: Sequence[TextPrompt], layers: Sequence[int], site: str = "resid_post") -> dict[int, list[torch.Tensor]]:
    """One forward pass over `prompts` (right-padded: causal attention keeps real positions
    unaffected by padding); per layer, each prompt's rows at its concept positions (float32, CPU),
    read at `site` (resid_post, mlp_out, attn_out, mlp_in)."""
    width = max(len(p.input_ids) for p in prompts)
    input_ids = torch.full((len(prompts), width), adapter.tokenizer.pad_token_id or 0, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, : len(prompt.input_ids)] = torch.tensor(prompt.input_ids)
        attention_mask[row, : len(prompt.input_ids)] = 1
    inputs = {"input_ids": to_device(input_ids, adapter.device), "attention_mask": to_device(attention_mask, adapter.device)}
    captured = run_to_layers(adapter.model, site_points(adapter, site), inputs, layers)
    # One gather and one device-to-host copy per layer, not one per prompt.
    lengths = [len(p.concept_positions) for p in prompts]
    rows = torch.arange(len(prompts)).repeat_interleave(torch.tensor(lengths))
    positions = torch.tensor([i for p in prompts for i in p.concept_positions], dtype=torch.long)
    return {layer: list(captured[layer][rows, positions].float().cpu().split(lengths)) for layer in layers}


def image_batch_hidden(
    adapter: ModelAdapter, inputs: dict, layers: Sequence[int], site: str = "resid_post"
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """One forward pass over processor outputs for images that share a prompt; per layer, on the model's
    device, (images, image tokens, d_model) at the soft tokens and (images, d_model) right after the image,
    read at `site`."""
    mask = adapter.image_token_mask(inputs["input_ids"])
    counts = mask.sum(dim=1)
    if len(counts) and bool((counts != counts[0]).any()):
        raise ConfigError(
            f"model {adapter.name!r} gives these images different numbers of image tokens ({counts.tolist()}); "
            "this read takes fixed-count images only: resize the images to one size, or use a study that reads ragged images"
        )
    if len(counts) and int(counts[0]) == 0:
        raise ConfigError(
            f"model {adapter.name!r}: the processor put no image token (id {adapter.image_token_id}) into the prompt; "
            "use a processor and chat template that write the image placeholder"
        )
    device_inputs = {k: to_device(v, adapter.device) for k, v in inputs.items()}
    captured = run_to_layers(adapter.model, site_points(adapter, site), device_inputs, layers)
    n_images, n_tokens = mask.shape[0], int(mask[0].sum())
    eoi_positions = torch.tensor([int(row.nonzero()[-1]) + 1 for row in mask])
    rows = torch.arange(n_images)
    tokens = {layer: captured[layer][mask.to(captured[layer].device)].view(n_images, n_tokens, -1) for layer in layers}
    eoi = {layer: captured[layer][rows.to(captured[layer].device), eoi_positions.to(captured[layer].device)] for layer in layers}
    return tokens, eoi


def image_batch_ragged(
    adapter: ModelAdapter, inputs: dict, layers: Sequence[int], site: str = "resid_post"
) -> tuple[dict[int, list[torch.Tensor]], dict[int, torch.Tensor], list[ImageLayout]]:
    """One forward pass over a padded batch of images whose token counts may differ; per layer, on the
    model's device, each image's (content tokens, d_model) and (images, d_model) right after the image;
    and each image's layout (its grids, in the order of its content tokens).

    Each image's positions are its row of the processor's image-token mask (never a count), minus the
    tokens its layout marks as newline or separator (adapter.image_layouts)."""
    mask = adapter.image_token_mask(inputs["input_ids"])
    layouts = adapter.image_layouts(inputs)
    positions = []
    for row, layout in zip(mask, layouts):
        where = row.nonzero().squeeze(-1)
        if len(where) == 0:
            raise ConfigError(
                f"model {adapter.name!r}: the processor put no image token (id {adapter.image_token_id}) into the prompt; "
                "use a processor and chat template that write the image placeholder"
            )
        if len(where) != len(layout.content):
            raise ConfigError(f"model {adapter.name!r}: an image has {len(where)} image tokens but its layout {layout.grids} covers {len(layout.content)}")
        positions.append(where)
    device_inputs = {k: to_device(v, adapter.device) for k, v in inputs.items()}
    captured = run_to_layers(adapter.model, site_points(adapter, site), device_inputs, layers)
    tokens: dict[int, list[torch.Tensor]] = {}
    eoi: dict[int, torch.Tensor] = {}
    for layer in layers:
        hidden = captured[layer]
        tokens[layer] = [hidden[i, where[layout.content].to(hidden.device)] for i, (where, layout) in enumerate(zip(positions, layouts))]
        after = torch.tensor([int(where[-1]) + 1 for where in positions], device=hidden.device)
        eoi[layer] = hidden[torch.arange(len(positions), device=hidden.device), after]
    return tokens, eoi, layouts


def image_batch_rows(
    adapter: ModelAdapter, inputs: Any, layers: Sequence[int], site: str = "resid_post"
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """image_batch_hidden's rows in float32 on the CPU."""
    tokens, eoi = image_batch_hidden(adapter, inputs, layers, site)
    return {layer: t.float().cpu() for layer, t in tokens.items()}, {layer: e.float().cpu() for layer, e in eoi.items()}


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host-to-device copies overlap with compute when the host tensor is pinned."""
    return tensor.to(device, non_blocking=device.type == "cuda")


class ImageInputBatches(torch.utils.data.Dataset):
    """Processor outputs for batches of images (each a list of indices into `images`), so a
    DataLoader's workers decode and resize the next batches on the CPU while the model runs."""

    def __init__(self, adapter: ModelAdapter, images: Sequence[Any], batches: Sequence[Sequence[int]], prompt: str, use_chat_template: bool) -> None:
        self.adapter, self.images, self.batches = adapter, images, batches
        self.prompt, self.use_chat_template = prompt, use_chat_template

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        batch = [self.images[i].load() for i in self.batches[index]]
        return dict(self.adapter.image_inputs(batch, self.prompt, self.use_chat_template))


def image_input_loader(
    adapter: ModelAdapter, images: Sequence[Any], batches: Sequence[Sequence[int]], positions: PositionsConfig
) -> torch.utils.data.DataLoader:
    """Processor outputs of `batches` in order; `positions.num_workers` > 0 prepares them in worker processes."""
    if images and not adapter.supports_images:
        adapter.image_inputs([], "", False)  # raises the family's clear error
    adapter.processor  # load once here, so that forked workers inherit it
    return torch.utils.data.DataLoader(
        ImageInputBatches(adapter, images, batches, positions.image_prompt, positions.use_chat_template),
        batch_size=None,
        num_workers=positions.num_workers,
        pin_memory=adapter.device.type == "cuda",
    )


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
    batch_size = resolve_batch_size(adapter, positions.batch_size, layers, dataset, positions)

    concepts = dataset.concepts if "text" in modalities else []
    prompts = [adapter.text_prompt(positions.text_prompt, c.text, positions.use_chat_template, positions.max_concept_tokens) for c in concepts]
    text_rows: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    for batch in tqdm(_batches(len(prompts), batch_size), desc=f"{adapter.name}: text", disable=not progress, leave=False):
        for layer, rows in text_batch_rows(adapter, [prompts[i] for i in batch], layers).items():
            text_rows[layer] += rows
    lengths = torch.tensor([len(p.concept_positions) for p in prompts])
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])

    # Images: every image gets the same prompt, so batches need no padding.
    image_rows: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    eoi_rows: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    images = dataset.images if "image" in modalities else []
    loader = image_input_loader(adapter, images, _batches(len(images), batch_size), positions)
    for inputs in tqdm(loader, desc=f"{adapter.name}: images", disable=not progress, leave=False):
        tokens, eoi = image_batch_rows(adapter, inputs, layers)
        for layer in layers:
            image_rows[layer].append(tokens[layer])
            eoi_rows[layer].append(eoi[layer])

    d_model = adapter.hidden_size
    return {
        layer: LayerActivations(
            layer=layer,
            concepts=[c.name for c in concepts],
            text_tokens=torch.cat(text_rows[layer]) if text_rows[layer] else torch.empty(0, d_model),
            text_offsets=offsets,
            image_concepts=[img.concept for img in images],
            image_sources=[img.source for img in images],
            image_tokens=torch.cat(image_rows[layer]) if images else torch.empty(0, 0, d_model),
            image_eoi=torch.cat(eoi_rows[layer]) if images else torch.empty(0, d_model),
        )
        for layer in layers
    }


def embedding_activations(
    adapter: ModelAdapter,
    dataset: ConceptDataset,
    positions: PositionsConfig,
    modalities: Sequence[str],
    progress: bool = True,
    layer: int = 0,
) -> LayerActivations:
    """A dual encoder's embeddings (layer 0) or pooled tower states (layer l) in the layout of decoder
    activations: one token per text and per image.

    The text is `positions.text_prompt` with the concept in it (no chat template: CLIP has none).
    """
    text_width, image_width = adapter.width(layer, "text"), adapter.width(layer, "image")
    if text_width != image_width and set(modalities) >= {"text", "image"}:
        raise ConfigError(
            f"layer={layer} of {adapter.name!r}: its text tower is {text_width} wide and its vision tower "
            f"{image_width}, so texts and images share no space there; use layer=0, the shared embedding"
        )
    concepts = dataset.concepts if "text" in modalities else []
    texts = [positions.text_prompt.format(concept=c.text) for c in concepts]
    images = dataset.images if "image" in modalities else []
    batch_size = resolve_batch_size(adapter, positions.batch_size, [layer], dataset, positions)
    text = [adapter.embed_texts([texts[i] for i in batch], layer) for batch in _batches(len(texts), batch_size)]
    image = [
        adapter.embed_images([images[i].load() for i in batch], layer)
        for batch in tqdm(_batches(len(images), batch_size), desc=f"{adapter.name}: images", disable=not progress, leave=False)
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
