"""The apples/oranges check (seed 004, Appendices A and D).

Before synthesising, ask whether cosine similarity can tell matched from mismatched
concept-image pairs at all: for two concepts A and B (or more), compare each concept
vector with the centred image representations (mean of image-token activations minus
the grey image's) of real images of every concept, layer by layer. If "apple" is
closer to apple images than to orange images, and vice versa, maximising the cosine
has a chance of steering synthesis towards the concept. Significance: a permutation
test that shuffles the images' concept labels. The appendix's white-noise control: the
same cosines with images of uniform noise, which no concept vector should prefer; the
matched-minus-noise gap gets a permutation p that shuffles which cosines came from noise.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from xmodal.metrics.statistics import summarise_null


def pair_gap(cosines: np.ndarray, labels: np.ndarray) -> float:
    """Mean matched minus mean mismatched cosine; cosines is (k concepts, n images), labels in 0..k-1."""
    matched = np.zeros_like(cosines, dtype=bool)
    matched[labels, np.arange(len(labels))] = True
    return float(cosines[matched].mean() - cosines[~matched].mean())


NOISE = "white noise"  # image_concept of the control images in the pairs table


def matched_minus_noise(matched: np.ndarray, noise: np.ndarray, n_permutations: int, rng: np.random.Generator) -> dict[str, float]:
    """Mean matched cosine minus mean white-noise cosine, and its p over random splits of the pooled cosines."""
    observed = float(matched.mean() - noise.mean())
    pooled = np.concatenate([matched, noise])
    null = []
    for _ in range(n_permutations):
        order = rng.permutation(len(pooled))
        null.append(pooled[order[: len(matched)]].mean() - pooled[order[len(matched) :]].mean())
    summary = summarise_null(observed, np.array(null))
    return {"value": observed, "null_mean": summary.null_mean, "null_q975": summary.null_q975, "p": summary.p_value}


def apples_oranges(
    concept_vectors: dict[int, torch.Tensor],
    image_tokens: dict[int, torch.Tensor],
    grey_means: dict[int, torch.Tensor],
    labels: np.ndarray,
    concept_names: tuple[str, ...],
    n_permutations: int,
    seed: int,
    noise_tokens: dict[int, torch.Tensor] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per layer: (cosines of every concept-image pair, matched-vs-mismatched gap with its p-value).

    concept_vectors[layer] is (k, d); image_tokens[layer] is (n_images, tokens, d);
    labels[i] says which of the k concepts image i shows; noise_tokens[layer] (n_noise, tokens, d),
    if given, are white-noise control images.
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
                pairs.append(
                    {
                        "layer": layer,
                        "concept": name,
                        "image_concept": concept_names[label],
                        "matched": bool(label == c),
                        "cosine": aggregate[c, i],
                        "max_patch_cosine": patchwise[c, i],
                    }
                )
        row = {"layer": layer}
        for metric, cosines in (("gap", aggregate), ("max_patch_gap", patchwise)):
            observed = pair_gap(cosines, labels)
            null = np.array([pair_gap(cosines, rng.permutation(labels)) for _ in range(n_permutations)])
            gap_null = summarise_null(observed, null)
            row |= {
                metric: observed,
                f"{metric}_null_mean": gap_null.null_mean,
                f"{metric}_null_q025": gap_null.null_q025,
                f"{metric}_null_q975": gap_null.null_q975,
                f"{metric}_p": gap_null.p_value,
            }
        if noise_tokens is not None and len(noise_tokens[layer]):
            noise = noise_tokens[layer].float() - grey_means[layer].float()
            noise_aggregate = F.cosine_similarity(noise.mean(dim=1).unsqueeze(0), vectors.unsqueeze(1), dim=-1).numpy()
            noise_patchwise = F.cosine_similarity(noise.unsqueeze(0), vectors.view(len(vectors), 1, 1, -1), dim=-1).amax(dim=-1).numpy()
            for c, name in enumerate(concept_names):
                for i in range(noise_aggregate.shape[1]):
                    pairs.append(
                        {
                            "layer": layer,
                            "concept": name,
                            "image_concept": NOISE,
                            "matched": False,
                            "cosine": noise_aggregate[c, i],
                            "max_patch_cosine": noise_patchwise[c, i],
                        }
                    )
            matched_pairs = np.zeros_like(aggregate, dtype=bool)
            matched_pairs[labels, np.arange(len(labels))] = True
            for metric, cosines, noise_cosines in (
                ("matched_minus_noise", aggregate, noise_aggregate),
                ("max_patch_matched_minus_noise", patchwise, noise_patchwise),
            ):
                test = matched_minus_noise(cosines[matched_pairs], noise_cosines.ravel(), n_permutations, rng)
                row |= {metric: test["value"], f"{metric}_null_mean": test["null_mean"], f"{metric}_null_q975": test["null_q975"], f"{metric}_p": test["p"]}
            row["noise_cosine"] = float(noise_aggregate.mean())
        summary.append(row)
    return pd.DataFrame(pairs), pd.DataFrame(summary)
