"""The processor's own map from a square image to its pixel tensor, found by probing, for pixel synthesis.

A dynamic-resolution processor (Qwen's patches with their temporal copy, LLaVA-NeXT's base image and
padded tiles, InternVL's tiles, Idefics3's global view) fed an image of the side its adapter names
(`ModelAdapter.synthesis_side`) does not resample it: each element of its output is one input value,
rescaled and normalised, or a constant (padding). That map is read off the processor itself, so no
family's layout is written twice: an all-0 and an all-255 image give each element's scale and offset,
three images whose values spell each input's flat index in base 256 give its source, and a random
image checks the whole map against the processor. A processor that does resample at that side fails
the check, in one line, instead of optimising pixels through the wrong map.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from xmodal.errors import ConfigError

PROBE_BYTES = 3  # base-256 digits of a flat (y, x, channel) index: sides up to 2,364 pixels
TOLERANCE = 1e-4  # on normalised values of order 1; float32 rounding is ~1e-7


class PixelMap:
    """pixel_values = scale * (255 * image)[source] + offset; `source` -1 marks a constant element."""

    def __init__(self, side: int, shape: tuple[int, ...], source: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> None:
        self.side, self.shape = side, shape
        self.source, self.scale, self.offset = source, scale, offset
        # What the hot path needs: where to read (a constant reads 0, then scale 0 keeps only its offset).
        self._read, self._scale, self._offset = source.clamp(min=0), scale * (source >= 0), offset

    @classmethod
    def probe(cls, side: int, pixel_values: Callable[[Image.Image], torch.Tensor], name: str) -> PixelMap:
        """Read the map off `pixel_values` (one S x S image -> the processor's pixel tensor for it)."""

        def run(array: np.ndarray) -> np.ndarray:
            return pixel_values(Image.fromarray(array.astype(np.uint8), "RGB")).double().numpy()

        zeros = run(np.zeros((side, side, 3)))
        scale = (run(np.full((side, side, 3), 255)) - zeros).ravel() / 255
        constant = np.abs(scale) < 1e-9
        flat_index = np.arange(side * side * 3).reshape(side, side, 3)
        source = np.zeros(zeros.size, dtype=np.int64)
        with np.errstate(divide="ignore", invalid="ignore"):
            for digit in range(PROBE_BYTES):
                values = (run((flat_index >> (8 * digit)) & 255) - zeros).ravel() / scale
                source += np.rint(np.where(constant, 0, values)).astype(np.int64).clip(0, 255) << (8 * digit)
        source = np.where(constant, -1, source.clip(max=side * side * 3 - 1))
        pixel_map = cls(side, zeros.shape, torch.from_numpy(source), torch.from_numpy(scale).float(), torch.from_numpy(zeros.ravel()).float())
        check = np.random.default_rng(0).integers(0, 256, (side, side, 3))
        expected = torch.from_numpy(run(check)).float()
        got = pixel_map(torch.from_numpy(check / 255).float().permute(2, 0, 1)[None])
        error = float((got - expected).abs().max())
        if error > TOLERANCE:
            raise ConfigError(
                f"model {name!r}: its processor resamples a {side}x{side} image (the probed map is off by {error:.3g}), so pixels "
                "cannot be optimised through it; its adapter's synthesis_side must be a size the processor only rescales, "
                "normalises and rearranges"
            )
        return pixel_map

    def __call__(self, unit_images: torch.Tensor) -> torch.Tensor:
        """(n, 3, S, S) in [0, 1] -> the processor's pixel tensor for the n images, differentiably
        (each image's block concatenated on the first axis, as the processor batches them)."""
        n = unit_images.shape[0]
        if self._read.device != unit_images.device:  # moved once: every synthesis step calls this
            self._read, self._scale, self._offset = (t.to(unit_images.device) for t in (self._read, self._scale, self._offset))
        values = 255 * unit_images.permute(0, 2, 3, 1).reshape(n, -1)  # (y, x, channel) order, as probed
        out = values[:, self._read] * self._scale + self._offset
        return out.reshape(n * self.shape[0], *self.shape[1:])


def probed_pixel_map(adapter: Any, side: int, prompt: str, processor_kwargs: dict[str, Any]) -> PixelMap:
    """The map for `adapter`'s processor at `side`, read through its own image_inputs."""

    def pixel_values(image: Image.Image) -> torch.Tensor:
        return adapter.image_inputs([image], prompt, True, **processor_kwargs)["pixel_values"].cpu()

    return PixelMap.probe(side, pixel_values, adapter.name)
