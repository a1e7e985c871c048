"""Whether generated text names a concept: the readout of steering and of the VLM judge."""

from __future__ import annotations

import re
from typing import Sequence

import lemminflect


def mentions(text: str, words: Sequence[str]) -> bool:
    """Whether `text` contains one of `words` as a whole word ("red." counts, "redrawing" does not)."""
    return any(re.search(rf"(?<!\w){re.escape(w.strip().lower())}(?!\w)", text.lower()) for w in words if w.strip())


def word_forms(word: str) -> list[str]:
    """`word` and its inflections (lemminflect's dictionary: "octopus" -> octopi, octopuses;
    "swimming" -> swim, swims, swam), of the last word where there are several, each also with
    spaces and hyphens exchanged ("T-rex", "t rex"). Lower case, sorted."""
    word = " ".join(word.lower().split())
    head, _, last = word.rpartition(" ")
    inflected = {last}
    for pos, lemmas in lemminflect.getAllLemmas(last).items():
        for lemma in lemmas:
            inflected.add(lemma)
            inflected.update(form for forms in lemminflect.getAllInflections(lemma, upos=pos).values() for form in forms)
    forms = {f"{head} {form}".strip() for form in inflected}
    return sorted(forms | {f.replace("-", " ") for f in forms} | {f.replace(" ", "-") for f in forms})
