"""The activation cache: every job's streaming readouts, one folder per (model, layer, inputs, reduction).

A folder's key hashes everything that determines its numbers: the model's identity (hub id,
revision and commit, or the content hash of local weights; dtype), the layer, the prompt
templates, the dataset's content hash (concept texts and image bytes, hashed once per job),
the feature space's identity (SAE weights, or raw residuals) and the reduction (poolings,
which tokens are kept). Folders are written with the store's protocol (shards.py): a killed
job resumes from its last finished shard, and an unfinished folder is never read as finished.
"""

from __future__ import annotations

import atexit
import fcntl
import json
import logging
import shutil
import tempfile
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator, Sequence

from xmodal.activations.batch_size import resolve_batch_size
from xmodal.activations.extract import embedding_activations
from xmodal.activations.readout import LayerReadout, ReadoutPlan, TokenKeep, read_layer, readout_key, stream_readouts
from xmodal.activations.shards import PROGRESS
from xmodal.config import PositionsConfig
from xmodal.data.concepts import ConceptDataset
from xmodal.models.base import ModelAdapter
from xmodal.saes.loading import no_sae

log = logging.getLogger(__name__)


class ActivationCache:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()
        self.hits = 0
        self.misses = 0

    def directory(self, key: str) -> Path:
        return self.root / key[:2] / key

    @contextmanager
    def locked(self, keys: Sequence[str]) -> Iterator[None]:
        """Hold an exclusive lock on each key's folder (in sorted order, so two jobs cannot deadlock)."""
        with ExitStack() as stack:
            for key in sorted(set(keys)):
                path = self.root / key[:2] / f"{key}.lock"
                path.parent.mkdir(parents=True, exist_ok=True)
                handle = stack.enter_context(open(path, "w"))
                fcntl.flock(handle, fcntl.LOCK_EX)
            yield

    def finished(self, key: str) -> bool:
        progress = self.directory(key) / PROGRESS
        return progress.exists() and json.loads(progress.read_text())["complete"]


_scratch: list[Path] = []


def scratch_cache() -> ActivationCache:
    """A cache in a temporary folder, removed at exit: a job without a cache still streams through disk."""
    if not _scratch:
        _scratch.append(Path(tempfile.mkdtemp(prefix="xmodal-readouts-")))
        atexit.register(shutil.rmtree, _scratch[0], True)
    return ActivationCache(_scratch[0])


def get_readouts(
    adapter: ModelAdapter,
    dataset: ConceptDataset,
    plans: Sequence[ReadoutPlan],
    positions: PositionsConfig,
    cache: ActivationCache | None,
    progress: bool = True,
    modalities: Sequence[str] = ("text", "image"),
    riders: Sequence[ReadoutPlan] = (),
) -> dict[int, LayerReadout]:
    """Each plan's readout, from the cache or from one streaming pass for all that are missing.

    When a pass runs, the `riders` that the cache lacks go along and are cached, not returned
    (a later job at one of their layers hits).
    """
    for plan in plans:
        adapter.check_layer(plan.layer)
    cache = cache or scratch_cache()
    dataset_hash = dataset.content_hash()
    keys = [readout_key(adapter, dataset_hash, plan, positions, modalities) for plan in plans]
    rider_keys = [readout_key(adapter, dataset_hash, plan, positions, modalities) for plan in riders]
    with cache.locked(keys + rider_keys):  # two jobs of a parallel sweep on the same inputs: one writes, the other then reads
        return _get_readouts(adapter, dataset, plans, keys, list(zip(riders, rider_keys)), positions, cache, progress, modalities)


def _get_readouts(
    adapter: ModelAdapter,
    dataset: ConceptDataset,
    plans: Sequence[ReadoutPlan],
    keys: list[str],
    riders: list[tuple[ReadoutPlan, str]],
    positions: PositionsConfig,
    cache: ActivationCache,
    progress: bool,
    modalities: Sequence[str],
) -> dict[int, LayerReadout]:
    missing = [(plan, key) for plan, key in zip(plans, keys) if not cache.finished(key)]
    cache.hits += len(plans) - len(missing)
    cache.misses += len(missing)
    for plan, key in zip(plans, keys):
        if cache.finished(key):
            log.info("Activation cache hit for layer %d (%s)", plan.layer, cache.directory(key))
    if missing:
        ride = [(r, k) for r, k in riders if not cache.finished(k) and k not in {key for _, key in missing}]
        todo = missing + ride
        layers = sorted({plan.layer for plan, _ in todo})
        batch_size = resolve_batch_size(adapter, positions.batch_size, layers, dataset, positions)
        for site in sorted({plan.site for plan, _ in todo}):  # one pass per site (one, unless riders read another)
            at_site = [(p, k) for p, k in todo if p.site == site]
            stream_readouts(adapter, dataset, [p for p, _ in at_site], [cache.directory(k) for _, k in at_site], positions, batch_size, modalities, progress)
    return {plan.layer: read_layer(cache.directory(key)) for plan, key in zip(plans, keys)}


def raw_plan(adapter: ModelAdapter, layer: int, site: str = "resid_post") -> ReadoutPlan:
    """Every token's residual (or `site`'s vector), dense (the logit lens, DAS and MDS's own SAE read them)."""
    space = no_sae(layer=layer, site=site)
    space.check_model(adapter.name, adapter.site_width(site), layer)
    return ReadoutPlan(layer, space, tokens=TokenKeep.dense)


def get_activations(
    adapter: ModelAdapter,
    dataset: ConceptDataset,
    layers: Sequence[int],
    positions: PositionsConfig,
    cache: ActivationCache | None,
    progress: bool = True,
    modalities: Sequence[str] = ("text", "image"),
    also_cache: Sequence[int] = (),
    site: str = "resid_post",
) -> dict:
    """Per-token resid_post (or `site`) of `layers`, read from disk shard by shard; the missing layers come from one pass.

    When something must be extracted, the layers of `also_cache` that the cache lacks ride
    along in the same pass. A dual encoder has one embedding per item: held in memory.
    """
    for layer in layers:
        adapter.check_layer(layer)
    if not adapter.has_decoder:
        return {layer: embedding_activations(adapter, dataset, positions, modalities, progress, layer) for layer in layers}
    plans = [raw_plan(adapter, layer, site) for layer in layers]
    riders = [raw_plan(adapter, layer, site) for layer in sorted({*also_cache} - {*layers})]
    return get_readouts(adapter, dataset, plans, positions, cache, progress, modalities, riders)
