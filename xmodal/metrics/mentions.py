"""Whether generated text names a concept: the readout of steering and of the VLM judge."""

from __future__ import annotations

import re
from typing import Sequence


def mentions(text: str, words: Sequence[str]) -> bool:
    """Whether `text` contains one of `words` as a whole word ("red." counts, "redrawing" does not)."""
    return any(re.search(rf"(?<!\w){re.escape(w.strip().lower())}(?!\w)", text.lower()) for w in words if w.strip())
