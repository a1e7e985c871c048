"""Planted ground truth: SAE-like codes for matched text/image pairs with known structure.

Each feature is given a role:
- ``shared``: fires for one concept in both modalities (a cross-modal concept feature);
- ``image``: fires for one concept, in images only;
- ``text``: fires for one concept, in text only;
- ``noise``: fires at random, in either modality, for no concept.
Codes are non-negative and sparse like JumpReLU SAE codes. The metrics in
xmodal.metrics are tested against these roles: they must recover what was planted.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ROLES = ("shared", "image", "text", "noise")


@dataclass
class PlantedCodes:
    text: np.ndarray  # (n_pairs, n_features)
    image: np.ndarray  # (n_pairs, n_features)
    labels: np.ndarray  # (n_pairs,) concept index of each pair
    roles: np.ndarray  # (n_features,) one of ROLES
    owner: np.ndarray  # (n_features,) concept a feature belongs to, -1 for noise


def planted_codes(
    n_concepts: int = 8,
    pairs_per_concept: int = 25,
    shared_per_concept: int = 3,
    image_only_per_concept: int = 3,
    text_only_per_concept: int = 3,
    n_noise: int = 24,
    fire_rate: float = 0.9,
    noise_rate: float = 0.1,
    seed: int = 0,
) -> PlantedCodes:
    """Draw codes; a feature fires with probability `fire_rate` on pairs of its concept."""
    rng = np.random.default_rng(seed)
    roles, owner = [], []
    for concept in range(n_concepts):
        for role, count in (("shared", shared_per_concept), ("image", image_only_per_concept), ("text", text_only_per_concept)):
            roles += [role] * count
            owner += [concept] * count
    roles += ["noise"] * n_noise
    owner += [-1] * n_noise
    roles_arr, owner_arr = np.array(roles), np.array(owner)
    labels = np.repeat(np.arange(n_concepts), pairs_per_concept)
    n_pairs, n_features = len(labels), len(roles_arr)

    def magnitudes() -> np.ndarray:
        return rng.exponential(1.0, size=(n_pairs, n_features)) + 0.5

    of_concept = owner_arr[None, :] == labels[:, None]
    fires = rng.random((n_pairs, n_features)) < fire_rate
    text_on = of_concept & fires & np.isin(roles_arr, ("shared", "text"))[None, :]
    fires = rng.random((n_pairs, n_features)) < fire_rate
    image_on = of_concept & fires & np.isin(roles_arr, ("shared", "image"))[None, :]
    noise = (roles_arr == "noise")[None, :]
    text_on |= noise & (rng.random((n_pairs, n_features)) < noise_rate)
    image_on |= noise & (rng.random((n_pairs, n_features)) < noise_rate)
    return PlantedCodes(
        text=np.where(text_on, magnitudes(), 0.0),
        image=np.where(image_on, magnitudes(), 0.0),
        labels=labels,
        roles=roles_arr,
        owner=owner_arr,
    )
