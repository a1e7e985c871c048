"""Train TopK SAEs with sae-lens on activations already in memory.

sae-lens's runner drives a TransformerLens model; xmodal reads residuals through its
own hooks, so it hands sae-lens's SAETrainer an iterator over shuffled batches.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch

from xmodal.errors import ConfigError


def shuffled_batches(activations: torch.Tensor, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless epochs over the rows, reshuffled each epoch with a seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(activations), generator=generator)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield activations[order[start : start + batch_size]]


def train_topk_sae(
    activations: torch.Tensor,
    layer: int,
    d_sae: int,
    k: int,
    total_samples: int,
    batch_size: int,
    lr: float,
    seed: int,
    device: str = "cpu",
    **options: Any,
) -> Any:
    """A sae-lens SAE fitted to `activations` held in memory; `options` (architecture, ...) as in `train_sae`."""
    batches = shuffled_batches(activations.to(device), batch_size, seed)
    return train_sae(batches, activations, layer, d_sae, k, total_samples, batch_size, lr, seed, device, **options)


ARCHITECTURES = ("topk", "batchtopk", "jumprelu", "matryoshka_batchtopk")


def train_sae(
    batches: Iterator[torch.Tensor],
    sample: torch.Tensor,
    layer: int,
    d_sae: int,
    k: int,
    total_samples: int,
    batch_size: int,
    lr: float,
    seed: int,
    device: str = "cpu",
    model_name: str = "xmodal",
    architecture: str = "topk",
    decoder_init: str = "random",
    l0_coefficient: float = 1.0,
    matryoshka_widths: list[int] | None = None,
    hook_name: str | None = None,
) -> Any:
    """A sae-lens TopK, BatchTopK, Matryoshka BatchTopK or JumpReLU SAE (TopK kinds with the auxiliary loss against
    dead features) trained on `batches`; `sample`, rows of the same data, sets the initialisation.

    BatchTopK keeps the k x batch largest activations over the whole batch, so a token may use
    more or fewer than k features; sae-lens saves it for inference as a JumpReLU SAE. JumpReLU
    trains thresholds with a straight-through estimator and Gemma Scope 2's quadratic penalty around
    an L0 of `k` (sae-lens's target_l0),
    pulled there with weight `l0_coefficient`. Matryoshka BatchTopK adds a reconstruction loss for
    each nested prefix of the features in `matryoshka_widths` (by default d_sae/8, /4, /2 and all),
    so the first features learn the most general directions; it too is saved as JumpReLU.
    decoder_init="random" keeps sae-lens's random directions (what every shipped result used);
    "data" starts each feature on a random row of `sample` (centred), which leaves far fewer dead.
    `hook_name` is recorded in the SAE's config (``ModelAdapter.hook_name``: it says the site, which
    sae.site is checked against); None: ``model.layers.<layer>``, resid_post.
    """
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
    from sae_lens.saes.matryoshka_batchtopk_sae import MatryoshkaBatchTopKTrainingSAE, MatryoshkaBatchTopKTrainingSAEConfig
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture={architecture!r}; use one of {list(ARCHITECTURES)}")
    if decoder_init not in ("data", "random"):
        raise ValueError(f"decoder_init={decoder_init!r}; use 'data' or 'random'")
    if decoder_init == "data" and len(sample) < d_sae:
        raise ConfigError(
            f"training.decoder_init=data needs at least training.d_sae={d_sae} activation rows to start the decoder from, got {len(sample)}; "
            "lower training.d_sae, set training.decoder_init=random, or give the store more tokens"
        )
    torch.manual_seed(seed)
    common = dict(
        d_in=sample.shape[1],
        d_sae=d_sae,
        device=device,
        normalize_activations="expected_average_only_in",  # folded back into the weights after training
        metadata=SAEMetadata(model_name=model_name, hook_name=hook_name or f"model.layers.{layer}", hook_layer=layer),
    )
    if architecture == "jumprelu":
        sae = JumpReLUTrainingSAE(
            JumpReLUTrainingSAEConfig(**common, target_l0=float(k), l0_coefficient=l0_coefficient, jumprelu_sparsity_loss_mode="quadratic")
        )
    elif architecture == "matryoshka_batchtopk":
        widths = list(matryoshka_widths or default_matryoshka_widths(d_sae))
        if widths[-1] != d_sae or any(a >= b for a, b in zip(widths, widths[1:])) or widths[0] < 1:
            raise ValueError(f"matryoshka_widths={widths} must rise strictly from at least 1 and end at d_sae={d_sae}")
        sae = MatryoshkaBatchTopKTrainingSAE(MatryoshkaBatchTopKTrainingSAEConfig(**common, k=k, matryoshka_widths=widths))
    else:
        sae_class, config_class = {"topk": (TopKTrainingSAE, TopKTrainingSAEConfig), "batchtopk": (BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig)}[
            architecture
        ]
        sae = sae_class(config_class(**common, k=k))
    # Start the decoder bias at the data mean (in the trainer's normalised units): residual
    # streams share a large mean direction, and with b_dec at zero the same few features win
    # the top-k for every token while the rest die (measured: 95% dead at layer 5).
    mean = sample.mean(dim=0)
    scale = sample.shape[1] ** 0.5 / sample.norm(dim=1).mean()
    with torch.no_grad():
        sae.b_dec.copy_((mean * scale).to(sae.b_dec.dtype))
        if decoder_init == "data":
            # Each feature starts pointing at a real token (minus the mean), so each one wins the
            # top-k somewhere from step 0; random directions in a low-rank residual stream mostly
            # never do, and the auxiliary loss does not revive them (measured at layer 5 of the
            # organism: 39% of 256 features dead with random directions, 15% with these).
            rows = torch.randperm(len(sample), generator=torch.Generator().manual_seed(seed))[:d_sae]
            directions = torch.nn.functional.normalize(sample[rows] - mean, dim=1)
            sae.W_dec.copy_((directions * sae.W_dec.norm(dim=1, keepdim=True)).to(sae.W_dec.dtype))
            sae.W_enc.copy_(directions.T.to(sae.W_enc.dtype))
        if architecture == "jumprelu":
            # Each feature's threshold starts at its (1 - k/d_sae) quantile on the sample, so the
            # L0 starts near k: from sae-lens's one small threshold for all, L0 started near
            # d_sae / 2 and the thresholds, moved by Adam a few 1e-4 per step, stayed there
            # (measured at layer 9 of the organism: L0 about 200 of 512 after 1M tokens).
            subset = sample[torch.randperm(len(sample), generator=torch.Generator().manual_seed(seed))[:8192]]  # torch.quantile's size limit
            _, hidden_pre = sae.encode_with_hidden_pre((subset * scale).to(device, sae.W_enc.dtype))
            sae.threshold.copy_(hidden_pre.float().quantile(1 - k / d_sae, dim=0).clamp(min=0).to(sae.threshold.dtype))
    steps = total_samples // batch_size
    trainer_cfg = SAETrainerConfig(
        total_training_samples=total_samples,
        train_batch_size_samples=batch_size,
        lr=lr,
        lr_end=lr / 10,
        lr_scheduler_name="cosineannealing",
        lr_warm_up_steps=steps // 20,
        lr_decay_steps=steps // 5,
        device=device,
        dead_feature_window=max(1, steps // 10),
        feature_sampling_window=max(1, steps // 5),
        n_batches_for_norm_estimate=max(1, min(100, len(sample) // batch_size)),
    )
    trainer = SAETrainer(trainer_cfg, sae, (batch.to(device) for batch in batches))
    return trainer.fit()


def default_matryoshka_widths(d_sae: int) -> list[int]:
    """Nested prefixes of d_sae/8, d_sae/4, d_sae/2 and all features (fewer when d_sae is small)."""
    return sorted({max(1, d_sae // 8), max(1, d_sae // 4), max(1, d_sae // 2), d_sae})


def save_sae(sae: Any, target: Path) -> None:
    """sae-lens's inference format (TopK stays TopK, BatchTopK becomes JumpReLU), written to a
    temporary folder beside `target` and renamed, so a half-saved SAE is never found there."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    sae.save_inference_model(staging)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
