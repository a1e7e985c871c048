"""Whole sentences as a text-only dataset: each sentence is one "concept" whose tokens are all of it.

``experiment=shift experiment.prompts=sentences`` reads the shipped set (``shift_sentences.txt``),
or a file of one ``category<TAB>sentence`` per line (``#`` lines are comments).
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from xmodal.data.concepts import Concept, ConceptDataset
from xmodal.errors import DatasetError


def sentence_dataset(path: str | None = None, name: str | None = None) -> ConceptDataset:
    """The sentences of `path` (None: the shipped set); `name` is the config's and is not used: the
    dataset's name says which file it came from."""
    if path is None:
        text, where = files("xmodal.data").joinpath("shift_sentences.txt").read_text(encoding="utf-8"), "shift_sentences.txt"
    else:
        file = Path(path).expanduser()
        if not file.is_file():
            raise DatasetError(f"sentence file {str(file)!r} does not exist; give a file of 'category<TAB>sentence' lines")
        text, where = file.read_text(encoding="utf-8"), str(file)
    concepts = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        category, _, sentence = line.partition("\t")
        if not sentence.strip():
            raise DatasetError(f"{where}, line {number}: expected 'category<TAB>sentence', got {line!r}")
        concepts.append(Concept(f"s{len(concepts):03d}", sentence.strip(), category=category.strip()))
    return ConceptDataset(f"sentences:{Path(where).name}", concepts, text_only=True)
