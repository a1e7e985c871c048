"""Train SAEs on a VLM's image-token and text-token residuals: ``python -m xmodal.sae_train``.

Method, one function per step:
1. `fill_store`: stream the dataset's image tokens and text tokens at every layer in
   `layers` (one forward pass feeds them all) into an activation store on disk
   (xmodal/activations/store.py), or, with ``store.mode=on_the_fly``, plan the same batches
   and write nothing;
2. `train`: per layer, a sae-lens SAE (TopK, BatchTopK or JumpReLU) on shuffled batches
   from the store's training shards (or straight from the model);
3. `evaluate`: FVE and L0 per modality and the dead fraction on held-out images and texts
   (the first shards, which no training batch reads), against a null: the same SAE on the
   rows shuffled across feature dimensions;
4. `save_sae`: each SAE in sae-lens format under ``out_dir/layer_<L>``, which ``sae=local
   'sae.path="<out_dir>/layer_{layer}"'`` loads for any experiment; ``quality.csv`` beside them,
   and ``done.json`` last.

Runs like any other job: ``cluster=slurm`` submits it through submitit; a killed store
resumes where it stopped.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Iterator

import hydra
import pandas as pd
import torch
from hydra.core.config_store import ConfigStore
from hydra.utils import instantiate
from omegaconf import MISSING, DictConfig, OmegaConf

from xmodal import config as config_schema
from xmodal.activations.batch_size import resolve_batch_size
from xmodal.activations.store import (
    IMAGE,
    TEXT,
    ActivationStore,
    batch_plan,
    build_store,
    mixed_batches,
    store_texts,
    stream_batches,
    stream_rows,
)
from xmodal.conf_dir import CONF_DIR
from xmodal.config import PathsConfig, PositionsConfig
from xmodal.errors import ConfigError, XmodalError, user_error
from xmodal.models.base import ModelAdapter, instantiate_model
from xmodal.reporting.results import atomic_write
from xmodal.saes.quality import sae_quality
from xmodal.saes.training import save_sae, train_sae

log = logging.getLogger("xmodal.sae_train")


class StoreMode(StrEnum):
    disk = "disk"  # sharded safetensors, resumable, reusable by later runs
    on_the_fly = "on_the_fly"  # straight from the model each epoch; nothing written


class TextSource(StrEnum):
    captions = "captions"  # each image's caption, as a user turn
    concepts = "concepts"  # each concept's text


class StoreDtype(StrEnum):
    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"


class Architecture(StrEnum):
    topk = "topk"
    batchtopk = "batchtopk"  # saved for inference as JumpReLU
    jumprelu = "jumprelu"  # trained towards L0 = k
    matryoshka_batchtopk = "matryoshka_batchtopk"  # BatchTopK with nested-prefix losses; saved as JumpReLU


class Modality(StrEnum):
    text = "text"
    image = "image"


class DecoderInit(StrEnum):
    data = "data"  # features start on random training tokens (fewer dead)
    random = "random"  # sae-lens's random directions


@dataclass
class StoreConfig:
    dir: str = MISSING
    mode: StoreMode = StoreMode.disk
    texts: TextSource = TextSource.captions
    shard_tokens: int = 16384  # rows per shard: the writer holds at most one shard plus one batch
    dtype: StoreDtype = StoreDtype.float32
    buffer_shards: int = 2  # shards mixed at a time when training reads the store
    eval_fraction: float = 0.1  # of the shards (disk) or batches (on the fly), held out for evaluation
    # Where in each layer the rows are read, and so where the SAEs read: resid_post, mlp_out or attn_out
    # (then load them with sae.site=<the same>; the SAE's cfg.json records it in hook_name).
    site: config_schema.SAESite = config_schema.SAESite.resid_post


@dataclass
class TrainingConfig:
    architecture: Architecture = Architecture.topk
    d_sae: int = 512
    k: int = 32  # features per token (TopK, BatchTopK on average), the target L0 for JumpReLU
    training_tokens: int = 1_000_000
    batch_size: int = 1024
    lr: float = 4e-4
    decoder_init: DecoderInit = DecoderInit.data
    l0_coefficient: float = 1.0  # JumpReLU only: how hard its L0 is pulled towards k
    matryoshka_widths: list[int] = field(default_factory=list)  # Matryoshka only; []: d_sae/8, /4, /2, d_sae
    # The tokens the SAE trains on; [text] gives a text-only SAE (like Gemma Scope's) from the same
    # store. Evaluation always scores both modalities.
    modalities: list[Modality] = field(default_factory=lambda: [Modality.text, Modality.image])


@dataclass
class SAETrainConfig:
    model: Any = MISSING
    dataset: Any = MISSING
    layers: list[int] = field(default_factory=lambda: [9])
    seed: int = 0
    positions: PositionsConfig = field(default_factory=PositionsConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    out_dir: str = MISSING
    paths: PathsConfig = field(default_factory=PathsConfig)

    def validate(self) -> None:
        """Every check that needs no data or model: a typo fails before anything loads."""
        config_schema.check_batch_size(self.positions.batch_size)
        if not self.layers:
            raise ConfigError("layers=[] names no layer; give at least one, e.g. layers=[9]")
        t, s = self.training, self.store
        for name, value in (
            ("training.d_sae", t.d_sae),
            ("training.k", t.k),
            ("training.batch_size", t.batch_size),
            ("training.training_tokens", t.training_tokens),
            ("store.shard_tokens", s.shard_tokens),
            ("store.buffer_shards", s.buffer_shards),
        ):
            if value < 1:
                raise ConfigError(f"{name}={value} must be at least 1")
        if t.k > t.d_sae:
            raise ConfigError(f"training.k={t.k} exceeds training.d_sae={t.d_sae}; lower k or widen the SAE")
        if not t.modalities:
            raise ConfigError("training.modalities=[] trains on nothing; use [text], [image] or [text,image]")
        widths = list(t.matryoshka_widths)
        if widths and (widths[-1] != t.d_sae or widths[0] < 1 or any(a >= b for a, b in zip(widths, widths[1:]))):
            raise ConfigError(
                f"training.matryoshka_widths={widths} must rise strictly from at least 1 and end at "
                f"training.d_sae={t.d_sae}; or leave it [] for d_sae/8, /4, /2 and d_sae"
            )
        if not 0 < s.eval_fraction < 1:
            raise ConfigError(f"store.eval_fraction={s.eval_fraction} must lie strictly between 0 and 1")


@dataclass
class Source:
    """Where one layer's training batches and held-out rows come from."""

    train_batches: Any  # layer -> endless iterator of (batch_size, d_model)
    eval_rows: dict[int, tuple[torch.Tensor, torch.Tensor]]  # layer -> (rows, modality)
    sample: dict[int, torch.Tensor]  # layer -> training rows for the initialisation
    stats: dict[str, Any]


# 1. ----------------------------------------------------------------------------------------
def fill_store(cfg: SAETrainConfig, adapter: ModelAdapter, dataset: Any, progress: bool = True) -> Source:
    """The training batches and held-out rows of every layer: from a store on disk, or streamed."""
    if cfg.store.mode == StoreMode.disk:
        return disk_source(cfg, adapter, dataset, progress)
    return streamed_source(cfg, adapter, dataset, progress)


def disk_source(cfg: SAETrainConfig, adapter: ModelAdapter, dataset: Any, progress: bool) -> Source:
    store_cfg, start = cfg.store, time.perf_counter()
    store = build_store(
        adapter,
        dataset,
        store_cfg.dir,
        cfg.layers,
        cfg.positions,
        store_cfg.texts.value,
        cfg.seed,
        store_cfg.shard_tokens,
        store_cfg.dtype.value,
        progress,
        store_cfg.site.value,
    )
    n_eval = max(1, round(store_cfg.eval_fraction * store.n_shards))
    if store.n_shards - n_eval < 1:
        raise XmodalError(
            f"the store holds {store.n_shards} shard(s): too few to hold {n_eval} out for evaluation; "
            f"lower store.shard_tokens (now {store_cfg.shard_tokens}) or use a larger dataset"
        )
    # The first shards are held out: full-size random mixes (the last one holds what was left over).
    train_shards = list(range(n_eval, store.n_shards))
    eval_rows = {layer: _cat([store.shard(i, layer) for i in range(n_eval)]) for layer in cfg.layers}
    _check_both_modalities(eval_rows[cfg.layers[0]][1], f"the {n_eval} held-out shard(s)", "raise store.eval_fraction or lower store.shard_tokens")

    codes = trained_modality_codes(cfg)

    def batches(layer: int) -> Iterator[torch.Tensor]:
        if len(codes) == 2:
            return store.batches(layer, cfg.training.batch_size, cfg.seed, train_shards, store_cfg.buffer_shards)
        return modality_batches(store, layer, codes, cfg.training.batch_size, cfg.seed, train_shards, store_cfg.buffer_shards)

    def sample(layer: int) -> torch.Tensor:
        """Training rows of the trained modalities, about one shard's worth (from several when filtered)."""
        parts: list[torch.Tensor] = []
        for index in train_shards:
            rows, modality = store.shard(index, layer)
            parts.append(rows[torch.isin(modality, torch.tensor(codes, dtype=modality.dtype))])
            if sum(len(p) for p in parts) >= store_cfg.shard_tokens:
                break
        return torch.cat(parts)

    stats = {"store_rows": store.n_rows, "store_shards": store.n_shards, "eval_shards": n_eval, "store_seconds": time.perf_counter() - start}
    return Source(batches, eval_rows, {layer: sample(layer) for layer in cfg.layers}, stats)


def trained_modality_codes(cfg: SAETrainConfig) -> list[int]:
    """The store's modality codes of the rows training reads (training.modalities)."""
    return sorted({IMAGE if m == Modality.image else TEXT for m in cfg.training.modalities})


def modality_batches(
    store: ActivationStore, layer: int, codes: list[int], batch_size: int, seed: int, shards: list[int], buffer_shards: int
) -> Iterator[torch.Tensor]:
    """Like ActivationStore.batches, keeping only the rows of the modalities in `codes` (a text-only SAE)."""
    generator = torch.Generator().manual_seed(seed)
    wanted = torch.tensor(codes, dtype=torch.uint8)

    def shard_groups() -> Iterator[torch.Tensor]:
        while True:
            order = [shards[i] for i in torch.randperm(len(shards), generator=generator)]
            for start in range(0, len(order), buffer_shards):
                parts = [store.shard(i, layer) for i in order[start : start + buffer_shards]]
                yield torch.cat([rows[torch.isin(modality, wanted.to(modality.dtype))] for rows, modality in parts])

    return mixed_batches(shard_groups(), batch_size, batch_size, generator)  # a filtered group may hold less than a batch


def streamed_source(cfg: SAETrainConfig, adapter: ModelAdapter, dataset: Any, progress: bool) -> Source:
    """On the fly: the plan's last batches are run once and held out; the rest are rerun every epoch."""
    texts = store_texts(dataset, cfg.store.texts.value)
    forward_batch = resolve_batch_size(adapter, cfg.positions.batch_size, cfg.layers, dataset, cfg.positions)
    plan = batch_plan(len(dataset.images), len(texts), forward_batch, cfg.seed)
    n_eval = max(1, round(cfg.store.eval_fraction * len(plan)))
    if len(plan) - n_eval < 1:
        raise XmodalError(f"the dataset makes {len(plan)} batch(es): too few to hold {n_eval} out for evaluation; use a larger dataset")
    train_plan, eval_plan = plan[: len(plan) - n_eval], plan[len(plan) - n_eval :]
    codes = trained_modality_codes(cfg)
    train_plan = [(modality, items) for modality, items in train_plan if modality in codes]
    if not train_plan:
        raise XmodalError(f"no training batch holds {[m.value for m in cfg.training.modalities]} tokens; use a larger dataset")
    site = cfg.store.site.value
    held_out = list(stream_rows(adapter, dataset, texts, eval_plan, cfg.layers, cfg.positions, progress, "held-out activations", site))
    eval_rows = {layer: _cat([(r[layer], m) for r, m, _ in held_out]) for layer in cfg.layers}
    _check_both_modalities(eval_rows[cfg.layers[0]][1], f"the {n_eval} held-out batch(es)", "raise store.eval_fraction")
    first = list(stream_rows(adapter, dataset, texts, train_plan[:8], cfg.layers, cfg.positions, False, site=site))
    sample = {layer: torch.cat([r[layer] for r, _, _ in first]) for layer in cfg.layers}

    def streamed(layer: int) -> Iterator[torch.Tensor]:
        return stream_batches(adapter, dataset, texts, train_plan, layer, cfg.positions, cfg.training.batch_size, cfg.store.shard_tokens, cfg.seed, site)

    return Source(streamed, eval_rows, sample, {"eval_batches": n_eval, "train_batches": len(train_plan)})


def _check_both_modalities(modality: torch.Tensor, what: str, fix: str) -> None:
    present = {int(m) for m in modality.unique()}
    if present != {0, 1}:
        raise XmodalError(f"{what} hold only {'image' if 1 in present else 'text'} tokens, so one modality cannot be scored; {fix}")


def _cat(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


# 2. ----------------------------------------------------------------------------------------
def train(cfg: SAETrainConfig, source: Source, layer: int, model_name: str, device: str, hook_name: str | None = None) -> Any:
    t = cfg.training
    return train_sae(
        source.train_batches(layer),
        source.sample[layer],
        layer,
        t.d_sae,
        t.k,
        t.training_tokens,
        t.batch_size,
        t.lr,
        cfg.seed,
        device,
        model_name,
        t.architecture.value,
        t.decoder_init.value,
        t.l0_coefficient,
        list(t.matryoshka_widths) or None,
        hook_name,
    )


# 3. ----------------------------------------------------------------------------------------
def evaluate(sae: Any, rows: torch.Tensor, modality: torch.Tensor, seed: int) -> list[dict[str, Any]]:
    """Per modality: FVE and L0 of the SAE, and the FVE of a null: each held-out row's
    coordinates permuted (same norms and value distribution, no learned structure)."""
    masks = {"image": modality == 1, "text": modality == 0}
    measured = sae_quality(sae, rows, masks)
    generator = torch.Generator().manual_seed(seed)
    shuffled = torch.stack([row[torch.randperm(len(row), generator=generator)] for row in rows])
    null = sae_quality(sae, shuffled, masks)
    return [m | {"fve_null_shuffled_dims": n["fve"]} for m, n in zip(measured, null)]


def train_saes(cfg: SAETrainConfig, progress: bool = True) -> pd.DataFrame:
    from sae_lens import SAE

    cfg.validate()
    out_dir = Path(cfg.out_dir).expanduser()
    (out_dir / "done.json").unlink(missing_ok=True)  # a rerun is unfinished until it finishes
    adapter = instantiate_model(OmegaConf.create(cfg.model))
    for layer in cfg.layers:
        adapter.check_layer(layer)
    dataset = instantiate(cfg.dataset)
    source = fill_store(cfg, adapter, dataset, progress)
    device = str(adapter.device)
    rows = []
    for layer in cfg.layers:
        start = time.perf_counter()
        log.info(
            "Layer %d: training a %s SAE (d_sae %d, k %d) on %d tokens",
            layer,
            cfg.training.architecture.value,
            cfg.training.d_sae,
            cfg.training.k,
            cfg.training.training_tokens,
        )
        sae = train(cfg, source, layer, adapter.name, device, adapter.hook_name(layer, cfg.store.site.value))
        seconds = time.perf_counter() - start
        save_sae(sae, out_dir / f"layer_{layer}")  # 4.
        saved = SAE.load_from_disk(out_dir / f"layer_{layer}", device=device, dtype="float32")
        eval_x, eval_modality = source.eval_rows[layer]
        for row in evaluate(saved, eval_x, eval_modality, cfg.seed):
            rows.append(
                {
                    "layer": layer,
                    "architecture": cfg.training.architecture.value,
                    "trained_on": "+".join(m.value for m in cfg.training.modalities),
                    **row,
                    "train_seconds": seconds,
                    "tokens_per_second": cfg.training.training_tokens / seconds,
                    **source.stats,
                }
            )
        log.info(
            "Layer %d held out: %s",
            layer,
            ", ".join(f"{r['tokens']} FVE {r['fve']:.3f} (null {r['fve_null_shuffled_dims']:.3f}) L0 {r['l0']:.1f}" for r in rows[-2:]),
        )
    table = pd.DataFrame(rows)
    atomic_write(out_dir / "quality.csv", lambda p: table.to_csv(p, index=False))
    atomic_write(
        out_dir / "done.json",
        lambda p: Path(p).write_text(
            json.dumps({"layers": cfg.layers, "sae_path": str(out_dir / "layer_{layer}"), "store": cfg.store.dir, "mode": cfg.store.mode.value})
        ),
    )
    at = "" if cfg.store.site == config_schema.SAESite.resid_post else f" sae.site={cfg.store.site.value}"
    log.info("Use them: python -m xmodal.run experiment=overlap sae=local 'sae.path=\"%s\"'%s layer=%d", out_dir.resolve() / "layer_{layer}", at, cfg.layers[0])
    return table


# The schema: a typo or a wrong type on the command line fails at once.
config_schema.register_configs()
ConfigStore.instance().store(name="sae_train_schema", node=SAETrainConfig)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="sae_train")
def main(cfg: DictConfig) -> None:
    try:
        table = train_saes(OmegaConf.to_object(cfg))
    except Exception as err:
        cause = user_error(err)
        if cause is None:
            raise
        log.error("%s", cause)
        raise SystemExit(2) from None
    print(table.to_string(index=False))


if __name__ == "__main__":
    main()
