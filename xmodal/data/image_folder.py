"""Your photos as a concept dataset: ``<root>/<concept>/*.jpg|png`` and an optional ``concepts.csv``.

``concepts.csv`` has a ``concept`` column (the folder name) and optionally ``category``,
``text`` (defaults to the folder name with spaces) and ``partner``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from xmodal.data.concepts import Concept, ConceptDataset, read_image_file
from xmodal.errors import DatasetError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


def read_concept_images(root: Path, concept: str, max_images: int | None) -> list:
    folder = root / concept
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
    if not files:
        raise DatasetError(f"concept folder {str(folder)!r} holds no image (.jpg, .jpeg, .png, .webp, .bmp); add images or remove it")
    return [read_image_file(p, concept) for p in files[:max_images]]


def read_concepts_csv(path: Path) -> pd.DataFrame:
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    if "concept" not in table.columns:
        raise DatasetError(f"{str(path)!r} needs a 'concept' column; it has {list(table.columns)}")
    return table


def image_folder(name: str, root: str, max_images_per_concept: int | None = None) -> ConceptDataset:
    root_path = Path(root).expanduser()
    if not root_path.is_dir():
        raise DatasetError(f"dataset root {root!r} does not exist or is not a folder; set dataset.root=<folder>")
    csv_path = root_path / "concepts.csv"
    if csv_path.exists():
        table = read_concepts_csv(csv_path)
    else:
        folders = sorted(p.name for p in root_path.iterdir() if p.is_dir() and not p.name.startswith("."))
        table = pd.DataFrame({"concept": folders})
    concepts, images = [], []
    for row in table.to_dict("records"):
        concept = row["concept"]
        concepts.append(
            Concept(
                concept,
                row.get("text") or concept.replace("_", " "),
                category=row.get("category", ""),
                partner=row.get("partner") or None,
            )
        )
        images.extend(read_concept_images(root_path, concept, max_images_per_concept))
    log.info("Dataset %s: %d concepts, %d images from %s", name, len(concepts), len(images), root_path)
    return ConceptDataset(name, concepts, images)
