"""Score the organism: ``python -m xmodal.organism.evaluate``.

1. Captions: greedy captions (full vocabulary, no restriction) of held-out world
   images, scored per attribute against the scene they were drawn from, next to the
   same captions scored against a shuffled scene (the chance a caption is right by
   saying the commonest words).
2. SAEs: the shipped SAEs on held-out residuals, image tokens and text tokens
   apart: fraction of variance explained, L0 and dead features.

Writes ``captions.csv``, ``caption_accuracy.csv``, ``sae_quality.csv`` and
``organism_eval.png`` to ``out_dir``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import pandas as pd
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from scipy.stats import binomtest

from xmodal.conf_dir import CONF_DIR
from xmodal.models.base import ModelAdapter
from xmodal.models.generation import describe_images
from xmodal.organism import world
from xmodal.organism.model import organism
from xmodal.organism.saes import SAE_LAYERS, gather_activations, organism_sae, sae_quality

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
    vision_weights: str | None = None
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
        "colour": scene.colour, "shape": scene.shape, "count": scene.count, "size": scene.size if scene.count == 1 else None,
        "position": scene.position or None, "background": scene.background, "word": None,
    }  # fmt: skip


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
        rows.append({
            "attribute": attribute, "n_images": len(hits), "accuracy": float(np.mean(hits)) if hits else float("nan"),
            "accuracy_ci_low": interval.low if interval else float("nan"),
            "accuracy_ci_high": interval.high if interval else float("nan"),
            "shuffled_scene_accuracy": float(np.mean(null_hits)) if null_hits else float("nan"),
        })  # fmt: skip
    return pd.DataFrame(rows)


def evaluate(cfg: EvalConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    adapter = organism(model_cache=cfg.model_cache, vision_weights=cfg.vision_weights, device=cfg.device)
    pairs = list(world.captioned_images(cfg.seed, cfg.n_images))
    images, scenes = [p[0] for p in pairs], [p[1] for p in pairs]
    captions = generate_captions(adapter, images, cfg.batch_size, cfg.max_new_tokens)
    pd.DataFrame({"truth": [s.caption for s in scenes], "generated": captions}).to_csv(out_dir / "captions.csv", index=False)
    accuracy = caption_accuracy(captions, scenes, cfg.seed)
    accuracy.to_csv(out_dir / "caption_accuracy.csv", index=False)

    held_out = gather_activations(adapter, SAE_LAYERS, cfg.sae_seed, cfg.n_sae_images)
    quality = pd.DataFrame([row for layer in SAE_LAYERS for row in sae_quality(organism_sae("organism", layer).sae, held_out, layer)])
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
    for kind, marker in (("image", "o"), ("text", "s")):
        part = quality[quality["tokens"] == kind]
        ax2.plot(part["layer"], part["fve"], marker=marker, label=f"FVE, {kind} tokens")
    ax2.axhline(0.8, color="k", ls=":", lw=1)
    ax2.set(xlabel="layer", ylabel="fraction of variance explained", ylim=(0, 1.02), xticks=list(SAE_LAYERS), title="shipped SAEs, held-out residuals")
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
