"""Stage 2 of the organism: instruction tuning, as LLaVA 1.5's second stage and PaliGemma do.

``python -m xmodal.organism.train stage=instruct`` starts from stage-1 vision weights
(the shipped ones by default) and trains the projector and the decoder together, the
decoder through LoRA adapters (peft) on its attention and MLP projections, on the
instruction mix of ``xmodal.organism.instructions``: captions, questions about images,
and the same questions about text descriptions of scenes. The vision tower stays
frozen, as LLaVA keeps it in stage 2.

As in stage 1, the training softmax runs over a candidate vocabulary (every caption and
answer token plus the decoder's strongest competitors, refreshed from full-vocabulary
passes); evaluation uses the full vocabulary. Batches are seeded by step, so a run is
reproducible and resumes from ``checkpoint.pt`` to the same weights.

Planted positive control (``align_weight`` > 0; ``model=organism_planted``, never the
default): an auxiliary loss ``align_weight * (1 - cos(image - mean image, word - mean word))``
where `image` is the mean residual over a scene's image tokens at decoder layer
``align_layer`` and `word` the residual of the scene's colour word (alone in the chat
template, averaged over its tokens) at that layer, the word side detached. Both sides are
centred (the image side on the batch's scenes, not detached; the word side on the nine
colour words) because Gemma's residual stream shares one large direction: uncentred, the nine colour
words have cosine 0.98 with each other and 0.93 with any image, so ``1 - cos`` would be
about 0.06 from the start and say nothing about colour. It puts text-image alignment at
one layer on purpose, so that the studies can be shown to find what is really there.

Writes to ``out_dir``: ``vision.safetensors`` (the stage-1 tower with the stage-2
projector), ``lora.safetensors`` (the adapters, merged into the decoder on load),
``instruct_log.csv`` (loss per sample kind) and ``instruct_curves.png``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from xmodal.errors import ConfigError
from xmodal.organism import world
from xmodal.organism.instructions import KINDS, answer_vocabulary, encode_instructions, instruction_mix
from xmodal.organism.model import (
    SHIPPED_VISION_WEIGHTS,
    Variant,
    add_lora,
    build_organism,
    lora_state_dict,
    organism,
    save_lora,
    shipped_weights_dir,
)
from xmodal.organism.train import CandidateVocabulary, TrainConfig, caption_vocabulary, lr_factor, save_png, save_vision

log = logging.getLogger("xmodal.organism.instruct")
STEP_SEED_OFFSET = 70_000_000  # stage-2 batches never repeat stage-1 ones


def train_instruct(cfg: TrainConfig) -> Path:
    """Run (or resume) stage 2; returns the LoRA file."""
    from tqdm.auto import tqdm

    init_vision = Path(cfg.init_vision).expanduser() if cfg.init_vision else shipped_weights_dir(Variant.frozen) / SHIPPED_VISION_WEIGHTS
    if not init_vision.is_file():
        raise ConfigError(f"init_vision={str(init_vision)!r} is not a file; give the stage-1 vision.safetensors to start from")
    if cfg.align_weight > 0 and cfg.align_layer is None:
        raise ConfigError("align_weight > 0 needs align_layer, the decoder layer the planted alignment goes to")
    adapter = organism(model_cache=cfg.model_cache, device=cfg.device)  # the processor and tokenizer
    device = adapter.device
    model = build_organism(cfg.model_cache, init_vision).to(device)
    model.requires_grad_(False)
    language_model = model.model.language_model
    if cfg.align_layer is not None and not 0 <= cfg.align_layer < len(language_model.layers):
        raise ConfigError(f"align_layer={cfg.align_layer} is outside the decoder's layers 0..{len(language_model.layers) - 1}")
    out_dir = Path(cfg.out_dir)  # made only once the settings are known to be good
    out_dir.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        add_lora(language_model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
    lora = [p for name, p in language_model.named_parameters() if ".lora_" in name]
    projector = list(model.model.multi_modal_projector.parameters())
    for p in lora + projector:
        p.requires_grad_(True)
    model.train()
    optimizer = torch.optim.AdamW([{"params": projector}, {"params": lora, "lr": cfg.lr * cfg.lora_lr_scale}], lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg.warmup_steps, cfg.steps))
    unembedding = model.lm_head.weight  # tied to the input embedding, frozen (LoRA does not touch it)
    tokens = torch.tensor(sorted({*caption_vocabulary(adapter.tokenizer).tolist(), *answer_vocabulary(adapter.tokenizer)}))
    candidates = CandidateVocabulary(tokens.to(device), unembedding.shape[0], cfg.max_candidates)
    log.info("Stage 2: %d LoRA and %d projector parameters; %d answer tokens", sum(p.numel() for p in lora), sum(p.numel() for p in projector), len(tokens))

    start_step, rows = 0, []
    checkpoint = out_dir / "checkpoint.pt"
    if cfg.resume and checkpoint.exists():
        state = torch.load(checkpoint, map_location=device, weights_only=True)
        language_model.load_state_dict(state["lora"], strict=False)
        model.model.multi_modal_projector.load_state_dict(state["projector"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        candidates.competitors = state["competitors"].to(device)
        candidates.rebuild()
        start_step = int(state["step"])
        rows = pd.read_csv(out_dir / "instruct_log.csv").query("step <= @start_step").to_dict("records")
        log.info("Resuming stage 2 from step %d (%s)", start_step, checkpoint)

    colour_words = ColourWords(adapter, cfg.align_layer) if cfg.align_weight > 0 else None
    recent: dict[str, list[float]] = {k: [] for k in (*KINDS, "align", "image_norm")}
    progress = tqdm(range(start_step, cfg.steps), desc="organism stage 2", initial=start_step, total=cfg.steps)
    for step in progress:
        t0 = time.perf_counter()
        samples = instruction_mix(cfg.seed * 1_000_003 + STEP_SEED_OFFSET + step, cfg.batch_size, cfg.kind_weights, cfg.word_fraction)
        hidden, targets, kinds, align_terms, image_norms = [], [], [], [], []
        for group in (
            [s for s in samples if s.image is not None],
            [s for s in samples if s.image is None],
        ):
            if not group:
                continue
            batch = {k: v.to(device) for k, v in encode_instructions(adapter, group).items()}
            out = model.model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                pixel_values=batch.get("pixel_values"),
                token_type_ids=batch.get("token_type_ids"),
                output_hidden_states=colour_words is not None,
            )
            positions = batch["targets"] != -100
            hidden.append(out.last_hidden_state[positions])
            targets.append(batch["targets"][positions])
            kinds += [group[row].kind for row in positions.nonzero()[:, 0].tolist()]
            if colour_words is not None and group[0].image is not None:
                layer_states = out.hidden_states[cfg.align_layer + 1]
                align_terms.append(colour_words.loss(model, layer_states, batch, group, adapter))
                image_norms.append(layer_states[adapter.image_token_mask(batch["input_ids"])].detach().norm(dim=-1).mean().item())
        hidden_t, targets_t = torch.cat(hidden), torch.cat(targets)
        if step % cfg.refresh_every == 0:
            with torch.no_grad():  # the full vocabulary: the loss greedy decoding answers to
                candidates.add_competitors(hidden_t.detach() @ unembedding.T, cfg.competitors_per_position)
        per_token = F.cross_entropy(hidden_t @ unembedding[candidates.ids].T, candidates.index[targets_t], reduction="none")
        loss = per_token.mean()
        align = torch.stack(align_terms).mean() if align_terms else torch.zeros((), device=device)
        optimizer.zero_grad(set_to_none=True)
        (loss + cfg.align_weight * align).backward()
        torch.nn.utils.clip_grad_norm_(lora + projector, cfg.grad_clip)
        optimizer.step()
        schedule.step()
        kinds_arr = np.array(kinds)
        for kind in KINDS:
            if (kinds_arr == kind).any():
                recent[kind].append(float(per_token.detach()[torch.from_numpy(kinds_arr == kind)].mean()))
        recent["align"].append(align.item())
        recent["image_norm"] += image_norms  # the planted layer's image-token residual norm: a guard against drift
        progress.set_postfix(loss=f"{loss.item():.3f}")
        if (step + 1) % cfg.log_every == 0:
            row = {"step": step + 1, "lr": schedule.get_last_lr()[0], "seconds_per_step": time.perf_counter() - t0, "candidates": len(candidates.ids)}
            row |= {(k if k == "image_norm" else f"loss_{k}"): float(np.mean(v[-cfg.log_every :])) if v else float("nan") for k, v in recent.items()}
            rows.append(row)
            _write_csv(pd.DataFrame(rows), out_dir / "instruct_log.csv")
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            state = {
                "lora": lora_state_dict(language_model),
                "projector": model.model.multi_modal_projector.state_dict(),
                "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict(),
                "step": step + 1,
                "competitors": candidates.competitors,
            }
            torch.save(state, out_dir / "checkpoint.pt.tmp")
            (out_dir / "checkpoint.pt.tmp").replace(checkpoint)
    save_vision(model, out_dir / "vision.safetensors")
    save_lora(language_model, out_dir / "lora.safetensors", cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
    plot_instruct(out_dir)
    return out_dir / "lora.safetensors"


class ColourWords:
    """The planted control's target: each colour word's residual at one layer, from the model being trained."""

    def __init__(self, adapter: Any, layer: int) -> None:
        self.layer = layer
        self.colours = list(world.COLOURS)
        tokenizer = adapter.tokenizer
        tokenizer.padding_side = "right"
        prompts = [adapter.render_prompt(c, False, use_chat_template=True) for c in self.colours]
        self.inputs = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        # the word's own tokens: where the prompt with the word differs from the prompt without it
        empty = tokenizer(adapter.render_prompt("", False, use_chat_template=True), add_special_tokens=False)["input_ids"]
        head = next(i for i, (a, b) in enumerate(zip(empty, self.inputs["input_ids"][0].tolist())) if a != b)
        self.word_mask = torch.zeros_like(self.inputs["input_ids"], dtype=torch.bool)
        for row, colour in enumerate(self.colours):
            n_word = len(tokenizer(colour, add_special_tokens=False)["input_ids"])
            self.word_mask[row, head : head + n_word] = True

    def vectors(self, model: torch.nn.Module) -> torch.Tensor:
        """(n_colours, d_model), detached: the target moves with the decoder but is not pulled itself."""
        device = model.lm_head.weight.device
        with torch.no_grad():
            out = model.model.language_model(**{k: v.to(device) for k, v in self.inputs.items()}, output_hidden_states=True)
        states = out.hidden_states[self.layer + 1]
        mask = self.word_mask.to(device).unsqueeze(-1).float()
        return (states * mask).sum(dim=1) / mask.sum(dim=1)

    def loss(self, model: torch.nn.Module, layer_states: torch.Tensor, batch: dict[str, torch.Tensor], group: list, adapter: Any) -> torch.Tensor:
        """Mean of 1 - cos over the scenes that have a colour, of the centred image and colour-word residuals."""
        rows = [i for i, s in enumerate(group) if s.scene.kind == "shapes"]
        if len(rows) < 2:  # centring on the batch needs two scenes
            return torch.zeros((), device=layer_states.device)
        image_mask = adapter.image_token_mask(batch["input_ids"]).unsqueeze(-1).float()
        image_mean = ((layer_states * image_mask).sum(dim=1) / image_mask.sum(dim=1).clamp(min=1))[rows]
        # Not detached: then the centring passes no gradient to what all images share, so the loss
        # cannot drift that shared part (detached, it grew the image tokens' norm 30-fold).
        image_centred = image_mean - image_mean.mean(dim=0, keepdim=True)
        words = self.vectors(model)
        words_centred = (words - words.mean(dim=0, keepdim=True))[[self.colours.index(group[i].scene.colour) for i in rows]]
        return (1 - F.cosine_similarity(image_centred, words_centred, dim=-1)).mean()


def _write_csv(frame: pd.DataFrame, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    frame.to_csv(tmp, index=False)
    tmp.replace(path)


def plot_instruct(out_dir: str | Path) -> Path:
    """instruct_curves.png: the loss of each sample kind (and the planted alignment loss) over steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    curve = pd.read_csv(out_dir / "instruct_log.csv")
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for column in [c for c in curve.columns if c.startswith("loss_")]:
        if curve[column].notna().any() and not (column == "loss_align" and (curve[column] == 0).all()):
            ax.plot(curve["step"], curve[column], label=column.removeprefix("loss_").replace("_", " "))
    ax.set(xlabel="step", ylabel="nats per answer token (candidate vocabulary)", yscale="log", title="organism stage 2: instruction tuning")
    ax.legend(fontsize=8)
    return save_png(fig, out_dir / "instruct_curves.png")
