"""Matched concept pairs: each concept has one text and one or more images."""

from __future__ import annotations

import functools
import hashlib
import io
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable

from PIL import Image, UnidentifiedImageError

from xmodal.errors import DatasetError


@dataclass(frozen=True)
class Concept:
    name: str  # identifier, e.g. "eiffel_tower"
    text: str  # what the text modality reads, e.g. "Eiffel Tower"
    category: str = ""
    partner: str | None = None  # a confusable concept, for specificity (cat / dog)
    synonyms: tuple[str, ...] = ()  # other answers that name it (a judge's rubric): "fall" for autumn


@dataclass
class ConceptImage:
    concept: str
    source: str  # file path, or a description of how it was drawn
    data: bytes  # encoded image bytes: hashed for the cache key, decoded on load()
    caption: str = ""  # what the image shows, in words, where the dataset knows it (text for SAE training)

    def load(self) -> Image.Image:
        return Image.open(io.BytesIO(self.data)).convert("RGB")

    @functools.cached_property
    def digest(self) -> bytes:
        """SHA-256 of the image's bytes, computed once per image (every cache key of a job reuses it)."""
        return hashlib.sha256(self.data).digest()


def read_image_file(path: Path, concept: str) -> ConceptImage:
    """Read and fully decode an image file; a corrupt file is a DatasetError naming it."""
    data = path.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DatasetError(f"image {str(path)!r} of concept {concept!r} cannot be read ({err}); remove or replace the file") from err
    return ConceptImage(concept=concept, source=str(path), data=data)


def encode_png(img: Image.Image) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()


def without_partners_outside(concepts: Iterable[Concept]) -> list[Concept]:
    """Copies of `concepts` whose partners outside them are cleared: for a subset chosen on purpose
    (concepts without photos, a study's chosen few), where the caller says so."""
    concepts = list(concepts)
    known = {c.name for c in concepts}
    return [c if c.partner is None or c.partner in known else replace(c, partner=None) for c in concepts]


@dataclass
class ConceptDataset:
    name: str
    concepts: list[Concept]
    images: list[ConceptImage] = field(default_factory=list)
    text_only: bool = False  # e.g. DAS's word lists: no concept needs an image

    def __post_init__(self) -> None:
        names = [c.name for c in self.concepts]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise DatasetError(f"dataset {self.name!r} lists concepts more than once: {duplicates}")
        if len(self.concepts) < 2:
            raise DatasetError(f"dataset {self.name!r} has {len(self.concepts)} concept(s); cross-modal statistics need at least 2")
        known = set(names)
        strangers = [(c.name, c.partner) for c in self.concepts if c.partner is not None and c.partner not in known]
        if strangers:
            # Dropping the pairing would turn specificity into NaN without a word.
            concept, partner = strangers[0]
            raise DatasetError(
                f"dataset {self.name!r}: concept {concept!r} names partner {partner!r}, which is not a concept of the "
                f"dataset ({len(strangers)} such partner(s)); fix the partner column or add {partner!r}"
            )
        for img in self.images:
            if img.concept not in known:
                raise DatasetError(f"image {img.source!r} belongs to unknown concept {img.concept!r}")
        without = [c.name for c in self.concepts if not any(i.concept == c.name for i in self.images)]
        if without and not self.text_only:
            raise DatasetError(f"dataset {self.name!r}: concepts without any image: {without[:10]}; add images or drop them")

    def concept(self, name: str) -> Concept:
        return next(c for c in self.concepts if c.name == name)

    def content_hash(self) -> str:
        """Hash of everything the model sees: concept texts, order, and image bytes."""
        digest = hashlib.sha256()
        for c in self.concepts:
            digest.update(f"{c.name}\x00{c.text}\x00".encode())
        for img in self.images:
            digest.update(img.concept.encode() + b"\x00" + img.digest)
        return digest.hexdigest()
