"""The organism's own DAS judge: its world is known, so a program reads the images.

Colour: the palette colour most of the image's coloured pixels are closest to; pixels
closer to the grey canvas DAS starts from or to the world's white backdrop than to any
palette colour do not vote, nor does a world background filling the image (sky, grass
...). Shape: a logistic-regression classifier (scikit-learn) trained on rendered world
images, reading the map of how far each pixel is from the image's median colour. Its
accuracy on fresh rendered images is reported as the judge's ceiling.

`experiment=das experiment.judge=organism` builds it through the DAS config's
`programmatic_judge` (its import path), so the framework does not import the organism.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Sequence

import numpy as np
import pandas as pd
from PIL import Image
from sklearn.linear_model import LogisticRegression

from xmodal.organism import world

log = logging.getLogger(__name__)

JUDGE_SIDE = 16  # shape features: a 16x16 map of distance from the median colour


def _unit_array(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB").resize((world.IMAGE_SIZE, world.IMAGE_SIZE)), dtype=np.float32) / 255.0


def shape_features(image: Image.Image) -> np.ndarray:
    """How far each pixel is from the image's median colour, pooled to 16x16 and scaled to max 1."""
    pixels = _unit_array(image)
    distance = np.abs(pixels - np.median(pixels.reshape(-1, 3), axis=0)).sum(axis=-1)
    pooled = distance.reshape(JUDGE_SIDE, world.IMAGE_SIZE // JUDGE_SIDE, JUDGE_SIDE, -1).mean(axis=(1, 3))
    return (pooled / max(float(pooled.max()), 1e-6)).ravel()


class OrganismJudge:
    """Judges colour and shape concepts on organism-world images; other categories are not judged."""

    categories = ("colour", "shape")

    def __init__(self, seed: int = 0, n_train: int = 1200, min_distance: float = 0.15) -> None:
        self.min_distance = min_distance
        self.palette = np.array(list(world.COLOURS.values()), dtype=np.float32) / 255.0
        self.colour_names = list(world.COLOURS)
        # nearest-colour references: the palette, then grey and white (which do not vote)
        achromatic = np.array([[0.5, 0.5, 0.5], np.array(world.BACKGROUNDS["plain"][0]) / 255.0], dtype=np.float32)
        self.references = np.concatenate([self.palette, achromatic])
        self.backgrounds = np.array([colour for colour, _ in world.BACKGROUNDS.values()], dtype=np.float32) / 255.0
        train_scenes, train_images = self._single_shapes(seed, n_train)
        self.shape_classifier = LogisticRegression(max_iter=3000, C=1.0)
        self.shape_classifier.fit(np.stack([shape_features(i) for i in train_images]), [s.shape for s in train_scenes])
        test_scenes, test_images = self._single_shapes(seed + 1, 300)
        self.ceiling = {
            "shape": float(np.mean([p == s.shape for p, s in zip(self.predict_shapes(test_images), test_scenes)])),
            "colour": float(np.mean([self.predict_colour(i) == s.colour for i, s in zip(test_images, test_scenes)])),
        }
        log.info("organism judge accuracy on fresh plain-background world images: %s", self.ceiling)

    @staticmethod
    def _single_shapes(seed: int, n: int) -> tuple[list[world.Scene], list[Image.Image]]:
        """Single shapes on a plain background: what a concept image should look like at best."""
        rng = np.random.default_rng(seed)
        scenes = [replace(world.random_scene(rng, word_fraction=0.0), count=1, background="plain") for _ in range(n)]
        scenes = [s if s.position else replace(s, position="in the middle") for s in scenes]
        return scenes, [world.render(s, rng) for s in scenes]

    def predict_colour(self, image: Image.Image) -> str:
        pixels = _unit_array(image).reshape(-1, 3)
        median = np.median(pixels, axis=0)
        if np.abs(self.backgrounds - median).sum(axis=1).min() < 2 * self.min_distance:
            # a world background fills the image: its pixels are the backdrop, not the concept
            pixels = pixels[np.abs(pixels - median).sum(axis=1) > self.min_distance]
        # Grey (the DAS canvas) and white are not palette colours: such pixels do not vote. The
        # median is not removed otherwise, since a DAS image may be its concept's colour throughout.
        nearest = np.argmin(((pixels[:, None, :] - self.references[None]) ** 2).sum(axis=-1), axis=1)
        votes = np.bincount(nearest, minlength=len(self.references))[: len(self.palette)]
        return self.colour_names[int(votes.argmax())] if votes.sum() else "none"

    def predict_shapes(self, images: Sequence[Image.Image]) -> list[str]:
        return list(self.shape_classifier.predict(np.stack([shape_features(i) for i in images])))

    @staticmethod
    def score(answer: str, concept: str, question: str = "") -> float:
        return float(answer == concept)

    def judge(self, images: Sequence[Image.Image], concepts: Sequence[str], categories: Sequence[str]) -> pd.DataFrame:
        shapes = self.predict_shapes(images)
        rows = []
        for image, shape, concept, category in zip(images, shapes, concepts, categories):
            if category not in self.categories:
                continue
            answer = self.predict_colour(image) if category == "colour" else shape
            rows.append(
                {"concept": concept, "category": category, "protocol": "programmatic", "question": "", "answer": answer, "recognised": float(answer == concept)}
            )
        return pd.DataFrame(rows, columns=["concept", "category", "protocol", "question", "answer", "recognised"])
