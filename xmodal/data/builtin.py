"""The research plan's concept list (90 concepts in five categories), each with a confusable partner,
plus `snow` and `sand` (scenes), the concept and the setting of the plan's steering test (92 in all).

The list ships with xmodal (builtin_concepts.csv); the photos are yours, under
``<image_root>/<concept>/``. Concepts without a folder are left out with a warning.
"""

from __future__ import annotations

import logging
from importlib.resources import files
from pathlib import Path

import pandas as pd

from xmodal.data.concepts import Concept, ConceptDataset, without_partners_outside
from xmodal.data.image_folder import read_concept_images
from xmodal.errors import DatasetError

log = logging.getLogger(__name__)


def builtin_concept_table() -> pd.DataFrame:
    with files("xmodal.data").joinpath("builtin_concepts.csv").open() as f:
        return pd.read_csv(f, dtype=str, keep_default_na=False)


def select_categories(table: pd.DataFrame, categories: list[str] | None, listing: str) -> pd.DataFrame:
    """The rows of `table` in `categories` (all when none are given); an unknown category is a DatasetError."""
    known = sorted(table["category"].unique())
    wanted = list(categories) if categories else known
    unknown = sorted(set(wanted) - set(known))
    if unknown:
        raise DatasetError(f"unknown categories {unknown}; {listing} has {known}")
    return table[table["category"].isin(wanted)]


def builtin_concepts(
    name: str = "builtin",
    image_root: str | None = None,
    categories: list[str] | None = None,
    max_images_per_concept: int | None = None,
) -> ConceptDataset:
    table = select_categories(builtin_concept_table(), categories, "the built-in list")
    if image_root is None:
        raise DatasetError(
            "dataset=builtin needs photos: set dataset.image_root=<folder> with one subfolder per concept "
            f"(e.g. {table['concept'].iloc[0]}/); the concept names are in xmodal/data/builtin_concepts.csv"
        )
    root = Path(image_root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"dataset.image_root {image_root!r} does not exist or is not a folder")
    present = table[table["concept"].map(lambda c: (root / c).is_dir())]
    absent = sorted(set(table["concept"]) - set(present["concept"]))
    if absent:
        log.warning("Built-in concepts without a photo folder, left out (%d): %s", len(absent), ", ".join(absent))
    concepts, images = [], []
    for row in present.to_dict("records"):
        concepts.append(Concept(row["concept"], row["text"], row["category"], row["partner"] or None))
        images.extend(read_concept_images(root, row["concept"], max_images_per_concept))
    unpaired = [c.name for c in concepts if c.partner in absent]
    if unpaired:
        log.warning("Built-in concepts whose partner has no photo folder, measured without a partner: %s", ", ".join(unpaired))
    return ConceptDataset(name, without_partners_outside(concepts), images)
