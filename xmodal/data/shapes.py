"""Flat shapes drawn with Pillow: one drawing routine for the synthetic dataset and the organism's world."""

from __future__ import annotations

import math

from PIL import ImageDraw

SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross")


def shape_outline(shape: str, cx: float, cy: float, r: float, square_scale: float = 0.85) -> list[tuple[float, float]]:
    """Polygon corners of a shape of 'radius' r centred at (cx, cy); circles are not polygons.

    `square_scale` is a square's half side as a fraction of r (0.85: about a circle's area).
    """
    if shape == "square":
        s = r * square_scale
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r * 0.8, cy), (cx, cy + r), (cx - r * 0.8, cy)]
    if shape == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "star":
        return [
            (cx + rr * math.cos(a), cy + rr * math.sin(a)) for i in range(10) for a, rr in [(-math.pi / 2 + i * math.pi / 5, r if i % 2 == 0 else r * 0.42)]
        ]
    if shape == "cross":
        a, b = r * 0.32, r * 0.95
        return [
            (cx - a, cy - b),
            (cx + a, cy - b),
            (cx + a, cy - a),
            (cx + b, cy - a),
            (cx + b, cy + a),
            (cx + a, cy + a),
            (cx + a, cy + b),
            (cx - a, cy + b),
            (cx - a, cy + a),
            (cx - b, cy + a),
            (cx - b, cy - a),
            (cx - a, cy - a),
        ]
    raise ValueError(f"unknown shape {shape!r}; the shapes are {', '.join(SHAPES)}")


def draw_shape(
    draw: ImageDraw.ImageDraw,
    shape: str,
    cx: float,
    cy: float,
    r: float,
    fill: tuple[int, int, int],
    outline: tuple[int, int, int] | None = None,
    width: int = 0,
    square_scale: float = 0.85,
) -> None:
    """Draw one filled shape (with an outline of `width` pixels when `outline` is given)."""
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill, outline=outline, width=width)
    else:
        draw.polygon(shape_outline(shape, cx, cy, r, square_scale), fill=fill, outline=outline, width=width)
