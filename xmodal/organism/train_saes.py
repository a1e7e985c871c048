"""Train the organism's SAEs with sae-lens: ``python -m xmodal.organism.train_saes``.

One TopK SAE per layer on image tokens and caption tokens of fresh world images
(see `xmodal.organism.saes`), saved fp16 in sae-lens format (``SAE.load_from_disk``
reads it) under ``out_dir/layer_<L>``, then reloaded and scored on held-out images.
Copy ``out_dir/layer_*`` to ``xmodal/organism/weights/<variant>/saes/width_<d_sae>/`` to ship them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import pandas as pd
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from xmodal.conf_dir import CONF_DIR
from xmodal.organism.model import organism
from xmodal.organism.saes import SAE_LAYERS, TokenActivations, gather_activations, sae_quality
from xmodal.saes.training import save_sae, train_topk_sae

log = logging.getLogger("xmodal.organism.train_saes")


@dataclass
class SAETrainConfig:
    seed: int = 0
    layers: list[int] = field(default_factory=lambda: list(SAE_LAYERS))
    n_images: int = 2000
    eval_seed: int = 424242  # held-out images: never drawn in training
    n_eval_images: int = 400
    d_sae: int = 512
    k: int = 48
    architecture: str = "topk"  # topk | batchtopk (sae-lens; saved for inference as JumpReLU)
    decoder_init: str = "data"  # data (features start on random training tokens; the shipped SAEs) | random (sae-lens's)
    epochs: float = 20.0
    batch_size: int = 1024
    lr: float = 4e-4
    variant: str = "instruct"  # the shipped organism whose residuals the SAEs read: instruct | frozen | planted
    vision_weights: str | None = None  # replace the variant's vision weights
    lora_weights: str | None = None  # replace the variant's decoder LoRA (a stage-2 lora.safetensors)
    device: str = "auto"
    out_dir: str = "outputs/organism_saes"
    model_cache: str = "~/.cache/xmodal/models"


def train_saes(cfg: SAETrainConfig) -> pd.DataFrame:
    from sae_lens import SAE

    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    adapter = organism(model_cache=cfg.model_cache, vision_weights=cfg.vision_weights, device=cfg.device, lora_weights=cfg.lora_weights, variant=cfg.variant)
    train_acts = _cached(out_dir, adapter, cfg.layers, cfg.seed, cfg.n_images)
    held_out = _cached(out_dir, adapter, cfg.layers, cfg.eval_seed, cfg.n_eval_images)
    rows = []
    for layer in cfg.layers:
        activations = train_acts.by_layer[layer]
        total = int(cfg.epochs * len(activations))
        log.info("Layer %d: %d training tokens, %d samples in all", layer, len(activations), total)
        sae = train_topk_sae(
            activations,
            layer,
            cfg.d_sae,
            cfg.k,
            total,
            cfg.batch_size,
            cfg.lr,
            cfg.seed,
            str(adapter.device),
            model_name="xmodal-organism",
            architecture=cfg.architecture,
            decoder_init=cfg.decoder_init,
        )
        sae, saved_dtype = compact(sae)
        log.info("Layer %d: saving in %s", layer, saved_dtype)
        target = out_dir / f"layer_{layer}"
        save_sae(sae, target)
        shipped = SAE.load_from_disk(target, device=str(adapter.device), dtype="float32")
        rows += sae_quality(shipped, held_out, layer)
        log.info("Layer %d held-out: %s", layer, rows[-2:])
    table = pd.DataFrame(rows)
    table.to_csv(out_dir / "sae_quality.csv", index=False)
    return table


def compact(sae: Any) -> tuple[Any, str]:
    """The SAE in float16 to keep the shipped files small, or bfloat16 where a weight is beyond
    float16's range (65,504), as b_dec is for a model whose residuals grow that large."""
    largest = max(float(p.detach().abs().max()) for p in sae.parameters())
    dtype = "float16" if largest < torch.finfo(torch.float16).max else "bfloat16"
    sae = sae.to(getattr(torch, dtype))
    sae.cfg.dtype = dtype
    return sae, dtype


def _cached(out_dir: Path, adapter: Any, layers: list[int], seed: int, n_images: int) -> TokenActivations:
    """Gathered activations, kept in out_dir so a rerun with other SAE settings skips the model."""
    weights = "_".join(adapter.identity[k] for k in ("vision_weights", "lora_weights") if k in adapter.identity)
    path = out_dir / f"activations_{weights}_seed{seed}_n{n_images}_l{'-'.join(map(str, layers))}.pt"
    if path.exists():
        saved = torch.load(path, weights_only=True)
        return TokenActivations({int(k): v for k, v in saved["by_layer"].items()}, np.array(saved["kind"]))
    acts = gather_activations(adapter, layers, seed, n_images)
    torch.save({"by_layer": {str(k): v for k, v in acts.by_layer.items()}, "kind": acts.kind.tolist()}, path.with_suffix(".tmp"))
    path.with_suffix(".tmp").replace(path)
    return acts


# The schema: a typo or a wrong type in conf/organism_saes.yaml or on the command line fails at once.
ConfigStore.instance().store(name="organism_saes_schema", node=SAETrainConfig)


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="organism_saes")
def main(cfg: DictConfig) -> None:
    train_cfg = OmegaConf.to_object(cfg)
    print(train_saes(train_cfg).to_string(index=False))


if __name__ == "__main__":
    main()
