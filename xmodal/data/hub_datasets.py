"""Concept datasets from the Hugging Face hub (CIFAR-100, COCO captions ...) through `datasets`.

Two layouts:
- classification (`label_column`): each class is a concept, its text the class name,
  its images the first `max_images_per_concept` of the class (CIFAR-100: fine labels,
  with the coarse label as category; the partner is another class of the category);
- captions (`text_column`): each image is its own concept, its text the caption
  (COCO captions): matched pairs for overlap and MDS, not classes for probes.

Needs network or the dataset already in the `datasets` cache (HF_DATASETS_OFFLINE=1
then reads it from there); otherwise one clear error.
"""

from __future__ import annotations

import io
import logging
from typing import Any

from xmodal.data.concepts import Concept, ConceptDataset, ConceptImage
from xmodal.errors import ConfigError, DatasetError

log = logging.getLogger(__name__)


def load_hub_split(path: str, split: str, revision: str | None = None) -> Any:
    from datasets import load_dataset

    try:
        return load_dataset(path, split=split, revision=revision)
    except (ConnectionError, OSError, ValueError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DatasetError(
            f"could not load hub dataset {path!r} (split {split!r}): {first_line} To fix: run once where there is "
            "network so `datasets` caches it (then HF_DATASETS_OFFLINE=1 reads the cache), or use "
            "dataset=image_folder with the images on disk"
        ) from err


def _image_bytes(image: Any) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def hub_concepts(
    name: str,
    path: str,
    split: str = "test",
    image_column: str = "image",
    label_column: str | None = None,
    category_column: str | None = None,
    text_column: str | None = None,
    max_images_per_concept: int = 10,
    max_concepts: int | None = None,
    revision: str | None = None,
) -> ConceptDataset:
    if (label_column is None) == (text_column is None):
        raise ConfigError("set exactly one of dataset.label_column (classes) and dataset.text_column (captions)")
    data = load_hub_split(path, split, revision)
    missing = [c for c in (image_column, label_column, category_column, text_column) if c and c not in data.column_names]
    if missing:
        raise DatasetError(f"hub dataset {path!r} has no column(s) {missing}; its columns are {data.column_names}")
    if text_column:
        return _caption_pairs(name, path, data, image_column, text_column, max_concepts)
    return _classes(name, path, data, image_column, label_column, category_column, max_images_per_concept, max_concepts)


def _class_names(data: Any, column: str) -> list[str] | None:
    feature = data.features[column]
    return list(feature.names) if hasattr(feature, "names") else None


def _classes(name, path, data, image_column, label_column, category_column, per_concept, max_concepts) -> ConceptDataset:
    label_names = _class_names(data, label_column)
    category_names = _class_names(data, category_column) if category_column else None
    images: dict[str, list[ConceptImage]] = {}
    category_of: dict[str, str] = {}
    for index, row in enumerate(data):
        label = row[label_column]
        concept = label_names[label] if label_names else str(label)
        if concept not in images and max_concepts is not None and len(images) >= max_concepts:
            continue
        bucket = images.setdefault(concept, [])
        if len(bucket) < per_concept:
            bucket.append(ConceptImage(concept, f"{path}:{index}", _image_bytes(row[image_column])))
        if category_column:
            category = row[category_column]
            category_of[concept] = category_names[category] if category_names else str(category)
    names = sorted(images)
    concepts = []
    for concept in names:
        same_category = [c for c in names if c != concept and category_of.get(c) == category_of.get(concept)]
        partner = same_category[0] if same_category else None
        concepts.append(Concept(concept, concept.replace("_", " "), category=category_of.get(concept, ""), partner=partner))
    return ConceptDataset(name, concepts, [img for c in names for img in images[c]])


def _caption_pairs(name, path, data, image_column, text_column, max_concepts) -> ConceptDataset:
    concepts, images = [], []
    for index, row in enumerate(data):
        if max_concepts is not None and index >= max_concepts:
            break
        text = row[text_column]
        text = text[0] if isinstance(text, list) else text  # COCO rows carry several captions: the first
        concept = f"{path.split('/')[-1]}_{index}"
        concepts.append(Concept(concept, str(text), category="caption"))
        images.append(ConceptImage(concept, f"{path}:{index}", _image_bytes(row[image_column])))
    return ConceptDataset(name, concepts, images)
