"""Read resid_post of decoder layers with forward hooks, stopping after the deepest one.

resid_post of layer L is the output of decoder layer L: for every layer but the
last it equals ``output_hidden_states[L + 1]`` of a plain forward (the last gets
the final norm applied there). Raising from the deepest layer's hook skips the
remaining layers and the LM head, which is where most of the time goes for early
layers of a large-vocabulary model.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn


@contextmanager
def output_replaced(module: nn.Module, replace: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Within the block, `module`'s output hidden state (a decoder layer's resid_post: the first element
    when it returns a tuple) is `replace(hidden)` in every forward pass: steering and SAE splicing."""

    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        hidden = output[0] if isinstance(output, tuple) else output
        new = replace(hidden)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


class StopForward(Exception):
    """Raised inside a hook once every requested layer has been read."""


@contextmanager
def resid_post_hooks(
    decoder_layers: nn.ModuleList, layers: Sequence[int], stop_after_deepest: bool = True, detach: bool = True
) -> Iterator[dict[int, torch.Tensor]]:
    """Within the block, forward passes fill the yielded dict: layer -> (batch, seq, d_model).

    `detach=False` keeps the graph, for optimising inputs through the layers (image synthesis).
    """
    captured: dict[int, torch.Tensor] = {}
    deepest = max(layers)

    def make_hook(layer: int):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            hidden = output[0] if isinstance(output, tuple) else output
            captured[layer] = hidden.detach() if detach else hidden
            if stop_after_deepest and layer == deepest:
                raise StopForward

        return hook

    handles = [decoder_layers[layer].register_forward_hook(make_hook(layer)) for layer in sorted(set(layers))]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def run_to_layers(
    model: nn.Module, decoder_layers: nn.ModuleList, inputs: dict[str, Any], layers: Sequence[int], grad: bool = False
) -> dict[int, torch.Tensor]:
    """One forward pass that returns resid_post for each requested layer and computes nothing past them.

    `grad=True` keeps the autograd graph back to the inputs (e.g. pixel values being optimised).
    """
    with torch.enable_grad() if grad else torch.inference_mode(), resid_post_hooks(decoder_layers, layers, detach=not grad) as captured:
        try:
            model(**inputs, use_cache=False)
        except StopForward:
            pass
    missing = set(layers) - set(captured)
    if missing:
        raise RuntimeError(f"hooks on layers {sorted(missing)} did not fire; is the decoder path right?")
    return captured
