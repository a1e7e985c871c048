"""Coloured shapes drawn offline: a concept dataset for tests and demos that needs no download.

Concepts are colour-shape pairs ("a red circle"); each concept's partner has the same
shape in a confusable colour (red/orange, blue/purple, green/yellow). Positions, sizes
and background shades are drawn from a generator seeded by (seed, concept, index).
"""

from __future__ import annotations

import hashlib

import numpy as np
from PIL import Image, ImageDraw

from xmodal.data.concepts import Concept, ConceptDataset, ConceptImage, encode_png
from xmodal.data.shapes import draw_shape
from xmodal.errors import ConfigError

COLOURS = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "blue": (30, 60, 220),
    "purple": (140, 40, 190),
    "green": (30, 170, 50),
    "yellow": (240, 220, 30),
}
PARTNER_COLOUR = {"red": "orange", "orange": "red", "blue": "purple", "purple": "blue", "green": "yellow", "yellow": "green"}
SHAPES = ("circle", "square")


def draw_concept(shape: str, rgb: tuple[int, int, int], size: int, rng: np.random.Generator) -> Image.Image:
    shade = int(rng.integers(200, 250))
    img = Image.new("RGB", (size, size), (shade, shade, shade))
    draw = ImageDraw.Draw(img)
    radius = rng.uniform(0.18, 0.32) * size
    cx, cy = rng.uniform(radius, size - radius, size=2)
    draw_shape(draw, shape, cx, cy, radius, rgb, square_scale=1.0)  # squares as wide as the circles
    return img


def synthetic_shapes(name: str = "synthetic", images_per_concept: int = 3, image_size: int = 64, seed: int = 0) -> ConceptDataset:
    if images_per_concept < 1:
        raise ConfigError(f"dataset.images_per_concept={images_per_concept} must be at least 1")
    if image_size < 16:
        raise ConfigError(f"dataset.image_size={image_size} is too small to draw a shape; use 16 or more")
    concepts, images = [], []
    for shape in SHAPES:
        for colour, rgb in COLOURS.items():
            concept = f"{colour}_{shape}"
            concepts.append(Concept(concept, f"a {colour} {shape}", category=shape, partner=f"{PARTNER_COLOUR[colour]}_{shape}"))
            for index in range(images_per_concept):
                # Stable across processes (Python's hash() is salted per process).
                entropy = int.from_bytes(hashlib.sha256(f"{seed}/{concept}/{index}".encode()).digest()[:8], "little")
                img = draw_concept(shape, rgb, image_size, np.random.default_rng(entropy))
                images.append(ConceptImage(concept, f"synthetic:{concept}/{index}", encode_png(img)))
    return ConceptDataset(name, concepts, images)
