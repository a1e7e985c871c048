"""`positions.batch_size`: a number, or `auto`, the largest batch that fits the GPU.

`auto` probes with the job's own inputs (images repeated, or the longest text) and its own
workload (an early-exit forward pass, a full forward pass with generation, or a forward
and backward pass), doubling until a batch runs out of memory and then bisecting, so it
costs a handful of passes once per model, layers, workload and sequence length. On a CPU there is no memory wall to find: `auto` is
DEFAULT_CPU_BATCH there.
"""

from __future__ import annotations

import logging
from enum import StrEnum
from typing import Any, Callable, Sequence

import torch

from xmodal.activations.capture import run_to_layers
from xmodal.config import AUTO, check_batch_size
from xmodal.errors import ConfigError
from xmodal.models.base import ModelAdapter

log = logging.getLogger(__name__)

DEFAULT_CPU_BATCH = 8
MAX_AUTO_BATCH = 4096
_found: dict[tuple, int] = {}  # the size found per model, layers, workload and sequence length
_probes: dict[tuple, dict] = {}  # the one-row probe inputs per model, dataset and prompts


def largest_fitting_batch(try_batch: Callable[[int], None], upper: int) -> int:
    """The largest n in 1..upper for which `try_batch(n)` does not raise torch.cuda.OutOfMemoryError."""
    fits, n = 0, 1
    while n <= upper:
        try:
            try_batch(n)
        except torch.cuda.OutOfMemoryError:
            break
        fits, n = n, n * 2
    if fits == 0:
        raise ConfigError("positions.batch_size=auto: not even a batch of 1 fits the GPU; use a smaller model, a lower dtype, or model.device_map=auto")
    low, high = fits, min(n, upper + 1)  # low fits; high does not (or is past the end)
    while high - low > 1:
        mid = (low + high) // 2
        try:
            try_batch(mid)
            low = mid
        except torch.cuda.OutOfMemoryError:
            high = mid
    return low


class Workload(StrEnum):
    """What a batch runs: the memory a batch needs differs by far between these."""

    EARLY_EXIT = "early_exit_forward"  # a forward pass that stops after the deepest layer read (extraction)
    GENERATE = "full_forward_generate"  # the whole model, logits at every position, then generate (steering)
    FORWARD_BACKWARD = "forward_backward"  # to the layer and back to the inputs (DAS's optimised pixels)


def resolve_batch_size(
    adapter: ModelAdapter,
    batch_size: Any,
    layers: Sequence[int],
    dataset: Any,
    positions: Any,
    workload: Workload = Workload.EARLY_EXIT,
    max_new_tokens: int = 0,
) -> int:
    """The batch size to use for this model, layers, dataset and workload.

    A size found for `auto` is kept per model, layers, workload and probe sequence length (the
    longest prompt, plus `max_new_tokens` when generating), so a size found for an early-exit
    forward pass is never reused for generation, a backward pass or longer texts.
    """
    check_batch_size(batch_size)
    if batch_size != AUTO:
        return int(batch_size)
    if adapter.device.type != "cuda" or not adapter.has_decoder:
        return DEFAULT_CPU_BATCH
    workload = Workload(workload)
    probe_key = (
        adapter.name,
        dataset.name,
        len(dataset.concepts),
        len(dataset.images),
        positions.image_prompt,
        positions.text_prompt,
        positions.use_chat_template,
    )
    if probe_key not in _probes:
        _probes[probe_key] = _image_probe(adapter, dataset, positions) if dataset.images else _text_probe(adapter, dataset, positions)
    inputs = _probes[probe_key]
    sequence_length = int(inputs["input_ids"].shape[1]) + (max_new_tokens if workload == Workload.GENERATE else 0)
    read = () if workload == Workload.GENERATE else tuple(sorted(layers))  # generation runs every layer anyway
    key = (adapter.name, read, workload, sequence_length, positions.image_prompt, bool(dataset.images))
    if key not in _found:
        run = _WORKLOADS[workload]

        def try_batch(n: int) -> None:
            try:
                run(adapter, {k: v.expand(n, *v.shape[1:]) for k, v in inputs.items()}, layers, max_new_tokens)
            finally:
                torch.cuda.empty_cache()

        upper = min(MAX_AUTO_BATCH, max(len(dataset.images), len(dataset.concepts)))
        _found[key] = largest_fitting_batch(try_batch, upper)
        log.info(
            "positions.batch_size=auto: %d fits on %s for %s at layers %s, %d tokens",
            _found[key],
            adapter.device,
            workload.value,
            list(layers),
            sequence_length,
        )
    return _found[key]


def _on_device(adapter: ModelAdapter, inputs: dict) -> dict:
    return {k: v.to(adapter.device) for k, v in inputs.items()}


def _early_exit(adapter: ModelAdapter, inputs: dict, layers: Sequence[int], max_new_tokens: int) -> None:
    run_to_layers(adapter.model, adapter.decoder_layers(), _on_device(adapter, inputs), layers)


@torch.inference_mode()
def _full_forward_generate(adapter: ModelAdapter, inputs: dict, layers: Sequence[int], max_new_tokens: int) -> None:
    inputs = _on_device(adapter, inputs)
    adapter.model(**inputs, use_cache=False)  # logits at every position, as steering's first-answer pass
    if max_new_tokens:
        adapter.model.generate(**inputs, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False)


def _forward_backward(adapter: ModelAdapter, inputs: dict, layers: Sequence[int], max_new_tokens: int) -> None:
    inputs = _on_device(adapter, inputs)
    if "pixel_values" in inputs:  # the gradient DAS takes: to the pixels
        inputs = {**inputs, "pixel_values": inputs["pixel_values"].detach().clone().requires_grad_(True)}
    else:  # text alone: to the token embeddings
        embeds = adapter.model.get_input_embeddings()(inputs.pop("input_ids"))
        inputs = {**inputs, "inputs_embeds": embeds.detach().clone().requires_grad_(True)}
    captured = run_to_layers(adapter.model, adapter.decoder_layers(), inputs, layers, grad=True)
    sum(v.float().sum() for v in captured.values()).backward()


_WORKLOADS: dict[Workload, Callable[[ModelAdapter, dict, Sequence[int], int], None]] = {
    Workload.EARLY_EXIT: _early_exit,
    Workload.GENERATE: _full_forward_generate,
    Workload.FORWARD_BACKWARD: _forward_backward,
}


def _image_probe(adapter: ModelAdapter, dataset: Any, positions: Any) -> dict:
    return dict(adapter.image_inputs([dataset.images[0].load()], positions.image_prompt, positions.use_chat_template))


def _text_probe(adapter: ModelAdapter, dataset: Any, positions: Any) -> dict:
    prompts = [adapter.text_prompt(positions.text_prompt, c.text, positions.use_chat_template, positions.max_concept_tokens) for c in dataset.concepts]
    return {"input_ids": torch.tensor([max((p.input_ids for p in prompts), key=len)])}
