"""The organism's world: seeded, captioned 64x64 images of shapes, backgrounds and words.

Everything the organism ever sees comes from here, so its ground truth is known:
each image is drawn from a `Scene`, and its caption is a fixed function of the scene.

Two kinds of scene:
- shapes: one to three shapes of one colour and size, at a position (single shapes
  only) on a background. Caption: "a small red circle on the left in the snow",
  "two big blue squares on the grass".
- words: a word rendered in black on a plain background. Caption: "the word cat".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from xmodal.data.shapes import SHAPES, draw_shape

IMAGE_SIZE = 64
SUPERSAMPLE = 4  # shapes are drawn 4x larger and downsampled, for clean edges

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 30),
    "green": (40, 160, 50),
    "blue": (30, 70, 220),
    "purple": (130, 40, 170),
    "pink": (250, 130, 190),
    "brown": (120, 70, 30),
    "black": (20, 20, 20),
}
OUTLINE = (0, 0, 0)  # every shape has a black outline
SIZES = {"small": 0.15, "big": 0.26}  # shape radius as a fraction of the image side
COUNTS = {1: "a", 2: "two", 3: "three"}
POSITIONS = {  # centre of a single shape, as fractions of the side
    "on the left": (0.27, 0.5),
    "on the right": (0.73, 0.5),
    "at the top": (0.5, 0.27),
    "at the bottom": (0.5, 0.73),
    "in the middle": (0.5, 0.5),
}
# Background name -> (base colour, texture), with its caption phrase.
BACKGROUNDS: dict[str, tuple[tuple[int, int, int], str]] = {
    "plain": ((235, 235, 235), "flat"),
    "sky": ((150, 200, 245), "gradient"),
    "grass": ((110, 175, 80), "blades"),
    "snow": ((250, 250, 255), "speckle"),
    "sea": ((40, 110, 170), "waves"),
}
BACKGROUND_PHRASES = {"plain": "", "sky": "in the sky", "grass": "on the grass", "snow": "in the snow", "sea": "in the sea"}
WORDS = ("cat", "dog", "sun", "tree", "car", "fish", "bird", "house", "apple", "boat", "moon", "book")


@dataclass(frozen=True)
class Scene:
    kind: str  # "shapes" or "words"
    colour: str = ""
    shape: str = ""
    size: str = ""
    count: int = 1
    position: str = ""  # single shapes only
    background: str = "plain"
    word: str = ""

    @property
    def caption(self) -> str:
        if self.kind == "words":
            return f"the word {self.word}"
        noun = self.shape if self.count == 1 else f"{self.shape}es" if self.shape.endswith("s") else f"{self.shape}s"
        parts = [COUNTS[self.count], self.size, self.colour, noun]
        if self.count == 1:
            parts.append(self.position)
        parts.append(BACKGROUND_PHRASES[self.background])
        return " ".join(p for p in parts if p)


def random_scene(rng: np.random.Generator, word_fraction: float = 0.15) -> Scene:
    if rng.random() < word_fraction:
        return Scene(kind="words", word=str(rng.choice(WORDS)))
    count = int(rng.choice(list(COUNTS)))
    return Scene(
        kind="shapes",
        colour=str(rng.choice(list(COLOURS))),
        shape=str(rng.choice(SHAPES)),
        size=str(rng.choice(list(SIZES))) if count == 1 else "small",
        count=count,
        position=str(rng.choice(list(POSITIONS))) if count == 1 else "",
        background=str(rng.choice(list(BACKGROUNDS))),
    )


def scenes(seed: int, n: int, word_fraction: float = 0.15) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [random_scene(rng, word_fraction) for _ in range(n)]


def render(scene: Scene, rng: np.random.Generator) -> Image.Image:
    """Draw a scene; `rng` jitters positions, sizes and textures (the caption does not change)."""
    if scene.kind == "words":
        return _render_word(scene.word, rng)
    side = IMAGE_SIZE * SUPERSAMPLE
    canvas = _background(scene.background, rng, side)
    draw = ImageDraw.Draw(canvas)
    crowding = 1.0 if scene.count == 1 else 0.8  # several shapes must not touch
    radius = SIZES[scene.size] * side * rng.uniform(0.85, 1.15) * crowding
    for cx, cy in _centres(scene, rng):
        draw_shape(draw, scene.shape, cx * side, cy * side, radius, COLOURS[scene.colour], OUTLINE, max(2, int(radius * 0.08)))
    return canvas.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)


def render_scene(scene: Scene, seed: int) -> Image.Image:
    return render(scene, np.random.default_rng(seed))


def captioned_images(seed: int, n: int, word_fraction: float = 0.15) -> Iterator[tuple[Image.Image, Scene]]:
    """`n` fresh (image, scene) pairs; the same seed gives the same pairs."""
    rng = np.random.default_rng(seed)
    for _ in range(n):
        scene = random_scene(rng, word_fraction)
        yield render(scene, rng), scene


# ------------------------------------------------------------------ drawing --
def _centres(scene: Scene, rng: np.random.Generator) -> list[tuple[float, float]]:
    jitter = lambda: rng.uniform(-0.05, 0.05)  # noqa: E731
    if scene.count == 1:
        x, y = POSITIONS[scene.position]
        return [(x + jitter(), y + jitter())]
    if scene.count == 2:
        layouts = [[(0.28, 0.5), (0.72, 0.5)], [(0.5, 0.28), (0.5, 0.72)], [(0.3, 0.3), (0.7, 0.7)]]
    else:
        layouts = [[(0.2, 0.5), (0.5, 0.5), (0.8, 0.5)], [(0.27, 0.3), (0.73, 0.3), (0.5, 0.74)]]
    layout = layouts[int(rng.integers(len(layouts)))]
    return [(x + jitter(), y + jitter()) for x, y in layout]


def _background(name: str, rng: np.random.Generator, side: int) -> Image.Image:
    base, texture = BACKGROUNDS[name]
    pixels = np.empty((side, side, 3), dtype=np.float32)
    pixels[:] = base
    ys = np.linspace(0.0, 1.0, side)[:, None, None]
    if texture == "gradient":  # sky: lighter towards the horizon
        pixels += ys * 60.0
    elif texture == "blades":  # grass: vertical streaks
        streaks = rng.normal(0.0, 18.0, size=(1, side // 8, 1)).repeat(8, axis=1)
        pixels += streaks + rng.normal(0.0, 6.0, size=(side, side, 1))
    elif texture == "speckle":  # snow: grey flecks
        pixels -= (rng.random((side, side, 1)) < 0.02) * 60.0
    elif texture == "waves":  # sea: horizontal bands
        phase = rng.uniform(0, 2 * math.pi)
        xs = np.linspace(0.0, 1.0, side)[None, :, None]
        pixels += 25.0 * np.sin(ys * 40.0 + 3.0 * np.sin(xs * 8.0) + phase)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _render_word(word: str, rng: np.random.Generator) -> Image.Image:
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUNDS["plain"][0])
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=int(rng.integers(15, 19)))  # Pillow's built-in font: same on every machine
    left, top, right, bottom = draw.textbbox((0, 0), word, font=font)
    x = (IMAGE_SIZE - (right - left)) / 2 - left + rng.uniform(-3, 3)
    y = (IMAGE_SIZE - (bottom - top)) / 2 - top + rng.uniform(-6, 6)
    draw.text((x, y), word, fill=(0, 0, 0), font=font)
    return image
