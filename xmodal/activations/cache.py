"""On-disk cache of extracted activations, one safetensors file per (model, layer, positions, dataset).

The key hashes everything that determines the numbers: the model's identity (hub id,
revision and commit, or the tiny config hash and seed; dtype), the layer, the prompt
templates, and the dataset's content hash (concept texts and image bytes). Pooling is
not part of the key because the cache holds per-token values and pooling happens
afterwards. Files are written to a temporary name and renamed, so a killed job never
leaves a half-written entry that a later job would trust.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Sequence

from safetensors import safe_open
from safetensors.torch import load_file, save_file

from xmodal.activations.extract import LayerActivations, extract_activations
from xmodal.config import PositionsConfig
from xmodal.data.concepts import ConceptDataset
from xmodal.models.base import ModelAdapter

log = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when the stored layout or extraction semantics change


def cache_key(
    adapter: ModelAdapter, dataset_hash: str, layer: int, positions: PositionsConfig,
    modalities: Sequence[str] = ("text", "image"),
) -> str:
    parts = {
        "format": CACHE_FORMAT,
        "model": adapter.identity,
        "layer": layer,
        "text_prompt": positions.text_prompt,
        "image_prompt": positions.image_prompt,
        "use_chat_template": positions.use_chat_template,
        "dataset": dataset_hash,  # ConceptDataset.content_hash(): texts and image bytes
    }
    if tuple(modalities) != ("text", "image"):
        parts["modalities"] = sorted(modalities)
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


class ActivationCache:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()
        self.hits = 0
        self.misses = 0

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def load(self, key: str) -> LayerActivations | None:
        path = self.path(key)
        if not path.exists():
            return None
        tensors = load_file(path)
        with safe_open(path, framework="pt") as f:
            meta = json.loads(f.metadata()["xmodal"])
        return LayerActivations(
            layer=meta["layer"],
            concepts=meta["concepts"],
            text_tokens=tensors["text_tokens"],
            text_offsets=tensors["text_offsets"],
            image_concepts=meta["image_concepts"],
            image_sources=meta["image_sources"],
            image_tokens=tensors["image_tokens"],
            image_eoi=tensors["image_eoi"],
            meta=meta,
        )

    def save(self, key: str, acts: LayerActivations) -> Path:
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "layer": acts.layer,
            "concepts": acts.concepts,
            "image_concepts": acts.image_concepts,
            "image_sources": acts.image_sources,
        }
        tensors = {
            "text_tokens": acts.text_tokens.contiguous(),
            "text_offsets": acts.text_offsets.contiguous(),
            "image_tokens": acts.image_tokens.contiguous(),
            "image_eoi": acts.image_eoi.contiguous(),
        }
        fd, tmp = tempfile.mkstemp(prefix=f".{key}-", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata={"xmodal": json.dumps(meta)})
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path


def get_activations(
    adapter: ModelAdapter,
    dataset: ConceptDataset,
    layers: Sequence[int],
    positions: PositionsConfig,
    cache: ActivationCache | None,
    progress: bool = True,
    modalities: Sequence[str] = ("text", "image"),
    also_cache: Sequence[int] = (),
) -> dict[int, LayerActivations]:
    """Cached activations for `layers`; the missing ones are extracted together in one pass.

    When something must be extracted, the layers of `also_cache` that the cache lacks ride
    along in the same pass and are cached, not returned (a later job at one of them hits).
    """
    for layer in layers:
        adapter.check_layer(layer)
    result: dict[int, LayerActivations] = {}
    dataset_hash = dataset.content_hash()  # hashes every image's bytes: once per call, not per layer
    keys = {layer: cache_key(adapter, dataset_hash, layer, positions, modalities) for layer in layers}
    if cache is not None:
        for layer in layers:
            hit = cache.load(keys[layer])
            if hit is not None:
                cache.hits += 1
                result[layer] = hit
                log.info("Activation cache hit for layer %d (%s)", layer, cache.path(keys[layer]))
    missing = [layer for layer in layers if layer not in result]
    if missing:
        riders = []
        if cache is not None:
            extra = sorted({*also_cache} - {*layers})
            keys |= {layer: cache_key(adapter, dataset_hash, layer, positions, modalities) for layer in extra}
            riders = [layer for layer in extra if not cache.path(keys[layer]).exists()]
        fresh = extract_activations(adapter, dataset, missing + riders, positions, progress=progress, modalities=modalities)
        for layer in missing + riders:
            if cache is not None:
                cache.misses += layer in missing
                cache.save(keys[layer], fresh[layer])
            if layer in missing:
                result[layer] = fresh[layer]
    return result
