"""`positions.batch_size`: a number, or `auto`, the largest batch that fits the GPU.

`auto` probes with the job's own inputs (images repeated, or the longest text), doubling
until a batch runs out of memory and then bisecting, so it costs a handful of forward
passes once per model and layers. On a CPU there is no memory wall to find: `auto` is
DEFAULT_CPU_BATCH there.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import torch

from xmodal.activations.capture import run_to_layers
from xmodal.config import AUTO, check_batch_size
from xmodal.errors import ConfigError
from xmodal.models.base import ModelAdapter

log = logging.getLogger(__name__)

DEFAULT_CPU_BATCH = 8
MAX_AUTO_BATCH = 4096
_found: dict[tuple, int] = {}


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


def resolve_batch_size(adapter: ModelAdapter, batch_size: Any, layers: Sequence[int], dataset: Any, positions: Any) -> int:
    """The batch size to use for this model, layers and dataset."""
    check_batch_size(batch_size)
    if batch_size != AUTO:
        return int(batch_size)
    if adapter.device.type != "cuda" or not adapter.has_decoder:
        return DEFAULT_CPU_BATCH
    key = (adapter.name, tuple(sorted(layers)), positions.image_prompt, bool(dataset.images))
    if key not in _found:
        probe = _image_probe(adapter, dataset, positions) if dataset.images else _text_probe(adapter, dataset, positions)

        def try_batch(n: int) -> None:
            try:
                run_to_layers(adapter.model, adapter.decoder_layers(), probe(n), layers)
            finally:
                torch.cuda.empty_cache()

        upper = min(MAX_AUTO_BATCH, max(len(dataset.images), len(dataset.concepts)))
        _found[key] = largest_fitting_batch(try_batch, upper)
        log.info("positions.batch_size=auto: %d fits on %s at layers %s", _found[key], adapter.device, list(layers))
    return _found[key]


def _image_probe(adapter: ModelAdapter, dataset: Any, positions: Any) -> Callable[[int], dict]:
    inputs = adapter.image_inputs([dataset.images[0].load()], positions.image_prompt, positions.use_chat_template)
    return lambda n: {k: v.expand(n, *v.shape[1:]).to(adapter.device) for k, v in inputs.items()}


def _text_probe(adapter: ModelAdapter, dataset: Any, positions: Any) -> Callable[[int], dict]:
    prompts = [adapter.text_prompt(positions.text_prompt, c.text, positions.use_chat_template) for c in dataset.concepts]
    longest = torch.tensor([max((p.input_ids for p in prompts), key=len)])
    return lambda n: {"input_ids": longest.expand(n, -1).to(adapter.device)}
