"""Benchmark: xmodal's extraction against a naive loop, on the same inputs.

naive:  one input at a time, output_hidden_states=True, the whole model including the LM head.
xmodal: batched, hooks on the requested layer, forward stopped right after it.

Prints both times, their ratio and the largest absolute difference of the captured
activations. Settings are OmegaConf command-line keys, e.g.

    python benchmarks/extract.py shape=gemma3_270m layer=4
    python benchmarks/extract.py shape=tiny layer=1
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from omegaconf import OmegaConf

from xmodal.activations.extract import extract_activations
from xmodal.config import PositionsConfig
from xmodal.data.synthetic import synthetic_shapes
from xmodal.models.tiny import tiny_gemma3

# Random-weight Gemma 3 VLMs. gemma3_270m: the language model shape of google/gemma-3-270m.
SHAPES = {
    "tiny": {},
    "gemma3_270m": dict(
        num_hidden_layers=18, hidden_size=640, intermediate_size=2048, num_attention_heads=4,
        num_key_value_heads=1, head_dim=256, vision_hidden_size=128, vision_layers=4,
    ),
}


@dataclass
class BenchConfig:
    shape: str = "gemma3_270m"
    layer: int = 4
    images_per_concept: int = 2
    batch_size: int = 8
    threads: int = 0  # 0: torch's default


def naive_extract(adapter, dataset, layer: int, positions: PositionsConfig):
    text, image = [], []
    with torch.inference_mode():
        for concept in dataset.concepts:
            prompt = adapter.text_prompt(positions.text_prompt, concept.text, positions.use_chat_template)
            out = adapter.model(input_ids=torch.tensor([prompt.input_ids]), output_hidden_states=True)
            text.append(out.hidden_states[layer + 1][0, prompt.concept_positions])
        for img in dataset.images:
            inputs = adapter.image_inputs([img.load()], positions.image_prompt, positions.use_chat_template)
            out = adapter.model(**inputs, output_hidden_states=True)
            mask = adapter.image_token_mask(inputs["input_ids"])[0]
            image.append(out.hidden_states[layer + 1][0, mask])
    return torch.cat(text), torch.stack(image)


def main() -> None:
    cfg = OmegaConf.merge(OmegaConf.structured(BenchConfig), OmegaConf.from_cli())
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    adapter = tiny_gemma3(name=cfg.shape, device="cpu", **SHAPES[cfg.shape])
    adapter.check_layer(cfg.layer)
    dataset = synthetic_shapes(images_per_concept=cfg.images_per_concept)
    positions = PositionsConfig(batch_size=cfg.batch_size)
    adapter.model, adapter.processor  # load before timing

    naive_extract(adapter, dataset, cfg.layer, positions)  # warm-up (allocator, kernels)
    start = time.perf_counter()
    naive_text, naive_image = naive_extract(adapter, dataset, cfg.layer, positions)
    naive_s = time.perf_counter() - start

    extract_activations(adapter, dataset, [cfg.layer], positions, progress=False)
    start = time.perf_counter()
    acts = extract_activations(adapter, dataset, [cfg.layer], positions, progress=False)[cfg.layer]
    xmodal_s = time.perf_counter() - start

    diff = max((acts.text_tokens - naive_text).abs().max().item(), (acts.image_tokens - naive_image).abs().max().item())
    n_params = sum(p.numel() for p in adapter.model.parameters()) / 1e6
    print(f"model: random Gemma 3 VLM, shape={cfg.shape} ({n_params:.0f}M params, {adapter.num_layers} layers), layer {cfg.layer}")
    print(f"inputs: {len(dataset.concepts)} concept texts + {len(dataset.images)} images, threads={torch.get_num_threads()}")
    print(f"naive  (batch 1, output_hidden_states, full depth): {naive_s:8.3f} s")
    print(f"xmodal (batch {cfg.batch_size}, hooks, stop after layer {cfg.layer}):  {xmodal_s:8.3f} s")
    print(f"speed-up: {naive_s / xmodal_s:.2f}x   max |difference|: {diff:.2e}")


if __name__ == "__main__":
    main()
