"""Greedy (or seeded sampled) image descriptions through an adapter, in its chat format."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable, ContextManager, Sequence

import torch
from PIL import Image

from xmodal.models.base import ModelAdapter


@torch.inference_mode()
def describe_images(
    adapter: ModelAdapter,
    images: Sequence[Image.Image],
    prompt: str = "",
    use_chat_template: bool = True,
    max_new_tokens: int = 16,
    batch_size: int = 16,
    do_sample: bool = False,
    temperature: float = 1.0,
    seed: int = 0,
    around: Callable[[Any], ContextManager[Any]] | None = None,
) -> list[str]:
    """One generated text per image; greedy by default, and seeded when sampling.

    `around(inputs)`, if given, wraps each batch's generation (e.g. a steering hook
    that needs to know where the image tokens are).
    """
    tokenizer = adapter.tokenizer
    tokenizer.padding_side = "left"  # generation continues from the last position of every row
    texts: list[str] = []
    sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if do_sample else dict(do_sample=False)
    for start in range(0, len(images), batch_size):
        inputs = adapter.image_inputs(images[start : start + batch_size], prompt, use_chat_template).to(adapter.device)
        if do_sample:
            torch.manual_seed(seed + start)
        with around(inputs) if around else nullcontext():
            out = adapter.model.generate(**inputs, max_new_tokens=max_new_tokens, **sampling)
        new_tokens = out[:, inputs["input_ids"].shape[1] :]
        texts += [t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    return texts
