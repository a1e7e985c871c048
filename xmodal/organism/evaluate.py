"""Score the organism: ``python -m xmodal.organism.evaluate``.

1. Captions: greedy captions (full vocabulary, no restriction) of held-out world
   images, scored per attribute against the scene they were drawn from, next to the
   same captions scored against a shuffled scene (the chance a caption is right by
   saying the commonest words).
2. SAEs: the shipped SAEs on held-out residuals, image tokens and text tokens
   apart: fraction of variance explained, L0 and dead features.
3. Questions (stage 2): greedy one-word answers to held-out questions about images and
   about text descriptions, per question type, beside a shuffled-answer null.
4. The decoder: KL of its next-token distribution from gemma-3-270m's on 50 fixed
   English prompts (zero for a frozen decoder).

Writes ``captions.csv``, ``caption_accuracy.csv``, ``answers.csv``, ``question_accuracy.csv``,
``english_kl.csv``, ``sae_quality.csv`` and ``organism_eval.png`` to ``out_dir``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import pandas as pd
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from scipy.stats import binomtest

from xmodal.conf_dir import CONF_DIR
from xmodal.models.base import ModelAdapter
from xmodal.models.generation import describe_images
from xmodal.organism import world
from xmodal.organism.instructions import QUESTION_TYPES, Instruction, instruction_mix
from xmodal.organism.language_model import load_language_model
from xmodal.organism.model import organism
from xmodal.organism.saes import SAE_LAYERS, gather_activations, organism_sae, sae_quality, shipped_widths

log = logging.getLogger("xmodal.organism.evaluate")
ATTRIBUTES = ("colour", "shape", "count", "size", "position", "background", "word")


@dataclass
class EvalConfig:
    seed: int = 31337  # held-out: training draws seeds 0..steps-1
    n_images: int = 300
    batch_size: int = 16
    max_new_tokens: int = 16
    sae_seed: int = 424242
    n_sae_images: int = 400
    variant: str = "instruct"  # the shipped organism to score: instruct (stage 2) | frozen (stage 1) | planted
    vision_weights: str | None = None  # replace the variant's vision weights (e.g. a training run's)
    lora_weights: str | None = None  # replace the variant's decoder LoRA (a stage-2 lora.safetensors)
    n_questions: int = 600  # held-out instruction samples (half image, half text questions); 0: none
    english_kl: bool = True  # the decoder against gemma-3-270m on 50 English prompts
    device: str = "auto"
    out_dir: str = "outputs/organism_eval"
    model_cache: str = "~/.cache/xmodal/models"


def generate_captions(adapter: ModelAdapter, images: list[Any], batch_size: int = 16, max_new_tokens: int = 16) -> list[str]:
    """Greedy captions over the full vocabulary, in the chat format the organism was trained in."""
    return describe_images(adapter, images, "", True, max_new_tokens, batch_size)


def parse_caption(caption: str) -> dict[str, Any]:
    """What a caption says, in the world's terms ("" where it says nothing)."""
    words = caption.lower().split()
    text = " ".join(words)
    found: dict[str, Any] = {a: "" for a in ATTRIBUTES}
    if text.startswith("the word"):
        found["word"] = words[2] if len(words) > 2 else ""
        return found
    found["colour"] = next((w for w in words if w in world.COLOURS), "")
    singular = [_singular(w) for w in words]
    found["shape"] = next((w for w in singular if w in world.SHAPES), "")
    counts = {v: k for k, v in world.COUNTS.items()}
    found["count"] = counts.get(words[0], "") if words else ""
    found["size"] = next((w for w in words if w in world.SIZES), "")
    found["position"] = next((p for p in world.POSITIONS if p in text), "")
    found["background"] = next((b for b, phrase in world.BACKGROUND_PHRASES.items() if phrase and phrase in text), "plain")
    return found


def _singular(word: str) -> str:
    """'squares' -> 'square', 'crosses' -> 'cross'; other words unchanged."""
    for suffix in ("es", "s"):
        if word.endswith(suffix) and word[: -len(suffix)] in world.SHAPES:
            return word[: -len(suffix)]
    return word


def truth(scene: world.Scene) -> dict[str, Any]:
    if scene.kind == "words":
        return {a: None for a in ATTRIBUTES} | {"word": scene.word}
    return {
        "colour": scene.colour,
        "shape": scene.shape,
        "count": scene.count,
        "size": scene.size if scene.count == 1 else None,
        "position": scene.position or None,
        "background": scene.background,
        "word": None,
    }


def caption_accuracy(captions: list[str], scenes: list[world.Scene], seed: int) -> pd.DataFrame:
    """Accuracy per attribute (with a Wilson 95% interval), against the true scene and against a shuffled one (the null)."""
    parsed = [parse_caption(c) for c in captions]
    shuffled = np.random.default_rng(seed).permutation(len(scenes))
    rows = []
    for attribute in ATTRIBUTES:
        hits, null_hits = [], []
        for i, found in enumerate(parsed):
            expected, other = truth(scenes[i])[attribute], truth(scenes[shuffled[i]])[attribute]
            if expected is not None:
                hits.append(found[attribute] == expected)
            if expected is not None and other is not None:
                null_hits.append(found[attribute] == other)
        interval = binomtest(int(np.sum(hits)), len(hits)).proportion_ci(method="wilson") if hits else None
        rows.append(
            {
                "attribute": attribute,
                "n_images": len(hits),
                "accuracy": float(np.mean(hits)) if hits else float("nan"),
                "accuracy_ci_low": interval.low if interval else float("nan"),
                "accuracy_ci_high": interval.high if interval else float("nan"),
                "shuffled_scene_accuracy": float(np.mean(null_hits)) if null_hits else float("nan"),
            }
        )
    return pd.DataFrame(rows)


@torch.inference_mode()
def answer_questions(adapter: ModelAdapter, samples: list[Instruction], batch_size: int = 16, max_new_tokens: int = 4) -> list[str]:
    """Greedy answers (full vocabulary) to instruction samples, in their order; image and text questions alike."""
    answers: dict[int, str] = {}
    by_prompt: dict[str, list[int]] = {}
    for i, sample in enumerate(samples):
        if sample.image is not None:
            by_prompt.setdefault(sample.prompt, []).append(i)
    for prompt, rows in by_prompt.items():  # describe_images takes one prompt per call
        said = describe_images(adapter, [samples[i].image for i in rows], prompt, True, max_new_tokens, batch_size)
        answers |= dict(zip(rows, said))
    text_rows = [i for i, s in enumerate(samples) if s.image is None]
    tokenizer = adapter.tokenizer
    tokenizer.padding_side = "left"  # generation continues from the last position of every row
    for start in range(0, len(text_rows), batch_size):
        rows = text_rows[start : start + batch_size]
        prompts = [adapter.render_prompt(samples[i].prompt, False, use_chat_template=True) for i in rows]
        inputs = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(adapter.device)
        out = adapter.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        said = tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        answers |= dict(zip(rows, (s.strip() for s in said)))
    return [answers[i] for i in range(len(samples))]


def first_word(answer: str) -> str:
    words = answer.lower().replace(".", " ").replace(",", " ").split()
    return words[0] if words else ""


def question_accuracy(answers: list[str], samples: list[Instruction], seed: int) -> pd.DataFrame:
    """Accuracy per (kind, question type) with a Wilson 95% interval, beside the accuracy against a shuffled sample's answer (the null)."""
    rng = np.random.default_rng(seed)
    rows = []
    for kind in ("image_question", "text_question"):
        for question_type in QUESTION_TYPES:
            chosen = [i for i, s in enumerate(samples) if s.kind == kind and s.question_type == question_type]
            if not chosen:
                continue
            said = [first_word(answers[i]) for i in chosen]
            hits = [w == samples[i].answer for w, i in zip(said, chosen)]
            shuffled = rng.permutation(chosen)
            null_hits = [w == samples[j].answer for w, j in zip(said, shuffled)]
            interval = binomtest(int(np.sum(hits)), len(hits)).proportion_ci(method="wilson")
            rows.append(
                {
                    "kind": kind,
                    "question_type": question_type,
                    "n": len(hits),
                    "accuracy": float(np.mean(hits)),
                    "accuracy_ci_low": interval.low,
                    "accuracy_ci_high": interval.high,
                    "shuffled_answer_accuracy": float(np.mean(null_hits)),
                }
            )
    return pd.DataFrame(rows)


def english_prompts() -> list[str]:
    """The 50 fixed general-English prompts (xmodal/organism/data/english_prompts.txt)."""
    text = (Path(__file__).parent / "data" / "english_prompts.txt").read_text()
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


@torch.inference_mode()
def decoder_kl(adapter: ModelAdapter, base: torch.nn.Module, prompts: list[str]) -> pd.DataFrame:
    """Per prompt: KL(base || organism) of the next-token distribution after the plain prompt, and both top tokens.

    `base` is the plain gemma-3-270m (a causal LM); the organism is read text-only.
    """
    tokenizer = adapter.tokenizer
    rows = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(adapter.device)  # with <bos>
        organism_logp = torch.log_softmax(adapter.model(input_ids=ids).logits[0, -1].float(), dim=-1)
        base_logp = torch.log_softmax(base(input_ids=ids.to(next(base.parameters()).device)).logits[0, -1].float(), dim=-1).to(organism_logp.device)
        kl = float((base_logp.exp() * (base_logp - organism_logp)).sum())
        rows.append(
            {
                "prompt": prompt,
                "kl_base_to_organism": kl,
                "base_top": tokenizer.decode(int(base_logp.argmax())),
                "organism_top": tokenizer.decode(int(organism_logp.argmax())),
            }
        )
    return pd.DataFrame(rows)


def evaluate(cfg: EvalConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    adapter = organism(model_cache=cfg.model_cache, vision_weights=cfg.vision_weights, device=cfg.device, lora_weights=cfg.lora_weights, variant=cfg.variant)
    pairs = list(world.captioned_images(cfg.seed, cfg.n_images))
    images, scenes = [p[0] for p in pairs], [p[1] for p in pairs]
    captions = generate_captions(adapter, images, cfg.batch_size, cfg.max_new_tokens)
    pd.DataFrame({"truth": [s.caption for s in scenes], "generated": captions}).to_csv(out_dir / "captions.csv", index=False)
    accuracy = caption_accuracy(captions, scenes, cfg.seed)
    accuracy.to_csv(out_dir / "caption_accuracy.csv", index=False)
    if cfg.n_questions > 0:
        samples = [s for s in instruction_mix(cfg.seed, cfg.n_questions, (0.0, 0.5, 0.5)) if s.kind != "caption"]
        answers = answer_questions(adapter, samples, cfg.batch_size)
        pd.DataFrame(
            {
                "kind": [s.kind for s in samples],
                "question_type": [s.question_type for s in samples],
                "prompt": [s.prompt for s in samples],
                "truth": [s.answer for s in samples],
                "said": answers,
            }
        ).to_csv(out_dir / "answers.csv", index=False)
        questions = question_accuracy(answers, samples, cfg.seed)
        questions.to_csv(out_dir / "question_accuracy.csv", index=False)
        print(questions.to_string(index=False))
    if cfg.english_kl:
        kl = decoder_kl(adapter, load_language_model(cfg.model_cache).to(adapter.device).eval(), english_prompts())
        kl.to_csv(out_dir / "english_kl.csv", index=False)
        print(
            f"mean KL(gemma-3-270m || organism) over {len(kl)} English prompts: {kl['kl_base_to_organism'].mean():.4f} nats; "
            f"same top token in {int((kl['base_top'] == kl['organism_top']).sum())} of {len(kl)}"
        )

    widths = shipped_widths(cfg.variant)  # the variant's SAEs, every shipped width
    held_out = gather_activations(adapter, SAE_LAYERS, cfg.sae_seed, cfg.n_sae_images) if widths else None
    rows = [
        row
        for width in widths
        for layer in SAE_LAYERS
        for row in sae_quality(organism_sae("organism", layer, variant=cfg.variant, width=width).sae, held_out, layer)
    ]
    if not widths:
        log.info("No SAEs are shipped for the %s organism: SAE quality left out", cfg.variant)
    quality = pd.DataFrame(rows, columns=["layer", "tokens", "n_tokens", "fve", "l0", "dead_fraction", "d_sae"])
    quality.to_csv(out_dir / "sae_quality.csv", index=False)
    _plot(accuracy, quality, out_dir / "organism_eval.png")
    _caption_sheet(images[:16], scenes[:16], captions[:16], out_dir / "captions_sample.png")
    return accuracy, quality


def _caption_sheet(images: list[Any], scenes: list[world.Scene], captions: list[str], path: Path) -> None:
    """Held-out images with their true caption (top) and the organism's greedy caption (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = 4
    rows = -(-len(images) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.4 * rows))
    for ax, image, scene, caption in zip(axes.flat, images, scenes, captions):
        ax.imshow(image)
        said = parse_caption(caption)
        right = all(said[a] == t for a, t in truth(scene).items() if a in ("colour", "shape", "word") and t is not None)
        ax.set_title(f"true: {scene.caption}\nsaid: {caption}", fontsize=7, color="black" if right else "firebrick")
        ax.axis("off")
    for ax in list(axes.flat)[len(images) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot(accuracy: pd.DataFrame, quality: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    x = np.arange(len(accuracy))
    ax1.bar(x - 0.2, accuracy["accuracy"], 0.4, label="against its scene")
    ax1.bar(x + 0.2, accuracy["shuffled_scene_accuracy"], 0.4, label="against a shuffled scene (null)", color="grey")
    ax1.axhline(0.9, color="k", ls=":", lw=1)
    ax1.set(xticks=x, xticklabels=accuracy["attribute"], ylim=(0, 1.05), ylabel="caption accuracy", title="greedy captions, held-out images")
    ax1.legend(loc="lower left", fontsize=8)
    for (width, kind), part in quality.groupby(["d_sae", "tokens"]):
        ax2.plot(part["layer"], part["fve"], marker="o" if kind == "image" else "s", label=f"FVE, {kind} tokens, {width} features")
    ax2.axhline(0.8, color="k", ls=":", lw=1)
    ax2.set(xlabel="layer", ylabel="fraction of variance explained", ylim=(0, 1.02), xticks=list(SAE_LAYERS), title="shipped SAEs, held-out residuals")
    if len(quality):
        ax2.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# The schema: a typo or a wrong type in conf/organism_eval.yaml or on the command line fails at once.
ConfigStore.instance().store(name="organism_eval_schema", node=EvalConfig)


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="organism_eval")
def main(cfg: DictConfig) -> None:
    eval_cfg = OmegaConf.to_object(cfg)
    accuracy, quality = evaluate(eval_cfg)
    print(accuracy.to_string(index=False))
    print(quality.to_string(index=False))


if __name__ == "__main__":
    main()
