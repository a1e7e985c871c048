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


def pool_tokens(codes: torch.Tensor, how: str, top_n: int = 5) -> torch.Tensor:
    """Pool (..., tokens, features) over the token axis."""
    if how == "mean":
        return codes.mean(dim=-2)
    if how == "sum":
        return codes.sum(dim=-2)
    if how == "max":
        return codes.max(dim=-2).values
    if how == "last":
        return codes[..., -1, :]
    if how == "topn":
        n = min(top_n, codes.shape[-2])
        return codes.topk(n, dim=-2).values.mean(dim=-2)
    if how == "topn_per_token":
        n = min(top_n, codes.shape[-1])
        values, indices = codes.topk(n, dim=-1)
        return torch.zeros_like(codes).scatter(-1, indices, values).sum(dim=-2)
    raise ValueError(f"unknown pooling {how!r}")


def image_codes_pooled_several_ways(acts: LayerActivations, space: FeatureSpace, poolings: Sequence[tuple[str, int]]) -> list[np.ndarray]:
    """Per (how, top_n) in `poolings`, the (n_images, d_sae) pooled image codes; each image's tokens are encoded once."""
    out: list[list[torch.Tensor]] = [[] for _ in poolings]
    for tokens in acts.image_tokens:  # one image at a time keeps dense SAE codes small
        codes = space.encode(tokens)
        for rows, (how, top_n) in zip(out, poolings):
            rows.append(pool_tokens(codes, how, top_n))
    return [torch.stack(rows).numpy() if rows else np.zeros((0, space.d_sae), np.float32) for rows in out]


def concept_codes(acts: LayerActivations, space: FeatureSpace, positions: PositionsConfig) -> ConceptCodes:
    text_how = TextPooling(positions.text_pooling).value
    image_how = ImagePooling(positions.image_pooling).value
    text = [
        pool_tokens(space.encode(acts.text_tokens_of(i)), text_how, positions.top_n)
        for i in range(len(acts.concepts))
    ]
    image = []
    for i in range(acts.image_tokens.shape[0]):  # one image at a time keeps dense SAE codes small
        if image_how == "eoi":
            image.append(space.encode(acts.image_eoi[i : i + 1])[0])
        else:
            image.append(pool_tokens(space.encode(acts.image_tokens[i]), image_how, positions.top_n))
    n_features = space.d_sae
    return ConceptCodes(
        layer=acts.layer,
        concepts=acts.concepts,
        text=torch.stack(text).numpy() if text else np.zeros((0, n_features), np.float32),
        image_concepts=acts.image_concepts,
        image_sources=acts.image_sources,
        image=torch.stack(image).numpy() if image else np.zeros((0, n_features), np.float32),
    )


def image_token_activations(acts: LayerActivations, space: FeatureSpace, chosen: list[int]) -> list[np.ndarray]:
    """Per chosen feature, (n_images, n_tokens): its activation at every image soft token."""
    per_image = [space.encode(tokens)[:, chosen].numpy() for tokens in acts.image_tokens]  # (n_tokens, n_chosen) each
    stacked = np.stack(per_image)  # (n_images, n_tokens, n_chosen)
    return [stacked[:, :, n] for n in range(len(chosen))]
