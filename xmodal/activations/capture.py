"""Read resid_post (or another site) of decoder layers with forward hooks, stopping after the deepest one.

resid_post of layer L is the output of decoder layer L: for every layer but the
last it equals ``output_hidden_states[L + 1]`` of a plain forward (the last gets
the final norm applied there). Raising from the deepest layer's hook skips the
remaining layers and the LM head, which is where most of the time goes for early
layers of a large-vocabulary model.

Other sites (mlp_out, attn_out, a transcoder's mlp_in) are a module's output or input inside
the layer: a ``HookPoint`` (``ModelAdapter.hook_point``) says which; wherever a decoder layer is
taken below, a HookPoint may stand instead.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from xmodal.models.base import HookPoint, HookSide, ModelAdapter

Target = nn.Module | HookPoint  # a decoder layer (its output: resid_post), or a site's module and side


def as_hook_point(target: Target) -> HookPoint:
    return target if isinstance(target, HookPoint) else HookPoint(target)


def _first(value: Any) -> torch.Tensor:
    return value[0] if isinstance(value, tuple) else value


def _with_first(value: Any, new: torch.Tensor) -> Any:
    return (new, *value[1:]) if isinstance(value, tuple) else new


def register_site_hook(target: Target, read: Callable[[torch.Tensor], torch.Tensor | None]) -> torch.utils.hooks.RemovableHandle:
    """`read(tensor)` on every forward pass through the site; a tensor it returns replaces the site's."""
    point = as_hook_point(target)
    if point.side == HookSide.input:

        def pre_hook(module: nn.Module, args: tuple) -> tuple | None:
            new = read(args[0])
            return None if new is None else (new, *args[1:])

        return point.module.register_forward_pre_hook(pre_hook)

    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        new = read(_first(output))
        return None if new is None else _with_first(output, new)

    return point.module.register_forward_hook(hook)


@contextmanager
def output_replaced(module: Target, replace: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Within the block, `module`'s output hidden state (a decoder layer's resid_post: the first element
    when it returns a tuple), or the site a HookPoint names, is `replace(hidden)` in every forward pass:
    steering and SAE splicing."""
    handle = register_site_hook(module, replace)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def transcoded(read: Target, write: Target, transcode: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Within the block, the tensor at `write` is `transcode` of the tensor at `read` in the same forward
    pass: a transcoder in place of its MLP (read: the layer's mlp_in, write: its mlp_out)."""
    seen: list[torch.Tensor] = []

    def keep(tensor: torch.Tensor) -> None:
        seen[:] = [tensor]

    def replace(tensor: torch.Tensor) -> torch.Tensor:
        if not seen:
            raise RuntimeError("the write site ran before the read site; a transcoder reads before it writes")
        return transcode(seen.pop()).to(tensor.dtype)

    handles = [register_site_hook(read, keep), register_site_hook(write, replace)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class StopForward(Exception):
    """Raised inside a hook once every requested layer has been read."""


@contextmanager
def resid_post_hooks(
    decoder_layers: Sequence[Target], layers: Sequence[int], stop_after_deepest: bool = True, detach: bool = True
) -> Iterator[dict[int, torch.Tensor]]:
    """Within the block, forward passes fill the yielded dict: layer -> (batch, seq, d_model).

    `decoder_layers[layer]` is a decoder layer (resid_post) or a HookPoint (another site; see
    ``site_points``). `detach=False` keeps the graph, for optimising inputs through the layers
    (image synthesis).
    """
    captured: dict[int, torch.Tensor] = {}
    deepest = max(layers)

    def make_hook(layer: int) -> Callable[[torch.Tensor], None]:
        def read(hidden: torch.Tensor) -> None:
            captured[layer] = hidden.detach() if detach else hidden
            if stop_after_deepest and layer == deepest:
                raise StopForward

        return read

    handles = [register_site_hook(decoder_layers[layer], make_hook(layer)) for layer in sorted(set(layers))]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


class SitePoints:
    """The hook points of one site, indexed by layer like a decoder's ModuleList: pass it to
    ``run_to_layers`` or ``resid_post_hooks`` in place of the decoder layers to read that site."""

    def __init__(self, adapter: ModelAdapter, site: str) -> None:
        self.adapter, self.site = adapter, site
        adapter.site_module(site)  # an unknown site, or one the model lacks, fails here in one line

    def __getitem__(self, layer: int) -> HookPoint:
        return self.adapter.hook_point(layer, self.site)


def site_points(adapter: ModelAdapter, site: str) -> Sequence[Target]:
    """What run_to_layers reads for `site` of `adapter`: decoder layers for resid_post."""
    return adapter.decoder_layers() if str(getattr(site, "value", site)) == "resid_post" else SitePoints(adapter, site)


def run_to_layers(
    model: nn.Module, decoder_layers: Sequence[Target], inputs: dict[str, Any], layers: Sequence[int], grad: bool = False
) -> dict[int, torch.Tensor]:
    """One forward pass that returns resid_post (or the site of ``site_points``) for each requested layer
    and computes nothing past them.

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
