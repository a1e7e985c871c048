"""Seconds per DAS optimisation step: ``python -m xmodal.experiments.das.benchmark``.

Times whole steps (augment, forward to layer L, aggregate, backward, clip, SGD) on
random unit concept vectors, after one untimed warm-up step, for each layer in
`layers`. On a GPU, `model=gemma3_4b_random layers=[1,10]` times the real Gemma 3 4B
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
from xmodal.models.base import instantiate_model
from xmodal.reporting.results import atomic_write


def benchmark(cfg: DictConfig) -> pd.DataFrame:
    adapter = instantiate_model(cfg.model)
    generator = torch.Generator().manual_seed(cfg.seed)
    rows = []
    for layer in cfg.layers:
        reader = ImageReader(adapter, int(layer))
        vectors = torch.nn.functional.normalize(torch.randn(cfg.n_concepts, adapter.hidden_size, generator=generator), dim=-1)
        synthesise(reader, vectors, DASSettings(steps=1, batch_size=cfg.batch_size), cfg.seed, progress=False)  # warm-up
        if adapter.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = synthesise(reader, vectors, DASSettings(steps=cfg.steps, batch_size=cfg.batch_size), cfg.seed, progress=False)
        if adapter.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / cfg.steps
        rows.append({
            "model": adapter.name, "layer": int(layer), "device": str(adapter.device), "dtype": str(reader.dtype).removeprefix("torch."),
            "image_side": reader.side, "batch_size": cfg.batch_size, "n_concepts": cfg.n_concepts, "steps": cfg.steps,
            "seconds_per_step": seconds, "minutes_for_600_steps": seconds * 600 / 60,
            "peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if adapter.device.type == "cuda" else None,
            "final_cosine": float(result.trajectory["cosine"].iloc[-1]),
        })  # fmt: skip
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
