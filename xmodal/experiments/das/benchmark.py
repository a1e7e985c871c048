"""Seconds per DAS optimisation step: ``python -m xmodal.experiments.das.benchmark``.

Times whole steps (augment, forward to layer L, aggregate, backward, clip, SGD) on
random unit concept vectors, after one untimed warm-up step, for each layer in
`layers`. With `baseline=true` it also times the baseline, the whole prompt run every
step (no reused text prefix), on the same seed, and reports the speed-up and the
largest difference between the two runs' cosines. On a GPU, `model=gemma3_4b_random layers=[1,10]` times the real Gemma 3 4B
shape (bf16, batch 8, 896x896) without downloading weights.
"""

from __future__ import annotations

import time
from pathlib import Path

import hydra
import pandas as pd
import torch
from omegaconf import DictConfig

from xmodal.conf_dir import CONF_DIR
from xmodal.config import register_configs
from xmodal.experiments.das.synthesis import DASSettings, ImageReader, synthesise
from xmodal.models.base import ModelAdapter, instantiate_model
from xmodal.reporting.results import atomic_write


def timed_synthesis(reader: ImageReader, vectors: torch.Tensor, cfg: DictConfig) -> tuple[float, pd.Series]:
    """(seconds per step, the trajectory's cosines) of `cfg.steps` steps after one untimed warm-up step."""
    synthesise(reader, vectors, DASSettings(steps=1, batch_size=cfg.batch_size), cfg.seed, progress=False)
    if reader.adapter.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = synthesise(reader, vectors, DASSettings(steps=cfg.steps, batch_size=cfg.batch_size), cfg.seed, progress=False)
    if reader.adapter.device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / cfg.steps, result.trajectory["cosine"]


def against_whole_prompt(adapter: ModelAdapter, layer: int, vectors: torch.Tensor, cfg: DictConfig, seconds: float, cosines: pd.Series) -> dict:
    """The baseline, the whole prompt run every step, timed on the same seed; the speed-up of
    reusing the prefix (`seconds`, `cosines`) over it, and the largest difference of their cosines."""
    baseline_seconds, baseline_cosines = timed_synthesis(ImageReader(adapter, layer, reuse_prefix=False), vectors, cfg)
    return {
        "baseline_seconds_per_step": baseline_seconds,
        "speedup": baseline_seconds / seconds,
        "max_cosine_difference": float((cosines - baseline_cosines).abs().max()),
    }


def benchmark(cfg: DictConfig) -> pd.DataFrame:
    """Per layer: seconds per step reading the whole prompt each step (the baseline) and reusing its
    text prefix (what DAS runs), measured in the same run, and how far their cosines drift apart."""
    adapter = instantiate_model(cfg.model)
    generator = torch.Generator().manual_seed(cfg.seed)
    rows = []
    for layer in cfg.layers:
        vectors = torch.nn.functional.normalize(torch.randn(cfg.n_concepts, adapter.hidden_size, generator=generator), dim=-1)
        reader = ImageReader(adapter, int(layer))
        if adapter.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        seconds, cosines = timed_synthesis(reader, vectors, cfg)
        row = {
            "model": adapter.name,
            "layer": int(layer),
            "device": str(adapter.device),
            "dtype": str(reader.dtype).removeprefix("torch."),
            "image_side": reader.side,
            "batch_size": cfg.batch_size,
            "n_concepts": cfg.n_concepts,
            "steps": cfg.steps,
            "reuses_prefix": reader.reuse_prefix,
            "seconds_per_step": seconds,
            "minutes_for_600_steps": seconds * 600 / 60,
            "peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if adapter.device.type == "cuda" else None,
            "final_cosine": float(cosines.iloc[-1]),
        }
        if cfg.baseline and reader.reuse_prefix:
            row |= against_whole_prompt(adapter, int(layer), vectors, cfg, seconds, cosines)
        rows.append(row)
    return pd.DataFrame(rows)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="das_benchmark")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    table = benchmark(cfg)
    out = HydraConfig.get().runtime.output_dir
    atomic_write(Path(out) / "das_benchmark.csv", lambda p: table.to_csv(p, index=False))
    print(table.to_string(index=False))


if __name__ == "__main__":
    register_configs()
    main()
