"""Concept vectors from text, as seed 004 (section 2.1, Appendix C) defines them.

The concept word is wrapped in the model's chat template as a user turn; its
activation at layer L is the mean of resid_post over the word's own tokens. The
concept vector is that activation minus the mean activation of the baseline words,
which removes the component every word shares, so that cosines measure what is
specific to the concept.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources
from typing import Sequence

import torch

from xmodal.activations.extract import LayerActivations
from xmodal.config import PositionsConfig
from xmodal.data.concepts import Concept, ConceptDataset
from xmodal.errors import DatasetError

# The word alone inside the chat template; every word token is kept and averaged.
WORD_POSITIONS = PositionsConfig(text_prompt="{concept}", use_chat_template=True)


@lru_cache(maxsize=1)
def baseline_words() -> tuple[str, ...]:
    """Appendix C's 100 baseline words, shipped as xmodal/data/das_baseline_words.txt."""
    text = resources.files("xmodal.data").joinpath("das_baseline_words.txt").read_text()
    return tuple(line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#"))


def word_dataset(words: Sequence[str], name: str = "das_words") -> ConceptDataset:
    """Words as a text-only concept dataset, so that extraction and its cache serve them."""
    for word in words:
        if not word.strip():
            raise DatasetError(f"concept word {word!r} is empty; give every concept a non-empty word")
    unique = list(dict.fromkeys(words))
    return ConceptDataset(name, [Concept(name=f"w{i}:{w}", text=w) for i, w in enumerate(unique)], text_only=True)


def word_activations(acts: LayerActivations, dataset: ConceptDataset, words: Sequence[str]) -> torch.Tensor:
    """(len(words), d_model): each word's resid_post averaged over its tokens."""
    index = {concept.text: i for i, concept in enumerate(dataset.concepts)}
    return torch.stack([acts.text_tokens_of(index[w]).mean(dim=0) for w in words])


def concept_vectors(
    acts: LayerActivations, dataset: ConceptDataset, concept_words: Sequence[str], baseline: Sequence[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(concept vectors (n_concepts, d_model), baseline mean (d_model,)) at the layer of `acts`."""
    baseline_mean = word_activations(acts, dataset, baseline).mean(dim=0)
    return word_activations(acts, dataset, concept_words) - baseline_mean, baseline_mean
