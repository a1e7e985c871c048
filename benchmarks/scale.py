"""How a study's cost grows with its dataset: wall time, peak memory and cache bytes at three sizes.

    python benchmarks/scale.py                      # overlap and probe at 240, 960 and 3,840 images
    python benchmarks/scale.py quick=true           # CI: a few minutes, small sizes and a small model
    python benchmarks/scale.py sizes=[60,1200] studies=[overlap] sae=none   # the issue's memory check

Each job runs as a user would run it (`python -m xmodal.run`, one process per job, its own
empty activation cache) on the random-weight tiny Gemma 3 in a real model's shape (hidden
2,048, 256 image tokens per 128x128 image, 2 decoder layers), through a random 16,384-feature
sae-lens TopK SAE written to disk (or `sae=none`: raw residuals). Per job it records wall time,
the process's peak RSS and the cache's bytes per image; per study it fits the growth exponent
of each over the sizes (cost ~ size^exponent: 1 is linear, 0 is flat). The probe runs with
the torch solver and with `experiment.solver=sklearn` on the same data, in the same run.
Numbers from the tiny model's random weights say nothing about a real VLM: only the costs count.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from xmodal.reporting.results import atomic_write

REPO = Path(__file__).resolve().parent.parent
N_CONCEPTS = 12  # dataset=synthetic: 6 colours x 2 shapes

# Runs one job in this process and prints its peak RSS (the child's own, not its parent's).
JOB = """
import resource, runpy, sys
sys.argv = ["xmodal.run", *sys.argv[1:]]
try:
    runpy.run_module("xmodal.run", run_name="__main__")
except SystemExit as exit:
    if exit.code not in (0, None):
        raise
finally:
    print("PEAK_RSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True)
    import torch
    if torch.cuda.is_available():
        print("PEAK_GPU_BYTES", torch.cuda.max_memory_allocated(), flush=True)
"""


@dataclass
class ScaleConfig:
    sizes: list[int] = field(default_factory=lambda: [240, 960, 3840])  # images; rounded to a multiple of 12 concepts
    studies: list[str] = field(default_factory=lambda: ["overlap", "probe"])
    model: str = "tiny"  # tiny in the shape below, or a conf/model/ name as it is (gemma3_4b_random on a GPU node)
    device: str = "auto"
    sae: str = "topk"  # topk: a random 16,384-feature TopK SAE on disk; none: raw residuals
    sae_width: int = 16384
    sae_k: int = 64
    hidden_size: int = 2048
    num_layers: int = 2
    image_size: int = 128
    image_tokens: int = 256
    layer: int = 1
    batch_size: int = 8
    n_permutations: int = 100
    probe_solvers: list[str] = field(default_factory=lambda: ["torch", "sklearn"])
    quick: bool = False  # CI: 3 small sizes on a small model, the torch probe only: a few minutes
    out: str | None = None
    seed: int = 0


def quick(cfg: ScaleConfig) -> ScaleConfig:
    cfg.sizes, cfg.hidden_size, cfg.image_size, cfg.image_tokens, cfg.sae_width = [24, 48, 96], 256, 64, 64, 2048
    cfg.sae_k, cfg.n_permutations = 32, 10  # the probe needs 2 images per concept: 24 is the smallest size
    cfg.probe_solvers = ["torch"]  # sklearn's refits alone take minutes; the full run compares both
    return cfg


def write_random_topk_sae(path: Path, cfg: ScaleConfig) -> Path:
    """A random sae-lens TopK SAE at `path` reading blocks.<layer>.hook_resid_post."""
    from sae_lens import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(cfg.seed)
    meta = SAEMetadata(hook_name=f"blocks.{cfg.layer}.hook_resid_post", model_name="tiny")
    sae = TopKSAE(TopKSAEConfig(d_in=cfg.hidden_size, d_sae=cfg.sae_width, k=cfg.sae_k, metadata=meta))
    with torch.no_grad():
        sae.W_enc.normal_(0, cfg.hidden_size**-0.5)
        sae.b_enc.normal_(0, 0.01)
    sae.save_model(path)
    return path


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run_job(cfg: ScaleConfig, study: str, n_images: int, work: Path, sae_path: Path | None, extra: list[str]) -> dict:
    """One job as a user runs it, in its own process and its own empty cache."""
    name = f"{study}_{n_images}" + "".join(f"_{e.split('=')[-1]}" for e in extra)
    cache = work / "cache" / name
    run_dir = work / "runs" / name
    shape = (
        [
            f"model.hidden_size={cfg.hidden_size}",
            f"model.num_hidden_layers={cfg.num_layers}",
            f"model.image_size={cfg.image_size}",
            f"model.mm_tokens_per_image={cfg.image_tokens}",
        ]
        if cfg.model == "tiny"
        else [f"model={cfg.model}"]
    )
    overrides = [
        "--config-name=config_tiny",
        f"experiment={study}",
        "dataset=synthetic",
        f"dataset.images_per_concept={n_images // N_CONCEPTS}",
        f"dataset.image_size={cfg.image_size}",
        *shape,
        f"model.device={cfg.device}",
        f"layer={cfg.layer}",
        f"positions.batch_size={cfg.batch_size}",
        f"experiment.n_permutations={cfg.n_permutations}",
        f"seed={cfg.seed}",
        f"paths.activation_cache={cache}",
        f"hydra.run.dir={run_dir}",
        "paths.cache_preset_layers=false",
        *(["sae=local", f"sae.path={sae_path}"] if sae_path else ["sae=none"]),
        *extra,
    ]
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", JOB, *overrides], cwd=work, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")
    printed = dict(line.split()[:2] for line in proc.stdout.splitlines() if line.startswith("PEAK_"))
    peak_kb = int(printed["PEAK_RSS_KB"])
    result = json.loads((run_dir / "result.json").read_text())
    timings = result["timings_s"]
    return {
        "study": study,
        "n_images": n_images,
        "extra": extra,
        "wall_s": wall,
        "peak_rss_gb": peak_kb / 2**20,
        "cache_bytes_per_image": directory_bytes(cache) / n_images,
        "dense_float32_bytes_per_image": cfg.image_tokens * cfg.hidden_size * 4,
        "activations_s_per_image": timings.get("activations", 0.0) / n_images,
        "timings_s": timings,
        # the image loop alone (forward, encode, pool, write), from the readouts' progress: no model load, no text
        "image_pass_s_per_image": sum(json.loads(p.read_text()).get("image_pass_s", 0.0) for p in cache.rglob("progress.json")) / n_images,
        "images_per_s": n_images / timings["activations"] if timings.get("activations") else None,
        "peak_gpu_gb": int(printed["PEAK_GPU_BYTES"]) / 2**30 if "PEAK_GPU_BYTES" in printed else None,
        "metrics_s": timings.get("metrics"),
        "accuracies": {k: v for k, v in result["metrics"].items() if k.endswith("accuracy")},
    }


def exponent(sizes: list[int], values: list[float]) -> float:
    """Slope of log(value) on log(size): cost ~ size^slope."""
    return float(np.polyfit(np.log(sizes), np.log(np.maximum(values, 1e-12)), 1)[0])


def main() -> None:
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ScaleConfig), OmegaConf.from_cli()))
    if cfg.quick:
        cfg = quick(cfg)
    sizes = [max(N_CONCEPTS, n - n % N_CONCEPTS) for n in cfg.sizes]
    report: dict = {
        "config": OmegaConf.to_container(OmegaConf.structured(cfg)),
        "sizes": sizes,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "jobs": [],
        "growth": {},
    }
    with tempfile.TemporaryDirectory(prefix="xmodal-scale-") as tmp:
        work = Path(tmp)
        sae_path = write_random_topk_sae(work / "sae", cfg) if cfg.sae == "topk" else None
        for study in cfg.studies:
            variants = [[f"experiment.solver={s}"] for s in cfg.probe_solvers] if study == "probe" else [[]]
            for extra in variants:
                jobs = []
                for n in sizes:
                    job = run_job(cfg, study, n, work, sae_path, extra)
                    print(
                        f"{study} {' '.join(extra)} {n:>6} images: {job['wall_s']:7.1f} s, peak RSS {job['peak_rss_gb']:.2f} GB, "
                        f"cache {job['cache_bytes_per_image'] / 1e3:.1f} kB/image",
                        flush=True,
                    )
                    jobs.append(job)
                report["jobs"] += jobs
                key = " ".join([study, *extra])
                report["growth"][key] = {
                    metric: exponent(sizes, [j[metric] for j in jobs]) for metric in ("wall_s", "peak_rss_gb", "image_pass_s_per_image")
                } | {
                    "peak_rss_growth_first_to_last": jobs[-1]["peak_rss_gb"] / jobs[0]["peak_rss_gb"] - 1,
                    "image_pass_s_per_image_spread": max(j["image_pass_s_per_image"] for j in jobs) / min(j["image_pass_s_per_image"] for j in jobs) - 1,
                    "cache_fraction_of_dense": max(j["cache_bytes_per_image"] / j["dense_float32_bytes_per_image"] for j in jobs),
                }
    out = Path(cfg.out or REPO / "benchmarks" / "results" / f"scale{'_quick' if cfg.quick else ''}_{cfg.sae}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda p: Path(p).write_text(json.dumps(report, indent=1)))
    print(json.dumps(report["growth"], indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
