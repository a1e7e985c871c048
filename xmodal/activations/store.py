"""An activation store for SAE training: resid_post of image tokens and text tokens, on disk.

Layout of a store directory:
- ``store.json``: what the rows are (model identity, layers, dataset hash, prompts, seed); a
  store is only ever extended by a run that asks for exactly the same thing;
- ``shard_00000.safetensors`` ...: per layer ``layer_<L>`` (rows, d_model), plus ``modality``
  (1 image token, 0 text token) and ``item`` (which image or text the row came from), rows
  shuffled within the shard;
- ``progress.json``: the shards written so far (rows, bytes) and how many batches of the
  plan they hold; ``complete`` is set last.

The plan is every image (its soft tokens) and every text (its tokens in the user turn) in
batches, in a seeded random order, so one forward pass feeds every layer and a shard holds
a random mix of images and texts. Memory stays under one shard plus one batch, whatever the
dataset's size. A shard is written to a temporary name and renamed, and only then entered in
progress.json: a killed or disk-full run leaves no half shard that a reader would take as
whole, and a rerun resumes after the last entered shard (a shard renamed but not yet entered
is rewritten with the same rows).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Literal, Sequence

import numpy as np
import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from xmodal.activations.extract import image_batch_ragged, image_batch_rows, image_input_loader, text_batch_rows
from xmodal.activations.shards import PROGRESS, check_shard_sizes, remove_stale_temporaries, save_shard, write_json_atomic
from xmodal.config import PositionsConfig
from xmodal.data.concepts import ConceptDataset
from xmodal.errors import StoreError
from xmodal.models.base import ModelAdapter

log = logging.getLogger(__name__)

STORE_FORMAT = 1
MANIFEST = "store.json"
IMAGE, TEXT = 1, 0  # the modality of a row
TextSource = Literal["captions", "concepts"]


@dataclass(frozen=True)
class StoreSpec:
    """Everything that determines a store's rows; two runs may share a store only if these match."""

    model: str
    model_identity: dict
    layers: tuple[int, ...]
    d_model: int
    dataset: str
    dataset_hash: str
    texts: TextSource
    text_prompt: str
    image_prompt: str
    use_chat_template: bool
    seed: int
    batch_size: int  # items per forward pass: the unit of resuming
    shard_tokens: int
    dtype: str
    site: str = "resid_post"  # where in each layer the rows are read (mlp_out, attn_out: sae_train's store.site)
    max_concept_tokens: int | None = None  # texts cut to this many tokens (positions.max_concept_tokens)
    format: int = STORE_FORMAT

    def describe(self) -> str:
        at = "" if self.site == "resid_post" else f" at {self.site}"
        return f"model {self.model!r} layers {list(self.layers)}{at} on dataset {self.dataset!r}"


@dataclass
class StoreProgress:
    batches_done: int = 0
    n_batches: int = 0
    shards: list[dict] = field(default_factory=list)  # file, rows, image_rows, text_rows, bytes
    complete: bool = False
    peak_buffer_rows: int = 0  # the most rows held in memory at once (the memory bound, checked in tests)


# ------------------------------------------------------------------------------- the plan --
def store_texts(dataset: ConceptDataset, source: TextSource) -> list[str]:
    """The texts whose tokens go into the store: the images' captions, or each concept's text."""
    if source == "concepts":
        return [c.text for c in dataset.concepts]
    captions = [img.caption for img in dataset.images if img.caption]
    if not captions:
        raise StoreError(f"store.texts=captions, but dataset {dataset.name!r} has no image captions; use store.texts=concepts")
    return captions


def batch_plan(n_images: int, n_texts: int, batch_size: int, seed: int) -> list[tuple[int, list[int]]]:
    """[(IMAGE or TEXT, item indices)] in a seeded random order: images and texts shuffled, in batches."""
    rng = np.random.default_rng(seed)
    plan = []
    for modality, n in ((IMAGE, n_images), (TEXT, n_texts)):
        order = rng.permutation(n).tolist()
        plan += [(modality, order[i : i + batch_size]) for i in range(0, n, batch_size)]
    return [plan[i] for i in rng.permutation(len(plan))]


def stream_rows(
    adapter: ModelAdapter,
    dataset: ConceptDataset,
    texts: Sequence[str],
    plan: Sequence[tuple[int, list[int]]],
    layers: Sequence[int],
    positions: PositionsConfig,
    progress: bool = True,
    desc: str = "activations",
    site: str = "resid_post",
) -> Iterator[tuple[dict[int, torch.Tensor], torch.Tensor, torch.Tensor]]:
    """Per batch of the plan: (layer -> rows at `site`, modality per row, item per row), one forward pass each.

    Image batches are decoded and resized by `positions.num_workers` DataLoader workers, ahead of the model.
    """
    image_batches = [items for modality, items in plan if modality == IMAGE]
    loader = iter(image_input_loader(adapter, dataset.images, image_batches, positions))
    for modality, items in tqdm(plan, desc=desc, disable=not progress, unit="batch"):
        if modality == IMAGE and adapter.ragged_images:  # each image its own number of (content) tokens
            ragged, _, _ = image_batch_ragged(adapter, next(loader), layers, site)
            rows = {layer: torch.cat(r).float().cpu() for layer, r in ragged.items()}
            item = torch.tensor(items).repeat_interleave(torch.tensor([len(r) for r in ragged[layers[0]]]))
        elif modality == IMAGE:
            tokens, _ = image_batch_rows(adapter, next(loader), layers, site)
            rows = {layer: t.flatten(0, 1) for layer, t in tokens.items()}
            per_item = tokens[layers[0]].shape[1]
            item = torch.tensor(items).repeat_interleave(per_item)
        else:
            prompts = [adapter.text_prompt(positions.text_prompt, texts[i], positions.use_chat_template, positions.max_concept_tokens) for i in items]
            per_prompt = text_batch_rows(adapter, prompts, layers, site)
            rows = {layer: torch.cat(r) for layer, r in per_prompt.items()}
            item = torch.tensor(items).repeat_interleave(torch.tensor([len(p.concept_positions) for p in prompts]))
        yield rows, torch.full((len(item),), modality, dtype=torch.uint8), item


# ----------------------------------------------------------------------------- writing --
def build_store(
    adapter: ModelAdapter,
    dataset: ConceptDataset,
    directory: str | Path,
    layers: Sequence[int],
    positions: PositionsConfig,
    texts: TextSource = "captions",
    seed: int = 0,
    shard_tokens: int = 65536,
    dtype: str = "float32",
    progress: bool = True,
    site: str = "resid_post",
) -> "ActivationStore":
    """Write (or finish, or reuse) the store of `layers` (read at `site`) for `dataset` in `directory`."""
    from xmodal.activations.batch_size import resolve_batch_size

    for layer in layers:
        adapter.check_layer(layer)
    if shard_tokens < 1:
        raise StoreError(f"store.shard_tokens={shard_tokens} must be at least 1")
    directory = Path(directory).expanduser()
    text_list = store_texts(dataset, texts)
    batch_size = resolve_batch_size(adapter, positions.batch_size, layers, dataset, positions)
    spec = StoreSpec(
        model=adapter.name,
        model_identity=json.loads(json.dumps(adapter.identity, default=str)),
        layers=tuple(sorted(set(layers))),
        d_model=adapter.site_width(site),
        dataset=dataset.name,
        dataset_hash=dataset.content_hash(),
        texts=texts,
        text_prompt=positions.text_prompt,
        image_prompt=positions.image_prompt,
        use_chat_template=positions.use_chat_template,
        seed=seed,
        batch_size=batch_size,
        shard_tokens=shard_tokens,
        dtype=dtype,
        site=str(getattr(site, "value", site)),
        max_concept_tokens=positions.max_concept_tokens,
    )
    state = _claim(directory, spec)
    if state.complete:
        log.info("Activation store %s is complete (%d shards); reusing it", directory, len(state.shards))
        return ActivationStore(directory)
    remove_stale_temporaries(directory)
    plan = batch_plan(len(dataset.images), len(text_list), batch_size, seed)
    state.n_batches = len(plan)
    if state.batches_done:
        log.info("Resuming activation store %s after %d of %d batches (%d shards)", directory, state.batches_done, len(plan), len(state.shards))
    buffer: list[tuple[dict[int, torch.Tensor], torch.Tensor, torch.Tensor]] = []
    buffered = 0
    rows_iter = stream_rows(adapter, dataset, text_list, plan[state.batches_done :], spec.layers, positions, progress, f"store {directory.name}", spec.site)
    for done, batch in enumerate(rows_iter, start=state.batches_done + 1):
        buffer.append(batch)
        buffered += len(batch[1])
        state.peak_buffer_rows = max(state.peak_buffer_rows, buffered)
        if buffered >= shard_tokens or done == len(plan):
            _write_shard(directory, spec, state, buffer, done)
            buffer, buffered = [], 0
    state.complete = True
    write_json_atomic(directory / PROGRESS, asdict(state))
    return ActivationStore(directory)


def _claim(directory: Path, spec: StoreSpec) -> StoreProgress:
    """The progress of the store in `directory`, creating it for `spec`, or refusing a different store."""
    manifest = directory / MANIFEST
    if manifest.exists():
        held = _read_spec(manifest)
        if held != spec:
            differs = [
                f"{k}: {getattr(held, k)!r} there, {getattr(spec, k)!r} here"
                for k in spec.__dataclass_fields__
                if getattr(held, k) != getattr(spec, k) and k != "model_identity"
            ]
            if held.model_identity != spec.model_identity:
                differs.insert(0, "the model's weights")
            raise StoreError(
                f"store {directory} holds {held.describe()}, but this run asks for {spec.describe()} "
                f"(differs in {'; '.join(differs)}); give another store.dir or delete that one"
            )
        return _read_progress(directory)
    if directory.exists() and any(directory.iterdir()):
        raise StoreError(f"store.dir={str(directory)!r} is a non-empty folder without {MANIFEST}; give an empty or new folder")
    directory.mkdir(parents=True, exist_ok=True)
    write_json_atomic(manifest, asdict(spec))
    write_json_atomic(directory / PROGRESS, asdict(StoreProgress()))
    return StoreProgress()


def _write_shard(directory: Path, spec: StoreSpec, state: StoreProgress, buffer: list, batches_done: int) -> None:
    index = len(state.shards)
    modality = torch.cat([b[1] for b in buffer])
    order = torch.randperm(len(modality), generator=torch.Generator().manual_seed(spec.seed * 1_000_003 + index))
    tensors = {f"layer_{layer}": torch.cat([b[0][layer] for b in buffer])[order].to(getattr(torch, spec.dtype)).contiguous() for layer in spec.layers}
    tensors |= {"modality": modality[order].contiguous(), "item": torch.cat([b[2] for b in buffer])[order].contiguous()}
    name = f"shard_{index:05d}.safetensors"

    def failed(message: str) -> StoreError:
        return StoreError(f"{message}; free space or fix the folder and rerun: the store resumes after shard {index}")

    size = save_shard(directory, name, tensors, {"store_format": str(STORE_FORMAT), "rows": str(len(order))}, failed)
    image_rows = int((modality == IMAGE).sum())
    state.shards.append({"file": name, "rows": len(order), "image_rows": image_rows, "text_rows": len(order) - image_rows, "bytes": size})
    state.batches_done = batches_done
    write_json_atomic(directory / PROGRESS, asdict(state))


def _read_spec(path: Path) -> StoreSpec:
    data = json.loads(path.read_text())
    if data.get("format") != STORE_FORMAT:
        raise StoreError(f"{path} is store format {data.get('format')!r}; this xmodal reads format {STORE_FORMAT}: rebuild the store")
    data["layers"] = tuple(data["layers"])
    return StoreSpec(**data)


def _read_progress(directory: Path) -> StoreProgress:
    state = StoreProgress(**json.loads((directory / PROGRESS).read_text()))
    check_shard_sizes(directory, state.shards, lambda message: StoreError(f"{message}: it was changed after writing; delete the store and rebuild it"))
    return state


# ----------------------------------------------------------------------------- reading --
class ActivationStore:
    """A complete store, read one shard (or a few) at a time."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory).expanduser()
        if not (self.directory / MANIFEST).exists():
            raise StoreError(f"{self.directory} holds no activation store ({MANIFEST} is missing); build one with python -m xmodal.sae_train")
        self.spec = _read_spec(self.directory / MANIFEST)
        self.progress = _read_progress(self.directory)
        if not self.progress.complete:
            raise StoreError(
                f"store {self.directory} is unfinished ({self.progress.batches_done} of {self.progress.n_batches} batches); rerun the same command to finish it"
            )

    @property
    def n_shards(self) -> int:
        return len(self.progress.shards)

    @property
    def n_rows(self) -> int:
        return sum(s["rows"] for s in self.progress.shards)

    def shard(self, index: int, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows (float32), modality per row) of one shard at `layer`."""
        if layer not in self.spec.layers:
            raise StoreError(f"store {self.directory} holds layers {list(self.spec.layers)}, not layer {layer}")
        with safe_open(self.directory / self.progress.shards[index]["file"], framework="pt") as handle:
            return handle.get_tensor(f"layer_{layer}").float(), handle.get_tensor("modality")

    def items(self, index: int) -> torch.Tensor:
        with safe_open(self.directory / self.progress.shards[index]["file"], framework="pt") as handle:
            return handle.get_tensor("item")

    def batches(self, layer: int, batch_size: int, seed: int, shards: Sequence[int], buffer_shards: int = 2) -> Iterator[torch.Tensor]:
        """Endless shuffled batches from `shards`: each epoch visits them in a new order, mixing
        `buffer_shards` at a time, so memory stays at that many shards."""
        if not shards:
            raise StoreError(f"store {self.directory} has no shard left for training; lower store.eval_fraction or store.shard_tokens")
        generator = torch.Generator().manual_seed(seed)

        def shard_groups() -> Iterator[torch.Tensor]:
            while True:
                order = [shards[i] for i in torch.randperm(len(shards), generator=generator)]
                for start in range(0, len(order), buffer_shards):
                    yield torch.cat([self.shard(i, layer)[0] for i in order[start : start + buffer_shards]])

        return mixed_batches(shard_groups(), 1, batch_size, generator)  # every group is mixed as it comes


def mixed_batches(chunks: Iterator[torch.Tensor], buffer_rows: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Batches of rows shuffled across chunks: chunks are held until there are `buffer_rows`
    rows, which are permuted together and cut into batches; what is left over joins the next."""
    pending: list[torch.Tensor] = []
    for chunk in chunks:
        pending.append(chunk)
        if sum(len(p) for p in pending) >= buffer_rows:
            mixed = torch.cat(pending)
            mixed = mixed[torch.randperm(len(mixed), generator=generator)]
            usable = len(mixed) - len(mixed) % batch_size
            if usable:  # (an empty tensor splits into one empty batch)
                yield from mixed[:usable].split(batch_size)
            pending = [mixed[usable:]]


def stream_batches(
    adapter: ModelAdapter,
    dataset: ConceptDataset,
    texts: Sequence[str],
    plan: Sequence[tuple[int, list[int]]],
    layer: int,
    positions: PositionsConfig,
    batch_size: int,
    buffer_tokens: int,
    seed: int,
    site: str = "resid_post",
) -> Iterator[torch.Tensor]:
    """On-the-fly mode: endless shuffled batches straight from the model, nothing written to disk.
    Each epoch runs the `plan`'s batches again, in a new order; at most `buffer_tokens` rows are held."""
    generator = torch.Generator().manual_seed(seed)

    def forward_batches() -> Iterator[torch.Tensor]:
        while True:
            epoch_plan = [plan[i] for i in torch.randperm(len(plan), generator=generator)]
            for rows, _, _ in stream_rows(adapter, dataset, texts, epoch_plan, [layer], positions, progress=False, site=site):
                yield rows[layer]

    return mixed_batches(forward_batches(), buffer_tokens, batch_size, generator)
