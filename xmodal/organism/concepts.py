"""The organism's concepts as matched text/image pairs, drawn fresh from its world.

Each concept is one attribute value of the world: a colour ("red"), a shape
("circle"), a count ("two"), a background ("snow") or a rendered word ("cat").
Its images are world scenes with that value fixed and everything else drawn at
random; its text is the word itself. Every concept has a confusable partner
(red/orange, circle/square, sky/sea, cat/dog ...).
"""

from __future__ import annotations

import hashlib
from dataclasses import replace

import numpy as np

from xmodal.data.concepts import Concept, ConceptDataset, ConceptImage, encode_png
from xmodal.errors import ConfigError
from xmodal.organism import world

PARTNERS = {
    "colour": {
        "red": "orange",
        "orange": "red",
        "yellow": "green",
        "green": "yellow",
        "blue": "purple",
        "purple": "pink",
        "pink": "purple",
        "brown": "black",
        "black": "brown",
    },
    "shape": {"circle": "square", "square": "circle", "triangle": "diamond", "diamond": "triangle", "star": "cross", "cross": "star"},
    "count": {"two": "three", "three": "two"},
    "background": {"sky": "sea", "sea": "sky", "grass": "snow", "snow": "grass"},
    "word": {
        "cat": "dog",
        "dog": "cat",
        "sun": "moon",
        "moon": "sun",
        "car": "boat",
        "boat": "car",
        "fish": "bird",
        "bird": "fish",
        "tree": "house",
        "house": "tree",
        "apple": "book",
        "book": "apple",
    },
}
CATEGORIES = tuple(PARTNERS)


def concept_name(category: str, value: str) -> str:
    return f"word_{value}" if category == "word" else value


def scene_for(category: str, value: str, rng: np.random.Generator) -> world.Scene:
    """A random world scene showing `value` of `category`."""
    if category == "word":
        return world.Scene(kind="words", word=value)
    scene = world.random_scene(rng, word_fraction=0.0)
    if category == "colour":
        return replace(scene, colour=value)
    if category == "shape":
        return replace(scene, shape=value)
    if category == "background":
        return replace(scene, background=value)
    count = {"two": 2, "three": 3}[value]
    return replace(scene, count=count, size="small", position="")


def organism_concepts(name: str = "organism_concepts", images_per_concept: int = 4, seed: int = 0, categories: list[str] | None = None) -> ConceptDataset:
    if images_per_concept < 1:
        raise ConfigError(f"dataset.images_per_concept={images_per_concept} must be at least 1")
    categories = list(categories or CATEGORIES)
    unknown = sorted(set(categories) - set(CATEGORIES))
    if unknown:
        raise ConfigError(f"dataset.categories has {unknown}; the organism's categories are {list(CATEGORIES)}")
    concepts, images = [], []
    for category in categories:
        for value, partner in PARTNERS[category].items():
            concept = concept_name(category, value)
            concepts.append(Concept(concept, value, category=category, partner=concept_name(category, partner)))
            for index in range(images_per_concept):
                # Stable across processes (Python's hash() is salted per process).
                entropy = int.from_bytes(hashlib.sha256(f"{seed}/{concept}/{index}".encode()).digest()[:8], "little")
                rng = np.random.default_rng(entropy)
                scene = scene_for(category, value, rng)
                images.append(ConceptImage(concept, f"organism:{scene.caption}", encode_png(world.render(scene, rng)), scene.caption))
    return ConceptDataset(name, concepts, images)
