"""xmodal's throughput against naive baselines measured in the same run, in one JSON.

    python benchmarks/suite.py                                  # the organism on this machine's CPU
    python benchmarks/suite.py shape=gemma3_4b_random layer=9   # random weights in Gemma 3 4B's shape (GPU)
    bash benchmarks/gpu.sh                                      # every GPU figure, one run

Each figure is a ratio to its baseline, timed on the same inputs in the same process
(absolute rates mean something only on a GPU node):
- extraction: images/s and text prompts/s; baseline the naive Hugging Face loop (batch 1,
  output_hidden_states, the whole model); also the largest difference of the activations;
- SAE encode tokens/s: FeatureSpace.encode (chunks of 4,096) against one token at a time;
- activation-store write tokens/s (shards on disk) against the naive loop's extraction rate;
- DAS seconds per step, reusing the prompt's text prefix against the whole prompt every step;
- steering generation tokens/s, batched against one image at a time, with the steering hook on.

Settings are OmegaConf command-line keys (see SuiteConfig). The JSON goes to
`out` (default benchmarks/results/<shape>_<device>.json).
"""

from __future__ import annotations

import json
import platform
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import OmegaConf

from xmodal.activations.extract import extract_activations
from xmodal.activations.steering import Steering, steer
from xmodal.activations.store import build_store
from xmodal.config import PositionsConfig
from xmodal.data.synthetic import synthetic_shapes
from xmodal.experiments.das.benchmark import against_whole_prompt, timed_synthesis
from xmodal.experiments.das.synthesis import ImageReader
from xmodal.models.base import ModelAdapter, instantiate_model
from xmodal.models.generation import describe_images
from xmodal.reporting.results import atomic_write
from xmodal.saes.loading import FeatureSpace

REPO = Path(__file__).resolve().parent.parent


@dataclass
class SuiteConfig:
    shape: str = "organism"  # a conf/model/ name: organism, gemma3_4b_random, gemma3_12b_random, gemma3_27b_random, tiny
    device: str = "auto"
    layer: int = 5
    images_per_concept: int = 2  # synthetic shapes: 8 concepts, so 8 x this many images and 8 text prompts
    batch_size: int = 16  # xmodal's batch for extraction and generation
    naive_images: int = 8  # the naive loops see fewer inputs (they are slow); rates are per input
    sae_width: int = 4096
    sae_tokens: int = 65536
    das_layer: int = 9
    das_steps: int = 3
    das_concepts: int = 8  # DAS batch: das_concepts x das_copies images per step
    das_copies: int = 8
    max_new_tokens: int = 16
    skip: list[str] = field(default_factory=list)  # names of benchmarks to leave out
    out: str | None = None
    seed: int = 0


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """Seconds of one call (after a warm-up call), synchronised on a GPU."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, result


# ------------------------------------------------------------------------------ extraction --
# The notebook way: one input at a time, output_hidden_states=True, every layer and the LM head.
@torch.inference_mode()
def naive_text(adapter: ModelAdapter, dataset: Any, layer: int, positions: PositionsConfig) -> torch.Tensor:
    rows = []
    for concept in dataset.concepts:
        prompt = adapter.text_prompt(positions.text_prompt, concept.text, positions.use_chat_template)
        out = adapter.model(input_ids=torch.tensor([prompt.input_ids], device=adapter.device), output_hidden_states=True)
        rows.append(out.hidden_states[layer + 1][0, prompt.concept_positions].float().cpu())
    return torch.cat(rows)


@torch.inference_mode()
def naive_images(adapter: ModelAdapter, dataset: Any, layer: int, positions: PositionsConfig) -> torch.Tensor:
    rows = []
    for img in dataset.images:
        inputs = adapter.image_inputs([img.load()], positions.image_prompt, positions.use_chat_template).to(adapter.device)
        out = adapter.model(**inputs, output_hidden_states=True)
        rows.append(out.hidden_states[layer + 1][0, adapter.image_token_mask(inputs["input_ids"])[0]].float().cpu())
    return torch.stack(rows)


def extraction(adapter: ModelAdapter, cfg: SuiteConfig) -> dict[str, float]:
    dataset = synthetic_shapes(images_per_concept=cfg.images_per_concept, seed=cfg.seed)
    naive_set = synthetic_shapes(images_per_concept=max(1, cfg.naive_images // len(dataset.concepts)), seed=cfg.seed)
    positions = PositionsConfig(batch_size=cfg.batch_size)
    # The same inputs both ways: the speed-up and the largest difference of the activations.
    naive_text_s, text = timed(lambda: naive_text(adapter, naive_set, cfg.layer, positions), adapter.device)
    naive_image_s, image = timed(lambda: naive_images(adapter, naive_set, cfg.layer, positions), adapter.device)
    naive_s = naive_text_s + naive_image_s
    same_s, ours = timed(lambda: extract_activations(adapter, naive_set, [cfg.layer], positions, progress=False)[cfg.layer], adapter.device)
    diff = max((ours.text_tokens - text).abs().max().item(), (ours.image_tokens - image).abs().max().item())
    # Rates per modality: xmodal on the full set (more batches), the naive loop on its set.
    text_s, _ = timed(lambda: extract_activations(adapter, dataset, [cfg.layer], positions, False, ("text",)), adapter.device)
    image_s, _ = timed(lambda: extract_activations(adapter, dataset, [cfg.layer], positions, False, ("image",)), adapter.device)
    images_per_s, prompts_per_s = len(dataset.images) / image_s, len(dataset.concepts) / text_s
    naive_images_per_s, naive_prompts_per_s = len(naive_set.images) / naive_image_s, len(naive_set.concepts) / naive_text_s
    return {
        "speedup_same_inputs": naive_s / same_s,
        "max_abs_difference": diff,
        "images_per_s": images_per_s,
        "naive_images_per_s": naive_images_per_s,
        "images_speedup": images_per_s / naive_images_per_s,
        "prompts_per_s": prompts_per_s,
        "naive_prompts_per_s": naive_prompts_per_s,
        "prompts_speedup": prompts_per_s / naive_prompts_per_s,
        "naive_tokens_per_s": (len(text) + image.shape[0] * image.shape[1]) / naive_s,
        "n_images": len(dataset.images),
        "n_prompts": len(dataset.concepts),
        "naive_inputs": len(naive_set.images) + len(naive_set.concepts),
        "batch_size": cfg.batch_size,
    }


# -------------------------------------------------------------------------------- SAE encode --
def sae_encode(adapter: ModelAdapter, cfg: SuiteConfig) -> dict[str, float]:
    """A random sae-lens TopK SAE on random residuals: only the arithmetic is timed."""
    from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

    torch.manual_seed(cfg.seed)
    sae = TopKSAE(TopKSAEConfig(d_in=adapter.hidden_size, d_sae=cfg.sae_width, k=64, device=str(adapter.device))).eval()
    space = FeatureSpace("random_topk", cfg.layer, sae, adapter.hidden_size, {"kind": "benchmark"})
    resid = torch.randn(cfg.sae_tokens, adapter.hidden_size)
    naive_rows = resid[: max(64, cfg.sae_tokens // 256)]

    @torch.inference_mode()
    def one_at_a_time() -> None:
        for row in naive_rows:
            sae.encode(row[None].to(adapter.device)).cpu()

    ours_s, _ = timed(lambda: space.encode(resid), adapter.device)
    naive_s, _ = timed(one_at_a_time, adapter.device)
    rate, naive_rate = cfg.sae_tokens / ours_s, len(naive_rows) / naive_s
    return {"tokens_per_s": rate, "naive_tokens_per_s": naive_rate, "speedup": rate / naive_rate, "d_sae": cfg.sae_width}


# ------------------------------------------------------------------------- activation store --
def store_write(adapter: ModelAdapter, cfg: SuiteConfig, naive_tokens_per_s: float) -> dict[str, float]:
    dataset = synthetic_shapes(images_per_concept=cfg.images_per_concept, seed=cfg.seed)
    positions = PositionsConfig(batch_size=cfg.batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        build_store(adapter, dataset, Path(tmp) / "warm", [cfg.layer], positions, "concepts", cfg.seed, 4096, progress=False)
        start = time.perf_counter()
        store = build_store(adapter, dataset, Path(tmp) / "store", [cfg.layer], positions, "concepts", cfg.seed, 4096, progress=False)
        seconds = time.perf_counter() - start
        rate = store.n_rows / seconds
        return {
            "tokens_per_s": rate,
            "naive_extraction_tokens_per_s": naive_tokens_per_s,
            "speedup": rate / naive_tokens_per_s,
            "rows": store.n_rows,
            "shards": store.n_shards,
            "bytes": sum(s["bytes"] for s in store.progress.shards),
        }


# ------------------------------------------------------------------------------------- DAS --
def das(adapter: ModelAdapter, cfg: SuiteConfig) -> dict[str, float]:
    settings = OmegaConf.create({"batch_size": cfg.das_copies, "steps": cfg.das_steps, "seed": cfg.seed})
    vectors = torch.nn.functional.normalize(torch.randn(cfg.das_concepts, adapter.hidden_size, generator=torch.Generator().manual_seed(cfg.seed)), dim=-1)
    seconds, cosines = timed_synthesis(ImageReader(adapter, cfg.das_layer), vectors, settings)
    return {
        "seconds_per_step": seconds,
        **against_whole_prompt(adapter, cfg.das_layer, vectors, settings, seconds, cosines),
        "layer": cfg.das_layer,
        "images_per_step": cfg.das_concepts * cfg.das_copies,
    }


# -------------------------------------------------------------------------------- steering --
def steering_generation(adapter: ModelAdapter, cfg: SuiteConfig) -> dict[str, float]:
    dataset = synthetic_shapes(images_per_concept=cfg.images_per_concept, seed=cfg.seed)
    images = [img.load() for img in dataset.images][: cfg.batch_size]
    direction = torch.nn.functional.normalize(torch.randn(adapter.hidden_size, generator=torch.Generator().manual_seed(cfg.seed)), dim=0)
    steering = Steering(direction=direction, value=4.0, mode="add", where="both")
    layer = adapter.decoder_layers()[cfg.layer]

    def around(inputs: Any) -> Any:
        return steer(layer, steering, adapter.image_token_mask(inputs["input_ids"]))

    def generate(batch_size: int, subset: list) -> list[str]:
        return describe_images(adapter, subset, max_new_tokens=cfg.max_new_tokens, batch_size=batch_size, around=around)

    def new_tokens(texts: list[str]) -> int:
        return sum(len(adapter.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)

    ours_s, ours = timed(lambda: generate(cfg.batch_size, images), adapter.device)
    naive_subset = images[: max(1, min(len(images), cfg.naive_images // 2))]
    naive_s, naive = timed(lambda: generate(1, naive_subset), adapter.device)
    rate, naive_rate = new_tokens(ours) / ours_s, new_tokens(naive) / naive_s
    return {
        "tokens_per_s": rate,
        "naive_tokens_per_s": naive_rate,
        "speedup": rate / naive_rate,
        "batch_size": cfg.batch_size,
        "max_new_tokens": cfg.max_new_tokens,
    }


def main() -> None:
    cfg: SuiteConfig = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(SuiteConfig), OmegaConf.from_cli()))
    from hydra import compose, initialize_config_dir

    from xmodal.conf_dir import CONF_DIR
    from xmodal.config import register_configs
    from xmodal.experiments import register_experiment_configs

    register_configs()
    register_experiment_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        model_cfg = compose(config_name="config", overrides=[f"model={cfg.shape}", f"model.device={cfg.device}"]).model
    adapter = instantiate_model(model_cfg)
    adapter.model  # load before timing
    report: dict[str, Any] = {
        "shape": cfg.shape,
        "device": str(adapter.device),
        "device_name": torch.cuda.get_device_name(adapter.device) if adapter.device.type == "cuda" else platform.processor() or platform.machine(),
        "dtype": str(next(adapter.model.parameters()).dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "layer": cfg.layer,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "settings": OmegaConf.to_container(OmegaConf.structured(cfg)),
    }
    start = time.perf_counter()
    runs: list[tuple[str, Callable[[], dict]]] = [
        ("extraction", lambda: extraction(adapter, cfg)),
        ("sae_encode", lambda: sae_encode(adapter, cfg)),
        ("store_write", lambda: store_write(adapter, cfg, report["extraction"]["naive_tokens_per_s"])),
        ("das", lambda: das(adapter, cfg)),
        ("steering_generation", lambda: steering_generation(adapter, cfg)),
    ]
    for name, run in runs:
        if name in cfg.skip:
            continue
        t0 = time.perf_counter()
        report[name] = run()
        report[name]["benchmark_seconds"] = time.perf_counter() - t0
        if adapter.device.type == "cuda":
            report[name]["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated(adapter.device) / 2**30
        print(f"{name}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in report[name].items()), flush=True)
    report["total_seconds"] = time.perf_counter() - start
    out = Path(cfg.out or REPO / "benchmarks" / "results" / f"{cfg.shape}_{adapter.device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda p: Path(p).write_text(json.dumps(report, indent=1, default=str)))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
