"""The apples/oranges check (seed 004, Appendices A and D).

Before synthesising, ask whether cosine similarity can tell matched from mismatched
concept-image pairs at all: for two concepts A and B (or more), compare each concept
vector with the centred image representations (mean of image-token activations minus
the grey image's) of real images of every concept, layer by layer. If "apple" is
closer to apple images than to orange images, and vice versa, maximising the cosine
has a chance of steering synthesis towards the concept. Significance: a permutation
test that shuffles the images' concept labels.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F


def pair_gap(cosines: np.ndarray, labels: np.ndarray) -> float:
    """Mean matched minus mean mismatched cosine; cosines is (k concepts, n images), labels in 0..k-1."""
    matched = np.zeros_like(cosines, dtype=bool)
    matched[labels, np.arange(len(labels))] = True
    return float(cosines[matched].mean() - cosines[~matched].mean())


def apples_oranges(
    concept_vectors: dict[int, torch.Tensor],
    image_tokens: dict[int, torch.Tensor],
    grey_means: dict[int, torch.Tensor],
    labels: np.ndarray,
    concept_names: tuple[str, ...],
    n_permutations: int,
    seed: int,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per layer: (cosines of every concept-image pair, matched-vs-mismatched gap with its p-value).

    concept_vectors[layer] is (k, d); image_tokens[layer] is (n_images, tokens, d);
    labels[i] says which of the k concepts image i shows.
    """
    rng = np.random.default_rng(seed)
    pairs, summary = [], []
    for layer in sorted(concept_vectors):
        centred = image_tokens[layer].float() - grey_means[layer].float()
        vectors = concept_vectors[layer].float()
        aggregate = F.cosine_similarity(centred.mean(dim=1).unsqueeze(0), vectors.unsqueeze(1), dim=-1).numpy()
        patchwise = F.cosine_similarity(centred.unsqueeze(0), vectors.view(len(vectors), 1, 1, -1), dim=-1).amax(dim=-1).numpy()
        for c, name in enumerate(concept_names):
            for i, label in enumerate(labels):
                pairs.append({"layer": layer, "concept": name, "image_concept": concept_names[label],
                              "matched": bool(label == c), "cosine": aggregate[c, i], "max_patch_cosine": patchwise[c, i]})  # fmt: skip
        row = {"layer": layer}
        for metric, cosines in (("gap", aggregate), ("max_patch_gap", patchwise)):
            observed = pair_gap(cosines, labels)
            null = np.array([pair_gap(cosines, rng.permutation(labels)) for _ in range(n_permutations)])
            row |= {metric: observed, f"{metric}_null_mean": null.mean(), f"{metric}_null_q025": np.quantile(null, 0.025),
                    f"{metric}_null_q975": np.quantile(null, 0.975), f"{metric}_p": (1 + (null >= observed).sum()) / (1 + n_permutations)}  # fmt: skip
        summary.append(row)
    return pd.DataFrame(pairs), pd.DataFrame(summary)
