"""From per-token activations to one code vector per concept (text) and per image.

Each token is encoded through the SAE (or kept raw), then pooled over the concept's
tokens (text) or the image's soft tokens (image). Encoding happens per token because
SAEs are trained on single-token residuals; pooling residuals first would feed the
SAE an input it never saw.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from xmodal.activations.extract import LayerActivations
from xmodal.activations.readout import LayerReadout, ReadoutPlan, TokenKeep, pool_tokens
from xmodal.config import ImagePooling, PositionsConfig, TextPooling
from xmodal.saes.loading import FeatureSpace


@dataclass
class ConceptCodes:
    """Pooled codes of one layer: text rows per concept, image rows per image."""

    layer: int
    concepts: list[str]
    text: np.ndarray  # (n_concepts, n_features)
    image_concepts: list[str]
    image_sources: list[str]
    image: np.ndarray  # (n_images, n_features)

    def image_by_concept(self) -> np.ndarray:
        """Mean image code of each concept, rows in `concepts` order (zeros if it has no image)."""
        out = np.zeros_like(self.text)
        owners = np.asarray(self.image_concepts)
        for i, concept in enumerate(self.concepts):
            rows = self.image[owners == concept]
            if len(rows):
                out[i] = rows.mean(axis=0)
        return out

    def sparse_table(self) -> pd.DataFrame:
        """Non-zero codes in long form: (modality, concept, source, feature, value)."""
        frames = []
        for modality, matrix, concepts, sources in [
            ("text", self.text, self.concepts, ["text"] * len(self.concepts)),
            ("image", self.image, self.image_concepts, self.image_sources),
        ]:
            rows, features = np.nonzero(matrix)
            frames.append(
                pd.DataFrame(
                    {
                        "layer": self.layer,
                        "modality": modality,
                        "concept": np.asarray(concepts, dtype=object)[rows],
                        "source": np.asarray(sources, dtype=object)[rows],
                        "feature": features.astype(np.int64),
                        "value": matrix[rows, features].astype(np.float32),
                    }
                )
            )
        return pd.concat(frames, ignore_index=True)


def codes_plan(
    layer: int, space: FeatureSpace, positions: PositionsConfig, image_poolings: Sequence[tuple[str, int]] = (), keep_tokens: bool = True
) -> ReadoutPlan:
    """The streaming pass that gives pooled codes: the positions' poolings (and `image_poolings`), and,
    where the space is an SAE and `keep_tokens`, every token's non-zero codes (heat maps, feature cards)."""
    image = (ImagePooling(positions.image_pooling).value, positions.top_n)
    poolings = tuple(dict.fromkeys([image, *[(how, int(n)) for how, n in image_poolings]]))
    tokens = TokenKeep.sparse if space.sae is not None and keep_tokens else TokenKeep.none
    return ReadoutPlan(layer, space, poolings, (TextPooling(positions.text_pooling).value, positions.top_n), tokens)


def codes_from_readout(readout: LayerReadout, positions: PositionsConfig, image_pooling: tuple[str, int] | None = None) -> ConceptCodes:
    """The pooled codes a readout holds: per concept text (the positions' text pooling) and per image."""
    pooling = image_pooling or (ImagePooling(positions.image_pooling).value, positions.top_n)
    return ConceptCodes(
        layer=readout.layer,
        concepts=readout.concepts,
        text=readout.text_pooled.numpy(),
        image_concepts=readout.image_concepts,
        image_sources=readout.image_sources,
        image=readout.image_pooled[pooling].numpy(),
    )


def concept_codes(acts: LayerActivations, space: FeatureSpace, positions: PositionsConfig) -> ConceptCodes:
    """Pooled codes from per-token residuals in hand (a dual encoder's embeddings, or MDS's own SAE on
    tokens it has read); a job's own feature space goes through the streaming pass instead (codes_plan)."""
    text_how = TextPooling(positions.text_pooling).value
    image_how = ImagePooling(positions.image_pooling).value
    text = [pool_tokens(space.encode(acts.text_tokens_of(i)), text_how, positions.top_n) for i in range(len(acts.concepts))]
    image = []
    for i, tokens in enumerate(acts.image_tokens):  # one image at a time keeps dense SAE codes small
        if image_how == "eoi":
            image.append(space.encode(acts.image_eoi[i : i + 1])[0])
        else:
            image.append(pool_tokens(space.encode(tokens), image_how, positions.top_n))
    n_features = space.d_sae
    return ConceptCodes(
        layer=acts.layer,
        concepts=acts.concepts,
        text=torch.stack(text).numpy() if text else np.zeros((0, n_features), np.float32),
        image_concepts=acts.image_concepts,
        image_sources=acts.image_sources,
        image=torch.stack(image).numpy() if image else np.zeros((0, n_features), np.float32),
    )
