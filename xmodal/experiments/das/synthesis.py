"""Direct Ascent Synthesis of an image whose layer-L representation matches a concept vector.

Seed 004, sections 2.2-2.3 and Appendix B:
- image = grey + 0.5 * tanh(sum over resolutions r of upsample(component_r)), so every
  pixel lies in (0, 1) whatever the components hold;
- each step shows the model `batch_size` augmented copies (random shift via upscale and
  crop, plus Gaussian noise), independently per copy;
- the image representation is a weighted mean of its image-token activations minus
  those of a neutral grey image, with weights softmax((cos(patch, concept) + log
  Gaussian centre prior) / temperature); the prior's width grows linearly over the run;
- loss = -cos(representation, concept vector), SGD with momentum and gradient clipping.

Several concepts are optimised together in one forward pass; their losses are summed
and their gradients clipped separately, so each concept's image is what it would be
if it were synthesised alone.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm.auto import trange

from xmodal.activations.capture import run_to_layers
from xmodal.errors import ConfigError
from xmodal.models.base import ModelAdapter

GREY = 0.5


@dataclass
class DASSettings:
    steps: int = 600
    batch_size: int = 8  # augmented copies of each image per step
    lr: float = 0.04
    momentum: float = 0.9
    max_grad_norm: float = 1.0
    temperature: float = 0.1
    sigma_start: float = 0.2  # centre prior width at the first step, in image sides
    sigma_end: float = 1.0  # ... and at the last
    resolutions: Sequence[int] | None = None  # component sides; None: default_resolutions(side)
    shift: int | None = None  # largest shift in pixels; None: side // 16
    noise_std: float = 0.1
    aggregation: str = "weighted"  # weighted (section 2.2) | mean (Appendix G ablation)
    prior_placement: str = "inside"  # the log prior inside the temperature's division, or outside it
    upsample: str = "bicubic"
    prompt: str = ""  # text after the image in the user turn

    def __post_init__(self) -> None:
        if self.aggregation not in ("weighted", "mean"):
            raise ConfigError(f"experiment.aggregation={self.aggregation!r}; use weighted or mean")
        if self.prior_placement not in ("inside", "outside"):
            raise ConfigError(f"experiment.prior_placement={self.prior_placement!r}; use inside or outside")
        if self.steps < 1 or self.batch_size < 1:
            raise ConfigError(f"experiment.steps={self.steps} and experiment.batch_size={self.batch_size} must be at least 1")


def default_resolutions(side: int) -> list[int]:
    """1, 2, 3, 4, 6, 8, 12, 16, ... up to `side`: roughly two components per octave."""
    sides, r = set(), 1
    while r <= side:
        sides.update({r, min(side, int(round(r * 1.5)))})
        r *= 2
    return sorted(sides | {side})


class MultiResolutionImage(nn.Module):
    """`n_images` images as sums of components at several resolutions (all start at grey)."""

    def __init__(self, n_images: int, side: int, resolutions: Sequence[int], upsample: str = "bicubic") -> None:
        super().__init__()
        if not resolutions or min(resolutions) < 1 or max(resolutions) > side:
            raise ConfigError(f"experiment.resolutions={list(resolutions)} must lie in 1..{side} (the image side)")
        self.side = side
        self.upsample = upsample
        self.components = nn.ParameterList([nn.Parameter(torch.zeros(n_images, 3, r, r)) for r in resolutions])

    def forward(self) -> torch.Tensor:
        total = sum(
            F.interpolate(c, size=(self.side, self.side), mode=self.upsample, align_corners=False) if c.shape[-1] != self.side else c for c in self.components
        )
        return GREY + 0.5 * torch.tanh(total)  # in (0, 1) for any component values

    def clip_grad_norm_per_image(self, max_norm: float) -> torch.Tensor:
        """Clip each image's gradient (over all its components) to `max_norm`; returns the norms."""
        grads = [c.grad for c in self.components]
        norms = torch.sqrt(sum((g.flatten(1) ** 2).sum(dim=1) for g in grads))
        factor = (max_norm / (norms + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(factor.view(-1, 1, 1, 1))
        return norms


def augment(images: torch.Tensor, copies: int, shift: int, noise_std: float, generator: torch.Generator) -> torch.Tensor:
    """(n, 3, S, S) -> (n * copies, 3, S, S): random shift in [-shift, shift] pixels, then noise."""
    x = images.repeat_interleave(copies, dim=0)
    n, _, side, _ = x.shape
    if shift > 0:
        padded = F.interpolate(x, size=(side + 2 * shift, side + 2 * shift), mode="bilinear", align_corners=False)
        offsets = torch.randint(0, 2 * shift + 1, (n, 2), generator=generator).tolist()
        x = torch.stack([padded[i, :, dy : dy + side, dx : dx + side] for i, (dy, dx) in enumerate(offsets)])
    if noise_std > 0:  # drawn on the CPU generator: the same seed gives the same noise on any device
        x = x + noise_std * torch.randn(x.shape, generator=generator).to(x.device)
    return x


def patch_coordinates(n_tokens: int) -> torch.Tensor:
    """(n_tokens, 2) centres of the image tokens on their square grid, in image sides."""
    grid = math.isqrt(n_tokens)
    if grid * grid != n_tokens:
        raise ConfigError(f"{n_tokens} image tokens do not form a square grid; the centre prior needs one")
    return grid_centres([(grid, grid)])


def grid_centres(grids: Sequence[tuple[int, int]]) -> torch.Tensor:
    """(tokens, 2) centres of the content tokens of each (rows, columns) grid in token order, in image
    sides. Each grid spans the whole image: a base view and its tiles, or a tiled view and its thumbnail."""
    centres = []
    for rows, cols in grids:
        y, x = torch.meshgrid((torch.arange(rows) + 0.5) / rows, (torch.arange(cols) + 0.5) / cols, indexing="ij")
        centres.append(torch.stack([y.flatten(), x.flatten()], dim=-1))
    return torch.cat(centres).float()


def aggregate(
    centred: torch.Tensor,
    concept: torch.Tensor,
    temperature: float,
    sigma: float,
    aggregation: str = "weighted",
    prior_placement: str = "inside",
    centres: torch.Tensor | None = None,
) -> torch.Tensor:
    """(batch, tokens, d) centred patch activations -> (batch, d) image representations.

    `concept` is (batch, d): each row's target, which the semantic weights compare against.
    `prior_placement` "inside": softmax((cos + log prior) / T); "outside": softmax(cos / T + log prior).
    `centres`: (tokens, 2) where each token lies in the image (default: one square grid).
    """
    if aggregation == "mean":
        return centred.mean(dim=1)
    semantic = F.cosine_similarity(centred, concept.unsqueeze(1), dim=-1)  # (batch, tokens)
    coords = (centres if centres is not None else patch_coordinates(centred.shape[1])).to(centred.device)
    log_prior = -((coords - 0.5) ** 2).sum(dim=-1) / (2 * sigma**2)
    logits = (semantic + log_prior) / temperature if prior_placement == "inside" else semantic / temperature + log_prior
    weights = torch.softmax(logits, dim=1)
    return (weights.unsqueeze(-1) * centred).sum(dim=1)


class ImageReader:
    """Image-token resid_post at one layer for pixel tensors, differentiably, stopping at that layer.

    Where the family allows it (`reuses_text_prefix`), the prompt's text before the image is run
    once and its keys and values reused, and the prompt after the image is never run: image
    tokens cannot see it in a causal decoder. Same activations as the whole prompt, up to float
    rounding, for a fraction of the work (the organism's 28-token prompt becomes its 16 image tokens).
    """

    def __init__(self, adapter: ModelAdapter, layer: int, prompt: str = "", reuse_prefix: bool = True) -> None:
        adapter.check_layer(layer)
        self.adapter, self.layer, self.prompt = adapter, layer, prompt
        self.reuse_prefix = reuse_prefix and adapter.reuses_text_prefix
        self.side = adapter.synthesis_side()
        self.to_pixel_values = adapter.synthesis_pixels(prompt)
        self._templates: dict[int, Any] = {}
        self.dtype = next(adapter.model.parameters()).dtype
        self._prefix: tuple[Any, int, int] | None = None  # (prefix keys and values, image start, image end)
        # Separator and newline tokens carry no patch: left out, as from every pooling.
        layout = adapter.image_layouts(self._template(1))[0]
        self.content = layout.content.to(adapter.device)
        self.centres = grid_centres(layout.grids)

    def _template(self, n: int) -> Any:
        """Processor outputs for n grey images: the token ids stay, the pixels get replaced."""
        if n not in self._templates:
            grey = Image.new("RGB", (self.side, self.side), (128, 128, 128))
            inputs = self.adapter.image_inputs([grey] * n, self.prompt, True, **self.adapter.synthesis_processor_kwargs)
            self._templates[n] = inputs.to(self.adapter.device)
        return self._templates[n]

    def _prefix_cache(self) -> tuple[Any, int, int]:
        """The keys and values of the text before the image (computed once), and the image's span."""
        if self._prefix is None:
            template = self._template(1)
            image_positions = self.adapter.image_token_mask(template["input_ids"])[0].nonzero().squeeze(-1)
            start, end = int(image_positions[0]), int(image_positions[-1]) + 1
            language_model = self.adapter.model.get_submodule(self.adapter.decoder_layers_path.rsplit(".", 1)[0])
            with torch.no_grad():
                cache = language_model(input_ids=template["input_ids"][:, :start], use_cache=True).cache
            self._prefix = (cache, start, end)
        return self._prefix

    def _inputs(self, n: int) -> dict[str, Any]:
        if not self.reuse_prefix:
            return dict(self._template(n))
        from transformers import DynamicCache

        prefix, start, end = self._prefix_cache()
        cache = DynamicCache(config=self.adapter.text_config)  # a fresh one each pass: a forward appends to it
        for index, layer in enumerate(prefix.layers):
            cache.update(layer.keys.expand(n, -1, -1, -1), layer.values.expand(n, -1, -1, -1), index)
        return self.adapter.image_span_inputs(self._template(1), start, end, cache, n)

    def patches(self, unit_images: torch.Tensor, grad: bool = True) -> torch.Tensor:
        """(n, 3, S, S) in [0, 1] -> (n, image tokens, d_model) float32."""
        n = unit_images.shape[0]
        inputs = self._inputs(n)
        inputs["pixel_values"] = self.to_pixel_values(unit_images.to(self.adapter.device)).to(self.dtype)
        hidden = run_to_layers(self.adapter.model, self.adapter.decoder_layers(), inputs, [self.layer], grad=grad)[self.layer]
        mask = self.adapter.image_token_mask(inputs["input_ids"]).to(hidden.device)  # a layer may sit on another GPU
        return hidden[mask].view(n, -1, hidden.shape[-1]).float().to(self.adapter.device)[:, self.content]

    def grey_mean(self) -> torch.Tensor:
        """(d_model,): the mean patch activation of a neutral grey image (the image baseline)."""
        grey = torch.full((1, 3, self.side, self.side), self.adapter.synthesis_grey)
        return self.patches(grey, grad=False)[0].mean(dim=0)


@dataclass
class Synthesis:
    images: torch.Tensor  # (n_concepts, 3, S, S) in [0, 1], without augmentation
    trajectory: pd.DataFrame  # step, concept_index, cosine (mean over the augmented copies), sigma
    grey_mean: torch.Tensor
    seconds_per_step: float


def synthesise(reader: ImageReader, concept_vectors: torch.Tensor, settings: DASSettings, seed: int, progress: bool = True) -> Synthesis:
    """Optimise one image per concept vector (rows of `concept_vectors`) at the reader's layer."""
    n = concept_vectors.shape[0]
    side = reader.side
    resolutions = list(settings.resolutions or default_resolutions(side))
    shift = settings.shift if settings.shift is not None else side // 16
    image = MultiResolutionImage(n, side, resolutions, settings.upsample).to(reader.adapter.device)
    optimiser = torch.optim.SGD(image.parameters(), lr=settings.lr, momentum=settings.momentum)
    generator = torch.Generator().manual_seed(seed)
    grey_mean = reader.grey_mean()
    targets = concept_vectors.float().to(grey_mean.device).repeat_interleave(settings.batch_size, dim=0)
    rows = []
    start = time.perf_counter()
    for step in trange(settings.steps, desc=f"DAS layer {reader.layer}", disable=not progress, leave=False):
        sigma = settings.sigma_start + (settings.sigma_end - settings.sigma_start) * step / max(1, settings.steps - 1)
        views = augment(image(), settings.batch_size, shift, settings.noise_std, generator)
        centred = reader.patches(views) - grey_mean
        representation = aggregate(centred, targets, settings.temperature, sigma, settings.aggregation, settings.prior_placement, reader.centres)
        cosine = F.cosine_similarity(representation, targets, dim=-1).view(n, settings.batch_size).mean(dim=1)
        loss = -cosine.sum()  # each concept's own loss; summing keeps their gradients separate
        optimiser.zero_grad(set_to_none=False)
        loss.backward()
        image.clip_grad_norm_per_image(settings.max_grad_norm)
        optimiser.step()
        rows += [{"step": step, "concept_index": i, "cosine": float(c), "sigma": sigma} for i, c in enumerate(cosine.detach())]
    seconds_per_step = (time.perf_counter() - start) / settings.steps
    with torch.no_grad():
        final = image().detach().cpu()
    return Synthesis(final, pd.DataFrame(rows), grey_mean, seconds_per_step)


@torch.no_grad()
def cosine_matrix(reader: ImageReader, images: torch.Tensor, concept_vectors: torch.Tensor, grey_mean: torch.Tensor, settings: DASSettings) -> np.ndarray:
    """(n_images, n_concepts): cos between each (unaugmented) image's representation and each concept.

    The weighted aggregation depends on the target, so each pair is aggregated for its own
    concept, with the prior at its final width.
    """
    centred = reader.patches(images, grad=False) - grey_mean
    out = np.zeros((images.shape[0], concept_vectors.shape[0]))
    for j, concept in enumerate(concept_vectors.float().to(centred.device)):
        target = concept.expand(images.shape[0], -1)
        representation = aggregate(centred, target, settings.temperature, settings.sigma_end, settings.aggregation, settings.prior_placement, reader.centres)
        out[:, j] = F.cosine_similarity(representation, target, dim=-1).cpu().numpy()
    return np.nan_to_num(out)  # a zero representation (the grey image itself) has cosine 0


@torch.no_grad()
def square_image_tokens(
    adapter: ModelAdapter, images: Sequence[Image.Image], prompt: str, use_chat_template: bool, layers: list[int]
) -> dict[int, torch.Tensor]:
    """Content image-token resid_post (n, tokens, d) per layer of square images of the synthesis side, in one pass."""
    inputs = adapter.image_inputs(images, prompt, use_chat_template, **adapter.synthesis_processor_kwargs).to(adapter.device)
    mask = adapter.image_token_mask(inputs["input_ids"])
    content = adapter.image_layouts(inputs)[0].content
    hidden = run_to_layers(adapter.model, adapter.decoder_layers(), inputs, layers)
    return {layer: hidden[layer][mask].view(len(images), -1, hidden[layer].shape[-1])[:, content].float().cpu() for layer in layers}


def to_pil(image: torch.Tensor) -> Image.Image:
    array = (image.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(array)
