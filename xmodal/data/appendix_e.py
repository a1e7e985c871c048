"""Seed 004's Appendix E concept list: 105 bare concepts in 14 categories, text only.

DAS needs no images of a concept, only its word; the category is what the judge's hint
protocol asks about ("What animal is in the image?"), and the synonyms widen its rubric
("fall" names autumn). The list ships as das_appendix_e_concepts.csv beside this file.
"""

from __future__ import annotations

from importlib.resources import files

import pandas as pd

from xmodal.data.builtin import select_categories
from xmodal.data.concepts import Concept, ConceptDataset


def appendix_e_table() -> pd.DataFrame:
    with files("xmodal.data").joinpath("das_appendix_e_concepts.csv").open() as f:
        return pd.read_csv(f, dtype=str, keep_default_na=False)


def appendix_e_concepts(name: str = "das_appendix_e", categories: list[str] | None = None) -> ConceptDataset:
    """The concepts of `categories` (all 14 when none), each with its category and synonyms."""
    table = select_categories(appendix_e_table(), categories, "Appendix E's list")
    concepts = [
        Concept(row["concept"], row["text"], row["category"], synonyms=tuple(s for s in row["synonyms"].split("|") if s)) for row in table.to_dict("records")
    ]
    return ConceptDataset(name, concepts, text_only=True)
