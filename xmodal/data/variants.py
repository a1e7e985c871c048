"""Image variants for attribute probes: the same images made darker/brighter or less/more red."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageEnhance

from xmodal.data.concepts import ConceptDataset, ConceptImage, encode_png

# Each attribute: (low label, high label, transform(image, factor)), applied with factors 0.5 and 1.5.
FACTORS = (0.5, 1.5)


def _brightness(img: Image.Image, factor: float) -> Image.Image:
    return ImageEnhance.Brightness(img).enhance(factor)


def _redness(img: Image.Image, factor: float) -> Image.Image:
    pixels = np.asarray(img, dtype=np.float32).copy()
    pixels[..., 0] = np.clip(pixels[..., 0] * factor, 0, 255)
    return Image.fromarray(pixels.astype(np.uint8))


ATTRIBUTES = {"brightness": ("darker", "brighter", _brightness), "redness": ("less_red", "more_red", _redness)}


def attribute_variants(dataset: ConceptDataset, attribute: str) -> tuple[ConceptDataset, np.ndarray, np.ndarray]:
    """A dataset of two variants per image, their labels, and the index of the source image (for grouped CV)."""
    low, high, transform = ATTRIBUTES[attribute]
    images, labels, groups = [], [], []
    for index, original in enumerate(dataset.images):
        base = original.load()
        for label, factor in zip((low, high), FACTORS):
            images.append(ConceptImage(original.concept, f"{original.source}#{label}", encode_png(transform(base, factor))))
            labels.append(label)
            groups.append(index)
    return ConceptDataset(f"{dataset.name}-{attribute}", dataset.concepts, images), np.array(labels), np.array(groups)
