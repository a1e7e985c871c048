"""Train the organism's vision tower and projector, LLaVA-style: ``python -m xmodal.organism.train``.

(``stage=instruct`` runs the second stage instead, projector and decoder on instruction
data: see ``xmodal.organism.instruct``. What follows is the first.)

Next-token loss on the caption given the image, in the same chat format xmodal
uses for images (user turn: the image; model turn: the caption). The language
model is frozen. To fit a CPU, the softmax during training runs over a candidate
set instead of all 262,144 tokens: every token any caption can use, plus the
decoder's strongest competitors (the top tokens of a full-vocabulary pass, refreshed
every `refresh_every` steps). Without the competitors, the caption words win only
against each other, and greedy decoding over the full vocabulary (how the organism
is evaluated) says something else entirely. Every batch is drawn fresh from the
world with a seed derived from the config seed and the step, so a run is
reproducible and resumable.

LLaVA starts from a vision tower pretrained elsewhere (CLIP); the organism's would
start from scratch, and a ViT learns slowly through a frozen 270M decoder on a CPU. So
training has two stages, as LLaVA's pipeline does in spirit:
1. vision pretraining (`pretrain_steps`): the SigLIP tower alone, with linear heads on
   its 4x4-pooled output (the grid the projector sees) classifying each scene's
   attributes (colour, shape, count, size, position, background, word), from the
   world's ground truth; cheap, since the decoder is not involved;
2. caption training (`steps`): the LLaVA objective above, projector trained at `lr`
   and the tower fine-tuned at `tower_lr_scale` x `lr` (LLaVA freezes it), with the
   attribute loss kept on at `attribute_weight` so the tower does not forget.
The heads are thrown away; only the vision tower and projector ship.

Writes to ``out_dir``: ``vision.safetensors`` (fp16, last, atomically),
``pretrain_log.csv`` and ``train_log.csv`` (the curves) and ``training_curves.png``.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import pandas as pd
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from xmodal.conf_dir import CONF_DIR
from xmodal.errors import ConfigError, XmodalError
from xmodal.organism import world
from xmodal.organism.model import build_organism, encode_captioned, organism, vision_state_dict

log = logging.getLogger("xmodal.organism.train")


class Stage(StrEnum):
    vision = "vision"  # stage 1: vision tower and projector, the decoder frozen (this module)
    instruct = "instruct"  # stage 2: projector and decoder (LoRA) on the instruction mix (xmodal.organism.instruct)


@dataclass
class TrainConfig:
    stage: Stage = Stage.vision
    seed: int = 0
    steps: int = 1500
    batch_size: int = 16
    lr: float = 1e-3
    warmup_steps: int = 50
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    word_fraction: float = 0.15
    pretrain_steps: int = 4000  # stage 1: vision tower + attribute heads alone
    pretrain_batch_size: int = 64
    pretrain_lr: float = 1e-3
    attribute_weight: float = 1.0  # stage 2: attribute loss beside the caption loss (0: captions only)
    tower_lr_scale: float = 1.0  # stage 2: the tower's learning rate as a fraction of lr
    log_every: int = 10
    refresh_every: int = 10  # steps between full-vocabulary passes that find competitor tokens
    competitors_per_position: int = 32
    max_candidates: int = 32768
    checkpoint_every: int = 100
    resume: bool = True  # continue from out_dir/checkpoint.pt if it is there
    # Start stage 2 from these vision weights (e.g. the shipped ones) and skip stage 1: a second round
    # of caption training. The attribute heads start fresh (they are not shipped).
    init_vision: str | None = None
    # Stage 2 (stage=instruct): init_vision defaults to the shipped stage-1 weights.
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    lora_lr_scale: float = 1.0  # the adapters' learning rate as a fraction of lr
    kind_weights: list[float] = field(default_factory=lambda: [0.3, 0.35, 0.35])  # caption, image question, text question
    # The planted positive control (model=organism_planted only): pull image tokens towards the colour word at align_layer.
    align_weight: float = 0.0
    align_layer: int | None = None
    device: str = "auto"
    out_dir: str = "outputs/organism_train"
    model_cache: str = "~/.cache/xmodal/models"


def caption_vocabulary(tokenizer: Any) -> torch.Tensor:
    """Every token id that any caption (or the end-of-turn after it) can contain."""
    captions = set()
    for colour, shape, size, position, background in itertools.product(world.COLOURS, world.SHAPES, world.SIZES, world.POSITIONS, world.BACKGROUNDS):
        captions.add(world.Scene("shapes", colour, shape, size, 1, position, background).caption)
        for count in (2, 3):
            captions.add(world.Scene("shapes", colour, shape, "small", count, "", background).caption)
    captions.update(world.Scene("words", word=w).caption for w in world.WORDS)
    ids = {tokenizer.convert_tokens_to_ids("<end_of_turn>")}
    for caption in captions:
        ids.update(tokenizer(caption, add_special_tokens=False)["input_ids"])
    return torch.tensor(sorted(ids))


class CaptionBatches:
    """Tokenised (image, caption) batches; `targets` is -100 outside the caption and end of turn."""

    def __init__(self, adapter: Any, word_fraction: float) -> None:
        self.adapter = adapter
        self.word_fraction = word_fraction

    def __call__(self, seed: int, batch_size: int) -> dict[str, torch.Tensor]:
        pairs = list(world.captioned_images(seed, batch_size, self.word_fraction))
        enc, caption_start = encode_captioned(self.adapter, pairs)
        targets = enc["input_ids"].roll(-1, dims=1)
        loss_mask = torch.zeros_like(targets, dtype=torch.bool)
        loss_mask[:, caption_start - 1 :] = True  # predict caption tokens and <end_of_turn>
        loss_mask &= enc["attention_mask"].roll(-1, dims=1).bool()
        loss_mask[:, -1] = False
        return {**enc, "targets": torch.where(loss_mask, targets, torch.full_like(targets, -100)), **attribute_targets([s for _, s in pairs])}


ATTRIBUTES: dict[str, list[Any]] = {
    "colour": list(world.COLOURS),
    "shape": list(world.SHAPES),
    "count": list(world.COUNTS),
    "size": list(world.SIZES),
    "position": list(world.POSITIONS),
    "background": list(world.BACKGROUNDS),
    "word": list(world.WORDS),
}


def attribute_targets(scenes: list[world.Scene]) -> dict[str, torch.Tensor]:
    """Class index of each attribute per scene; -100 where the scene has no such attribute."""
    out = {}
    for attribute, values in ATTRIBUTES.items():
        labels = []
        for scene in scenes:
            value = getattr(scene, attribute)
            multiple = attribute == "size" and scene.count > 1  # several shapes are always "small" in captions
            applies = value in values and not multiple and not (attribute == "count" and scene.kind == "words")
            labels.append(values.index(value) if applies else -100)
        out[f"attribute_{attribute}"] = torch.tensor(labels)
    return out


class AttributeHeads(torch.nn.Module):
    """Linear classifiers of scene attributes on the vision tower's output pooled to the projector's grid."""

    def __init__(self, width: int, grid: int) -> None:
        super().__init__()
        self.grid = grid
        self.heads = torch.nn.ModuleDict({a: torch.nn.Linear(width * grid * grid, len(v)) for a, v in ATTRIBUTES.items()})

    def pool(self, patch_states: torch.Tensor) -> torch.Tensor:
        batch, patches, width = patch_states.shape
        side = int(patches**0.5)
        grid = patch_states.transpose(1, 2).reshape(batch, width, side, side)
        return torch.nn.functional.avg_pool2d(grid, side // self.grid).flatten(1)

    def losses(self, patch_states: torch.Tensor, batch: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, float]]:
        """Per attribute: (loss, accuracy) over the scenes that have it."""
        pooled = self.pool(patch_states)
        out = {}
        for attribute, head in self.heads.items():
            labels = batch[f"attribute_{attribute}"]
            known = labels != -100
            if known.any():
                logits = head(pooled[known])
                accuracy = (logits.argmax(-1) == labels[known]).float().mean().item()
                out[attribute] = (torch.nn.functional.cross_entropy(logits, labels[known]), accuracy)
        return out

    def loss(self, patch_states: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.stack([loss for loss, _ in self.losses(patch_states, batch).values()]).mean()


def pretrain_vision(model: torch.nn.Module, heads: AttributeHeads, processor: Any, cfg: "TrainConfig", out_dir: Path) -> None:
    """Stage 1: the vision tower and attribute heads alone, on fresh world images.

    Checkpoints every `checkpoint_every` steps to pretrain_checkpoint.pt; with `resume` a killed
    run goes on from there and ends with the same weights (batches are seeded by step).
    """
    from tqdm.auto import tqdm

    tower = model.model.vision_tower
    optimizer = torch.optim.AdamW([*tower.parameters(), *heads.parameters()], lr=cfg.pretrain_lr, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg.warmup_steps, cfg.pretrain_steps))
    start_step, rows, device = 0, [], next(tower.parameters()).device
    checkpoint = out_dir / "pretrain_checkpoint.pt"
    if cfg.resume and checkpoint.exists():
        state = torch.load(checkpoint, map_location=device, weights_only=True)
        tower.load_state_dict(state["tower"])
        heads.load_state_dict(state["heads"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        start_step, rows = int(state["step"]), list(state["rows"])
        log.info("Resuming vision pretraining from step %d (%s)", start_step, checkpoint)
    progress = tqdm(range(start_step, cfg.pretrain_steps), desc="organism vision pretraining", initial=start_step, total=cfg.pretrain_steps)
    for step in progress:
        pairs = list(world.captioned_images(cfg.seed * 1_000_003 + 50_000_000 + step, cfg.pretrain_batch_size, cfg.word_fraction))
        pixels = processor.image_processor([image for image, _ in pairs], return_tensors="pt")["pixel_values"].to(device)
        labels = {k: v.to(device) for k, v in attribute_targets([scene for _, scene in pairs]).items()}
        per_attribute = heads.losses(tower(pixel_values=pixels).last_hidden_state, labels)
        loss = torch.stack([loss for loss, _ in per_attribute.values()]).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tower.parameters(), cfg.grad_clip)
        optimizer.step()
        schedule.step()
        rows.append({"step": step + 1, "loss": loss.item(), **{f"accuracy_{a}": acc for a, (_, acc) in per_attribute.items()}})
        progress.set_postfix(loss=f"{loss.item():.3f}")
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.pretrain_steps:
            frame = pd.DataFrame(rows)
            tmp = out_dir / "pretrain_log.csv.tmp"
            frame.groupby((frame["step"] - 1) // cfg.log_every).mean().assign(step=lambda f: f["step"].round()).to_csv(tmp, index=False)
            tmp.replace(out_dir / "pretrain_log.csv")
        if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.pretrain_steps:
            state = {
                "tower": tower.state_dict(),
                "heads": heads.state_dict(),
                "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict(),
                "step": step + 1,
                "rows": rows,
            }
            torch.save(state, checkpoint.with_suffix(".tmp"))
            checkpoint.with_suffix(".tmp").replace(checkpoint)


class CandidateVocabulary:
    """The tokens the training softmax runs over: caption tokens plus competitors found on the way."""

    def __init__(self, caption_tokens: torch.Tensor, vocab_size: int, max_candidates: int) -> None:
        self.caption_tokens = caption_tokens
        self.vocab_size = vocab_size
        self.max_candidates = max_candidates
        self.competitors = torch.empty(0, dtype=torch.long, device=caption_tokens.device)
        self.rebuild()

    def add_competitors(self, full_logits: torch.Tensor, per_position: int) -> None:
        found = full_logits.topk(per_position, dim=-1).indices.flatten()
        # Newest first, so the cap drops the competitors seen longest ago.
        merged = torch.cat([found, self.competitors])
        unique, first = _first_occurrence(merged)
        self.competitors = unique[first.argsort()][: self.max_candidates]
        self.rebuild()

    def rebuild(self) -> None:
        self.ids = torch.unique(torch.cat([self.caption_tokens, self.competitors]))
        self.index = torch.full((self.vocab_size,), -100, dtype=torch.long, device=self.ids.device)
        self.index[self.ids] = torch.arange(len(self.ids), device=self.ids.device)


def _first_occurrence(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    unique, inverse = torch.unique(values, return_inverse=True)
    first = torch.full((len(unique),), len(values), dtype=torch.long, device=values.device)
    first.scatter_reduce_(0, inverse, torch.arange(len(values), device=values.device), reduce="amin")
    return unique, first


def caption_hidden(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Final hidden states at the positions that predict caption tokens, and those tokens."""
    out = model.model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        pixel_values=batch["pixel_values"],
        token_type_ids=batch["token_type_ids"],
    )
    positions = batch["targets"] != -100
    return out.last_hidden_state[positions], batch["targets"][positions]


def train(cfg: TrainConfig) -> Path:
    if cfg.init_vision is not None and not Path(cfg.init_vision).is_file():
        raise ConfigError(f"init_vision={cfg.init_vision!r} is not a file; give the vision.safetensors to start from, or null")
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    adapter = organism(model_cache=cfg.model_cache, device=cfg.device)
    device = adapter.device
    model = build_organism(cfg.model_cache, cfg.init_vision, init_seed=cfg.seed).to(device)
    model.requires_grad_(False)
    trained = [p for name, p in model.named_parameters() if name.startswith(("model.vision_tower.", "model.multi_modal_projector."))]
    for p in trained:
        p.requires_grad_(True)
    model.train()
    grid = int(model.config.mm_tokens_per_image**0.5)
    heads = AttributeHeads(model.config.vision_config.hidden_size, grid).to(device)
    pretrained = out_dir / "pretrained_vision.pt"
    if cfg.init_vision is not None:
        log.info("Starting caption training from %s (no vision pretraining)", cfg.init_vision)
    elif cfg.resume and pretrained.exists():
        state = torch.load(pretrained, map_location=device, weights_only=True)
        model.model.vision_tower.load_state_dict(state["tower"])
        heads.load_state_dict(state["heads"])
        log.info("Vision pretraining done earlier: %s", pretrained)
    elif cfg.pretrain_steps > 0:
        pretrain_vision(model, heads, adapter.processor, cfg, out_dir)
        torch.save({"tower": model.model.vision_tower.state_dict(), "heads": heads.state_dict()}, out_dir / "pretrained_vision.pt.tmp")
        (out_dir / "pretrained_vision.pt.tmp").replace(pretrained)
        (out_dir / "pretrain_checkpoint.pt").unlink(missing_ok=True)  # pretrained_vision.pt supersedes it
    vision_out: dict[str, torch.Tensor] = {}
    model.model.vision_tower.register_forward_hook(lambda m, a, out: vision_out.__setitem__("patches", out.last_hidden_state))
    unembedding = model.lm_head.weight  # tied to the input embedding, frozen
    candidates = CandidateVocabulary(caption_vocabulary(adapter.tokenizer).to(device), unembedding.shape[0], cfg.max_candidates)
    batches = CaptionBatches(adapter, cfg.word_fraction)
    # The pretrained tower moves slowly (LLaVA freezes it): caption gradients from a fresh projector would wreck it.
    tower = [p for name, p in model.named_parameters() if name.startswith("model.vision_tower.")]
    projector = [p for name, p in model.named_parameters() if name.startswith("model.multi_modal_projector.")]
    optimizer = torch.optim.AdamW(
        [{"params": projector + list(heads.parameters())}, {"params": tower, "lr": cfg.lr * cfg.tower_lr_scale}],
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg.warmup_steps, cfg.steps))
    log.info("Training %d parameters; %d caption tokens", sum(p.numel() for p in trained), len(candidates.caption_tokens))

    start_step, rows = 0, []
    checkpoint = out_dir / "checkpoint.pt"
    if cfg.resume and checkpoint.exists():
        state = torch.load(checkpoint, map_location=device, weights_only=True)
        model.load_state_dict(state["vision"], strict=False)
        heads.load_state_dict(state["heads"])
        candidates.competitors = state["competitors"].to(device)
        candidates.rebuild()
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        start_step = int(state["step"])
        rows = pd.read_csv(out_dir / "train_log.csv").query("step <= @start_step").to_dict("records")
        log.info("Resuming from step %d (%s)", start_step, checkpoint)

    from tqdm.auto import tqdm

    progress = tqdm(range(start_step, cfg.steps), desc="organism", initial=start_step, total=cfg.steps)
    recent: list[float] = []
    recent_attribute: list[float] = []
    full_losses: list[tuple[int, float]] = []
    for step in progress:
        batch = {k: v.to(device) for k, v in batches(seed=cfg.seed * 1_000_003 + step, batch_size=cfg.batch_size).items()}
        t0 = time.perf_counter()
        hidden, targets = caption_hidden(model, batch)
        full_loss = float("nan")
        if step % cfg.refresh_every == 0:
            with torch.no_grad():  # the full vocabulary: the loss greedy decoding answers to
                full_logits = hidden.detach() @ unembedding.T
                full_loss = torch.nn.functional.cross_entropy(full_logits, targets).item()
                candidates.add_competitors(full_logits, cfg.competitors_per_position)
                del full_logits
        logits = hidden @ unembedding[candidates.ids].T
        loss = torch.nn.functional.cross_entropy(logits, candidates.index[targets])
        attribute_loss = heads.loss(vision_out["patches"], batch)
        optimizer.zero_grad(set_to_none=True)
        (loss + cfg.attribute_weight * attribute_loss).backward()
        torch.nn.utils.clip_grad_norm_(trained, cfg.grad_clip)
        optimizer.step()
        schedule.step()
        recent.append(loss.item())
        recent_attribute.append(attribute_loss.item())
        if not math.isnan(full_loss):
            full_losses.append((step + 1, full_loss))
        progress.set_postfix(loss=f"{np.mean(recent[-cfg.log_every :]):.3f}")
        if (step + 1) % cfg.log_every == 0:
            rows.append(
                {
                    "step": step + 1,
                    "loss": float(np.mean(recent[-cfg.log_every :])),
                    "attribute_loss": float(np.mean(recent_attribute[-cfg.log_every :])),
                    "full_vocab_loss": full_losses[-1][1] if full_losses else float("nan"),
                    "candidates": len(candidates.ids),
                    "lr": schedule.get_last_lr()[0],
                    "seconds_per_step": time.perf_counter() - t0,
                }
            )
            _write_log(out_dir, rows)
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            state = {
                "vision": vision_state_dict(model),
                "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict(),
                "step": step + 1,
                "competitors": candidates.competitors,
                "heads": heads.state_dict(),
            }
            torch.save(state, out_dir / "checkpoint.pt.tmp")
            (out_dir / "checkpoint.pt.tmp").replace(checkpoint)
    save_vision(model, out_dir / "vision.safetensors")
    plot_training(out_dir)
    return out_dir / "vision.safetensors"


def lr_factor(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup)))) * 0.95 + 0.05


def _write_log(out_dir: Path, rows: list[dict[str, Any]]) -> None:
    tmp = out_dir / "train_log.csv.tmp"
    pd.DataFrame(rows).to_csv(tmp, index=False)
    tmp.replace(out_dir / "train_log.csv")


def save_vision(model: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().to(torch.float16).contiguous().cpu() for k, v in vision_state_dict(model).items()}
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp), metadata={"format": "pt", "what": "xmodal organism vision tower + projector"})
    tmp.replace(path)
    log.info("Wrote %s", path)


def plot_training(out_dir: str | Path) -> Path:
    """training_curves.png: stage 1 attribute accuracies, stage 2 caption losses."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    if (out_dir / "pretrain_log.csv").exists():
        pretrain = pd.read_csv(out_dir / "pretrain_log.csv")
        for column in [c for c in pretrain.columns if c.startswith("accuracy_")]:
            ax1.plot(pretrain["step"], pretrain[column], label=column.removeprefix("accuracy_"))
        ax1.set(xlabel="step", ylabel="training-batch accuracy", ylim=(0, 1.02), title="stage 1: vision pretraining")
        ax1.legend(fontsize=7, ncol=2, loc="lower right")
    curve = pd.read_csv(out_dir / "train_log.csv")
    ax2.plot(curve["step"], curve["loss"], label="caption loss (candidate vocabulary)")
    ax2.plot(curve["step"], curve["full_vocab_loss"], ".", ms=3, label="caption loss, full vocabulary (each refresh)")
    if "attribute_loss" in curve:
        ax2.plot(curve["step"], curve["attribute_loss"], label="attribute loss")
    ax2.set(xlabel="step", ylabel="nats per token", yscale="log", title="stage 2: caption training (LLaVA objective)")
    ax2.legend(fontsize=7)
    return save_png(fig, out_dir / "training_curves.png")


def save_png(fig: Any, path: Path) -> Path:
    """A training figure to `path` (tight layout, 120 dpi), then closed."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# The schema: a typo or a wrong type in conf/organism_train.yaml or on the command line fails at once.
ConfigStore.instance().store(name="organism_train_schema", node=TrainConfig)


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="organism_train")
def main(cfg: DictConfig) -> None:
    train_cfg = OmegaConf.to_object(cfg)
    torch.manual_seed(train_cfg.seed)
    try:
        if train_cfg.stage == Stage.instruct:
            from xmodal.organism.instruct import train_instruct

            train_instruct(train_cfg)
        else:
            train(train_cfg)
    except XmodalError as err:  # a user's mistake: one line and exit 2, as `python -m xmodal.run` does
        log.error("%s", err)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
