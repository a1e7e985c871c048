"""One streaming pass per job: the model runs batch by batch, and what the studies read is
reduced on the fly and written to disk shard by shard.

For each layer the pass keeps, as the job asks (a ``ReadoutPlan``):
- pooled codes per item, for every pooling asked: each token is encoded through the
  feature space (SAE, or raw residuals) on the model's device, then pooled per image and
  per concept text;
- every token's codes: sparse (indices and values of the non-zero SAE codes) for patch
  heat maps and per-token statistics, or dense for the raw residuals that the logit lens,
  DAS and MDS's own SAE read, memory-mapped back shard by shard;
- the first position after each image (end-of-image), encoded.

Nothing holds all tokens of all images: memory stays at one shard plus one batch, and the
reader goes through the shards one at a time. Each layer's output is a folder with
``readout.json`` (what produced it: the cache key's parts), ``text.safetensors``, image
shards and ``progress.json``, written with the store's protocol (``shards.py``): a killed
pass resumes after its last entered shard.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from xmodal.activations.extract import image_batch_hidden, image_batch_ragged, image_input_loader, text_batch_rows
from xmodal.activations.shards import PROGRESS, check_shard_sizes, remove_stale_temporaries, save_shard, write_json_atomic
from xmodal.config import PositionsConfig
from xmodal.data.concepts import ConceptDataset
from xmodal.errors import StoreError
from xmodal.models.base import ModelAdapter
from xmodal.saes.loading import FeatureSpace

log = logging.getLogger(__name__)

READOUT_FORMAT = 1  # bump when the stored layout or the reduction's semantics change
MANIFEST = "readout.json"
TEXT = "text.safetensors"
SHARD_BYTES = 256 * 2**20  # output buffered before a shard is written: the memory bound, beside one batch
CODE_ELEMENTS = 2**26  # dense codes encoded at once (256 MB in float32): images per chunk follow from it

Pooling = tuple[str, int]  # (how, top_n), as activations.codes.pool_tokens takes them


class TokenKeep(str, Enum):
    """What the pass keeps of every token: nothing, its non-zero codes, or its whole vector."""

    none = "none"
    sparse = "sparse"
    dense = "dense"


@dataclass
class ReadoutPlan:
    """What one layer's pass keeps."""

    layer: int
    space: FeatureSpace
    image_poolings: tuple[Pooling, ...] = ()
    text_pooling: Pooling | None = None
    tokens: TokenKeep = TokenKeep.none

    @property
    def site(self) -> str:
        """Where the pass reads the layer: the feature space's input site (resid_post, mlp_out, ...)."""
        return self.space.reads

    def identity(self) -> dict:
        # The site is part of the content (a resid_post readout is never an mlp_out one); resid_post
        # adds nothing, so the keys of caches written before sites existed stay valid.
        site = {} if self.site == "resid_post" else {"site": self.site}
        return {
            **site,
            "space": self.space.identity,
            "space_name": self.space.name,
            "space_layer": self.space.layer,
            "image_poolings": [list(p) for p in self.image_poolings],
            "text_pooling": list(self.text_pooling) if self.text_pooling else None,
            "tokens": self.tokens.value,
        }


def readout_key(adapter: ModelAdapter, dataset_hash: str, plan: ReadoutPlan, positions: PositionsConfig, modalities: Sequence[str]) -> str:
    """The content of everything that determines a layer's readout: weights, inputs and the reduction."""
    parts = {
        "format": READOUT_FORMAT,
        "model": adapter.identity,
        "layer": plan.layer,
        "text_prompt": positions.text_prompt,
        "image_prompt": positions.image_prompt,
        "use_chat_template": positions.use_chat_template,
        **({"max_concept_tokens": positions.max_concept_tokens} if positions.max_concept_tokens is not None else {}),  # unset: keys as before
        "dataset": dataset_hash,
        "modalities": sorted(modalities),
        **plan.identity(),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


# ----------------------------------------------------------------------------- reading --
class TokenRows:
    """Every image's per-token rows (dense residuals, or sparse codes made dense on reading),
    read from the shards one shard at a time; never all in memory unless asked (``dense()``)."""

    def __init__(self, directory: Path, shards: list[dict], keep: TokenKeep, width: int) -> None:
        self.directory, self.shards, self.keep, self.width = directory, shards, keep, width
        counts = [self._read(shard, ["counts"])["counts"] for shard in shards]
        self.counts = torch.cat(counts).long() if counts else torch.zeros(0, dtype=torch.long)
        self._shard_start = np.cumsum([0] + [s["images"] for s in shards])
        # Ragged readouts (dynamic-resolution models) keep each image's grids; fixed-count ones do not.
        self.grids: list[list[tuple[int, int]]] | None = None
        if shards and self._has(shards[0], "grids"):
            self.grids = []
            for shard in shards:
                data = self._read(shard, ["grids", "grid_counts"])
                for block in data["grids"].split(data["grid_counts"].tolist()):
                    self.grids.append([(int(r), int(c)) for r, c in block.tolist()])

    def _has(self, shard: dict, name: str) -> bool:
        with safe_open(self.directory / shard["file"], framework="pt") as handle:
            return name in handle.keys()

    def token_map(self, image: int, values: np.ndarray) -> np.ndarray:
        """(rows, columns) of one image's per-token `values` on its largest grid (the tile grid of an
        anyres image, the one grid of a dynamic-resolution image), at the image's own aspect."""
        if self.grids is None:
            raise StoreError(f"readout {self.directory} keeps no per-image grids (a fixed-count model); use the model's image_token_grid")
        grids = self.grids[image]
        sizes = [r * c for r, c in grids]
        largest = int(np.argmax(sizes))
        start = sum(sizes[:largest])
        rows, cols = grids[largest]
        return np.asarray(values)[start : start + rows * cols].reshape(rows, cols)

    def feature_maps_per_image(self, chosen: Sequence[int]) -> list[list[np.ndarray]]:
        """Per chosen feature, its value at every token of each image: one (tokens_i,) array per image."""
        chosen = [int(f) for f in chosen]
        per_image = [tokens[:, chosen].numpy() for tokens in self]
        return [[m[:, n] for m in per_image] for n in range(len(chosen))]

    def _read(self, shard: dict, names: Sequence[str]) -> dict[str, torch.Tensor]:
        with safe_open(self.directory / shard["file"], framework="pt") as handle:
            return {name: handle.get_tensor(name) for name in names}

    def __len__(self) -> int:
        return len(self.counts)

    @property
    def tokens_per_image(self) -> int:
        """Image tokens per image (the same for every image of a fixed-resolution model)."""
        counts = self.counts.unique()
        if len(counts) != 1:
            raise StoreError(f"images have different token counts ({counts.tolist()[:5]}): read them one by one")
        return int(counts[0])

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self), self.tokens_per_image if len(self) else 0, self.width)

    def _shard_images(self, index: int) -> Iterator[torch.Tensor]:
        shard = self.shards[index]
        if self.keep == TokenKeep.dense:
            tokens = self._read(shard, ["counts", "tokens"])
            yield from tokens["tokens"].float().split(tokens["counts"].tolist())
            return
        data = self._read(shard, ["counts", "nnz", "indices", "values"])
        dense = sparse_to_dense(data["nnz"], data["indices"], data["values"], self.width)
        yield from dense.split(data["counts"].tolist())

    def __iter__(self) -> Iterator[torch.Tensor]:
        """(tokens, width) float32 of each image in order, one shard in memory at a time."""
        for index in range(len(self.shards)):
            yield from self._shard_images(index)

    def __getitem__(self, image: int) -> torch.Tensor:
        """(tokens, width) float32 of one image, sliced out of its shard without reading the rest."""
        if not 0 <= image < len(self):
            raise IndexError(f"image {image} of {len(self)}")
        index = int(np.searchsorted(self._shard_start, image, side="right") - 1)
        offset = image - int(self._shard_start[index])
        with safe_open(self.directory / self.shards[index]["file"], framework="pt") as handle:
            counts = handle.get_tensor("counts").long()
            first, last = int(counts[:offset].sum()), int(counts[: offset + 1].sum())  # its token rows in the shard
            if self.keep == TokenKeep.dense:
                return handle.get_slice("tokens")[first:last].float()
            nnz = handle.get_tensor("nnz").long()
            start, stop = int(nnz[:first].sum()), int(nnz[:last].sum())  # its non-zero entries
            indices, values = handle.get_slice("indices")[start:stop], handle.get_slice("values")[start:stop]
        return sparse_to_dense(nnz[first:last], indices, values, self.width)

    def mean_per_image(self) -> torch.Tensor:
        """(n_images, width): each image's mean token."""
        rows = [tokens.mean(dim=0) for tokens in self]
        return torch.stack(rows) if rows else torch.zeros(0, self.width)

    def rows(self) -> torch.Tensor:
        """(all tokens, width) in memory: for methods that train on every token (MDS's own SAE)."""
        rows = list(self)
        return torch.cat(rows) if rows else torch.zeros(0, self.width)

    def dense(self) -> torch.Tensor:
        """(n_images, tokens, width) in memory: for small subsets of images only."""
        return torch.stack(list(self)) if len(self) else torch.zeros(0, 0, self.width)

    def feature_maps(self, chosen: Sequence[int]) -> list[np.ndarray]:
        """Per chosen feature, (n_images, tokens): its value at every image token (only those columns are made dense)."""
        chosen = [int(f) for f in chosen]
        per_image: list[np.ndarray] = []
        for index, shard in enumerate(self.shards):
            if self.keep == TokenKeep.dense:
                per_image += [t[:, chosen].numpy() for t in self._shard_images(index)]
                continue
            data = self._read(shard, ["counts", "nnz", "indices", "values"])
            columns = torch.full((self.width,), -1, dtype=torch.long)
            columns[chosen] = torch.arange(len(chosen))
            token_of = torch.arange(len(data["nnz"])).repeat_interleave(data["nnz"].long())
            hit = columns[data["indices"].long()] >= 0
            maps = torch.zeros(len(data["nnz"]), len(chosen))
            maps[token_of[hit], columns[data["indices"][hit].long()]] = data["values"][hit].float()
            per_image += [m.numpy() for m in maps.split(data["counts"].tolist())]
        stacked = np.stack(per_image) if per_image else np.zeros((0, 0, len(chosen)), np.float32)
        return [stacked[:, :, n] for n in range(len(chosen))]


def sparse_to_dense(nnz: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, width: int) -> torch.Tensor:
    dense = torch.zeros(len(nnz), width)
    rows = torch.arange(len(nnz)).repeat_interleave(nnz.long())
    dense[rows, indices.long()] = values.float()
    return dense


@dataclass
class LayerReadout:
    """One layer's readout: text and pooled image rows in memory (small), token rows on disk."""

    layer: int
    directory: Path
    concepts: list[str]
    image_concepts: list[str]
    image_sources: list[str]
    width: int
    text_offsets: torch.Tensor  # (n_concepts + 1,): concept i owns text token rows offsets[i]:offsets[i+1]
    text_pooled: torch.Tensor | None  # (n_concepts, width)
    text_tokens: torch.Tensor | None  # (concept tokens, width), dense; None when tokens were not kept
    image_pooled: dict[Pooling, torch.Tensor] = field(default_factory=dict)  # (n_images, width) per pooling
    image_eoi: torch.Tensor | None = None  # (n_images, width): the encoded first position after the image
    image_tokens: TokenRows | None = None
    meta: dict = field(default_factory=dict)  # the manifest: what produced it
    progress: dict = field(default_factory=dict)  # its shards, and the most output bytes held at once while writing

    def text_tokens_of(self, index: int) -> torch.Tensor:
        return self.text_tokens[self.text_offsets[index] : self.text_offsets[index + 1]]

    # The same reads as extract.LayerActivations offers, from disk.
    @property
    def tokens_per_image(self) -> int:
        return self.image_tokens.tokens_per_image

    def image_token_mean(self) -> torch.Tensor:
        return self.image_tokens.mean_per_image() if self.image_tokens is not None else torch.zeros(0, self.width)

    def image_token_rows(self) -> torch.Tensor:
        return self.image_tokens.rows() if self.image_tokens is not None else torch.zeros(0, self.width)


def read_layer(directory: Path) -> LayerReadout:
    """A finished layer readout; StoreError if it is unfinished or was changed after writing."""
    manifest = json.loads((directory / MANIFEST).read_text())
    progress = json.loads((directory / PROGRESS).read_text())
    if not progress["complete"]:
        raise StoreError(f"readout {directory} is unfinished ({progress['images_done']} of {progress['n_images']} images); rerun the job to finish it")
    check_shard_sizes(directory, progress["shards"], lambda message: StoreError(f"{message}: delete {directory} and rerun"))
    keep, width = TokenKeep(manifest["tokens"]), manifest["width"]
    with safe_open(directory / TEXT, framework="pt") as handle:
        text = {name: handle.get_tensor(name) for name in handle.keys()}
    text_tokens = None
    if keep == TokenKeep.dense:
        text_tokens = text["tokens"]
    elif keep == TokenKeep.sparse:
        text_tokens = sparse_to_dense(text["nnz"], text["indices"], text["values"], width)
    pooled: dict[str, list[torch.Tensor]] = {}
    for shard in progress["shards"]:
        with safe_open(directory / shard["file"], framework="pt") as handle:
            for name in handle.keys():
                if name.startswith("pooled_") or name == "eoi":
                    pooled.setdefault(name, []).append(handle.get_tensor(name))

    def joined(name: str) -> torch.Tensor:
        return torch.cat(pooled[name]) if name in pooled else torch.zeros(0, width)

    return LayerReadout(
        layer=manifest["layer"],
        directory=directory,
        concepts=manifest["concepts"],
        image_concepts=manifest["image_concepts"],
        image_sources=manifest["image_sources"],
        width=width,
        text_offsets=text["offsets"],
        text_pooled=text.get("pooled"),
        text_tokens=text_tokens,
        image_pooled={tuple(p): joined("eoi" if p[0] == "eoi" else pooling_name(tuple(p))) for p in manifest["image_poolings"]},
        image_eoi=joined("eoi") if manifest["eoi"] else None,
        image_tokens=TokenRows(directory, progress["shards"], keep, width) if keep != TokenKeep.none else None,
        meta=manifest,
        progress=progress,
    )


def pool_tokens(codes: torch.Tensor, how: str, top_n: int = 5) -> torch.Tensor:
    """Pool (..., tokens, features) over the token axis."""
    if how == "mean":
        return codes.mean(dim=-2)
    if how == "sum":
        return codes.sum(dim=-2)
    if how == "max":
        return codes.max(dim=-2).values
    if how == "last":
        return codes[..., -1, :]
    if how == "topn":
        n = min(top_n, codes.shape[-2])
        return codes.topk(n, dim=-2).values.mean(dim=-2)
    if how == "topn_per_token":
        n = min(top_n, codes.shape[-1])
        values, indices = codes.topk(n, dim=-1)
        return torch.zeros_like(codes).scatter(-1, indices, values).sum(dim=-2)
    raise ValueError(f"unknown pooling {how!r}")


def pooling_name(pooling: Pooling) -> str:
    return f"pooled_{pooling[0]}_{pooling[1]}"


# ----------------------------------------------------------------------------- writing --
@dataclass
class _LayerWriter:
    """The shards of one layer under way: their folder, plan, progress and the buffered output."""

    plan: ReadoutPlan
    directory: Path
    progress: dict
    buffer: list[dict[str, torch.Tensor]] = field(default_factory=list)
    buffered_bytes: int = 0

    def add(self, outputs: dict[str, torch.Tensor]) -> None:
        self.buffer.append(outputs)
        self.buffered_bytes += sum(t.numel() * t.element_size() for t in outputs.values())

    def flush(self, images_done: int) -> None:
        if not self.buffer:
            return
        index = len(self.progress["shards"])
        tensors = {name: torch.cat([b[name] for b in self.buffer]) for name in self.buffer[0]}
        name = f"images_{index:05d}.safetensors"

        def failed(message: str) -> StoreError:
            return StoreError(f"{message}; free space or fix the folder and rerun: the pass resumes after image {self.progress['images_done']}")

        size = save_shard(self.directory, name, tensors, {"readout_format": str(READOUT_FORMAT)}, failed)
        self.progress["shards"].append({"file": name, "images": len(tensors["counts"]), "bytes": size})
        self.progress["images_done"] = images_done
        write_json_atomic(self.directory / PROGRESS, self.progress)
        self.buffer, self.buffered_bytes = [], 0


def token_outputs(codes: torch.Tensor, keep: TokenKeep) -> dict[str, torch.Tensor]:
    """(tokens, width) codes as kept: nothing, the non-zero entries of each row, or the rows."""
    if keep == TokenKeep.dense:
        return {"tokens": codes.float().cpu()}
    if keep == TokenKeep.sparse:
        active = codes != 0
        return {"nnz": active.sum(dim=1).int().cpu(), "indices": active.nonzero()[:, 1].int().cpu(), "values": codes[active].float().cpu()}
    return {}


def encode_and_pool(plan: ReadoutPlan, tokens: torch.Tensor, eoi: torch.Tensor) -> dict[str, torch.Tensor]:
    """One batch of images, (n, tokens, d) and (n, d) on the model's device, reduced as `plan` asks."""
    n_images, n_tokens = tokens.shape[:2]
    step = max(1, CODE_ELEMENTS // max(1, n_tokens * plan.space.d_sae))
    out: dict[str, list[torch.Tensor]] = {}
    for start in range(0, n_images, step):
        chunk = tokens[start : start + step]
        codes = plan.space.encode(chunk.flatten(0, 1), on_device=True).view(len(chunk), n_tokens, -1)
        for pooling in plan.image_poolings:
            if pooling[0] != "eoi":
                out.setdefault(pooling_name(pooling), []).append(pool_tokens(codes, *pooling).float().cpu())
        for name, value in token_outputs(codes.flatten(0, 1), plan.tokens).items():
            out.setdefault(name, []).append(value)
    out["eoi"] = [plan.space.encode(eoi, on_device=True).float().cpu()]  # also the rows of an "eoi" pooling
    out["counts"] = [torch.full((n_images,), n_tokens, dtype=torch.int32)]
    return {name: torch.cat(parts) for name, parts in out.items()}


def encode_and_pool_ragged(
    plan: ReadoutPlan, tokens: Sequence[torch.Tensor], eoi: torch.Tensor, grids: Sequence[Sequence[tuple[int, int]]]
) -> dict[str, torch.Tensor]:
    """encode_and_pool for images with their own token counts: (tokens_i, d) each, image by image.
    Each image's grids ((rows, columns) of its content tokens, in order) are kept beside its codes."""
    parts = [encode_and_pool(plan, t.unsqueeze(0), e.unsqueeze(0)) for t, e in zip(tokens, eoi)]
    out = {name: torch.cat([p[name] for p in parts]) for name in parts[0]}
    out["grids"] = torch.tensor([list(g) for image in grids for g in image], dtype=torch.int32).view(-1, 2)
    out["grid_counts"] = torch.tensor([len(image) for image in grids], dtype=torch.int32)
    return out


def text_outputs(plan: ReadoutPlan, rows: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every concept's text tokens (CPU float32, one tensor each), encoded, pooled and kept as `plan` asks."""
    width = plan.space.d_sae
    codes = [plan.space.encode(r) for r in rows]
    out: dict[str, torch.Tensor] = {"offsets": torch.tensor([0, *np.cumsum([len(r) for r in rows])], dtype=torch.long)}
    if plan.text_pooling is not None:
        pooled = [pool_tokens(c, *plan.text_pooling) for c in codes]
        out["pooled"] = torch.stack(pooled) if pooled else torch.zeros(0, width)
    if plan.tokens != TokenKeep.none:
        out |= token_outputs(torch.cat(codes) if codes else torch.zeros(0, width), plan.tokens)
    return out


def _claim(directory: Path, manifest: dict) -> dict:
    """The progress of the readout in `directory`, creating it for `manifest`."""
    if (directory / MANIFEST).exists() and (directory / PROGRESS).exists():
        held = json.loads((directory / MANIFEST).read_text())
        if held == manifest:
            progress = json.loads((directory / PROGRESS).read_text())
            check_shard_sizes(directory, progress["shards"], lambda message: StoreError(f"{message}: delete {directory} and rerun"))
            remove_stale_temporaries(directory)
            return progress
        log.warning("Readout %s was written by another xmodal (its manifest differs); rewriting it", directory)
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    write_json_atomic(directory / MANIFEST, manifest)
    progress = {"text_done": False, "images_done": 0, "n_images": manifest["n_images"], "shards": [], "complete": False, "peak_buffer_bytes": 0}
    write_json_atomic(directory / PROGRESS, progress)
    return progress


def _truncate(writer: _LayerWriter, images_done: int) -> None:
    """Forget shards past `images_done` (a pass killed between two layers' bookkeeping left one ahead)."""
    kept, total = [], 0
    for shard in writer.progress["shards"]:
        if total + shard["images"] > images_done:
            (writer.directory / shard["file"]).unlink(missing_ok=True)
            continue
        kept.append(shard)
        total += shard["images"]
    writer.progress["shards"], writer.progress["images_done"] = kept, total
    write_json_atomic(writer.directory / PROGRESS, writer.progress)


def one_site(plans: Sequence[ReadoutPlan]) -> str:
    sites = sorted({plan.site for plan in plans})
    if len(sites) > 1:
        raise ValueError(f"one streaming pass reads one site, but the plans read {sites}; group them by site (cache.get_readouts does)")
    return sites[0] if sites else "resid_post"


def stream_readouts(
    adapter: ModelAdapter,
    dataset: ConceptDataset,
    plans: Sequence[ReadoutPlan],
    directories: Sequence[Path],
    positions: PositionsConfig,
    batch_size: int,
    modalities: Sequence[str] = ("text", "image"),
    progress: bool = True,
) -> None:
    """Run `dataset` through the model once (stopping after the deepest layer of `plans`) and write each
    plan's readout into its directory; finished directories are skipped, unfinished ones resumed.
    Every plan reads the same site (one pass hooks one site)."""
    site = one_site(plans)
    concepts = dataset.concepts if "text" in modalities else []
    images = dataset.images if "image" in modalities else []
    writers = []
    for plan, directory in zip(plans, directories):
        manifest = {
            "format": READOUT_FORMAT,
            "layer": plan.layer,
            "width": plan.space.d_sae,
            **plan.identity(),
            "eoi": bool(images),
            "concepts": [c.name for c in concepts],
            "image_concepts": [i.concept for i in images],
            "image_sources": [i.source for i in images],
            "n_images": len(images),
        }
        state = _claim(directory, manifest)
        if not state["complete"]:
            writers.append(_LayerWriter(plan, directory, state))
    if not writers:
        return
    layers = sorted({w.plan.layer for w in writers})

    # Text: every concept once (small: a few tokens per concept), before the images.
    pending_text = [w for w in writers if not w.progress["text_done"]]
    if pending_text:
        prompts = [adapter.text_prompt(positions.text_prompt, c.text, positions.use_chat_template, positions.max_concept_tokens) for c in concepts]
        rows: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
        for start in tqdm(range(0, len(prompts), batch_size), desc=f"{adapter.name}: text", disable=not progress, leave=False):
            for layer, batch_rows in text_batch_rows(adapter, prompts[start : start + batch_size], layers, site).items():
                rows[layer] += batch_rows
        for writer in pending_text:
            outputs = text_outputs(writer.plan, rows[writer.plan.layer])
            save_shard(writer.directory, TEXT, outputs, {"readout_format": str(READOUT_FORMAT)}, lambda message: StoreError(f"{message}; rerun"))
            writer.progress["text_done"] = True
            write_json_atomic(writer.directory / PROGRESS, writer.progress)
        del rows

    # Images: in batches from where the slowest layer stopped; a shard is written when its buffer is full.
    start = min(w.progress["images_done"] for w in writers)
    for writer in writers:
        if writer.progress["images_done"] > start:
            _truncate(writer, start)
    if start:
        log.info("Resuming the pass over %d images after image %d (%s)", len(images), start, directories[0].parent)
    batches = [list(range(i, min(i + batch_size, len(images)))) for i in range(start, len(images), batch_size)]
    loader = image_input_loader(adapter, images, batches, positions)
    done, started = start, time.perf_counter()
    for batch, inputs in zip(batches, tqdm(loader, desc=f"{adapter.name}: images", disable=not progress, leave=False, total=len(batches))):
        done += len(batch)
        if adapter.ragged_images:
            ragged, eoi, layouts = image_batch_ragged(adapter, inputs, layers, site)
            grids = [layout.grids for layout in layouts]
            for writer in writers:
                writer.add(encode_and_pool_ragged(writer.plan, ragged[writer.plan.layer], eoi[writer.plan.layer], grids))
            del ragged
        else:
            tokens, eoi = image_batch_hidden(adapter, inputs, layers, site)
            for writer in writers:
                writer.add(encode_and_pool(writer.plan, tokens[writer.plan.layer], eoi[writer.plan.layer]))
            del tokens
        del eoi
        held = sum(w.buffered_bytes for w in writers)
        for writer in writers:
            writer.progress["peak_buffer_bytes"] = max(writer.progress.get("peak_buffer_bytes", 0), held)
        if done == len(images) or held >= SHARD_BYTES:
            for writer in writers:
                # seconds of the image loop (forward, encoding, pooling, writing), over every run of a resumed pass
                writer.progress["image_pass_s"] = writer.progress.get("image_pass_s", 0.0) + time.perf_counter() - started
                writer.flush(done)
            started = time.perf_counter()
    for writer in writers:
        writer.progress["complete"] = True  # last: only now does a reader take the folder as finished
        write_json_atomic(writer.directory / PROGRESS, writer.progress)
