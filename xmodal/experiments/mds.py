"""MDSClassifier: which SAE features belong to images, which to text, and which to both?

Method (seed 002, Modality Dominance Score), at one decoder layer:
1. Pair every image with its concept's text; encode both through the SAE and pool
   (as in the overlap study).
2. Per feature, MDS = mean over pairs of image / (image + text) activation, leaving out
   pairs where the feature is silent in both.
3. Split features at the mean plus or minus one standard deviation of MDS: ImgD above,
   TextD below, CrossD between.
4. Null: the same split after swapping the modality labels within each pair at random
   (seeded, `n_null` draws). Without a modality signal every feature sits near 0.5 and
   the tails hold only what sampling noise puts there.
"""

from __future__ import annotations

import logging
from typing import ClassVar

import numpy as np
import pandas as pd

from xmodal.experiments.base import Experiment, RunContext
from xmodal.metrics.modality import GROUPS, dominance_groups, modality_dominance, swapped_modalities
from xmodal.reporting import figures

log = logging.getLogger(__name__)


class MDSClassifier(Experiment):
    name: ClassVar[str] = "mds"

    def __init__(self, name: str = "mds", n_null: int = 200, top_concepts: int = 3) -> None:
        self.n_null = n_null
        self.top_concepts = top_concepts

    def run(self, ctx: RunContext) -> dict[str, float]:
        codes = ctx.codes()
        if ctx.features.sae is None:
            log.warning("sae=none: MDS needs non-negative codes, so residual dimensions enter with their positive part")
        concept_index = {name: i for i, name in enumerate(codes.concepts)}
        owners = np.array([concept_index[c] for c in codes.image_concepts])
        image, text = codes.image, codes.text[owners]  # one matched pair per image

        with ctx.timed("metrics"):
            mds, n_active = modality_dominance(image, text)
            groups, mu, sigma = dominance_groups(mds)
            rng = np.random.default_rng(ctx.seed)
            null_sizes = {g: [] for g in GROUPS}
            null_mds = []
            for _ in range(self.n_null):
                null_image, null_text = swapped_modalities(image, text, rng)
                shuffled, _ = modality_dominance(null_image, null_text)
                null_groups, _, _ = dominance_groups(shuffled)
                null_mds.append(shuffled)
                for g in GROUPS:
                    null_sizes[g].append(int(np.sum(null_groups == g)))

            names = np.array(codes.concepts)
            per_concept = codes.image_by_concept() + codes.text  # concepts x features, both modalities
            top = np.argsort(-per_concept, axis=0, kind="stable")[: self.top_concepts]
            feature_table = pd.DataFrame(
                {
                    "feature": np.arange(len(mds)),
                    "mds": mds,
                    "group": groups.astype(str),
                    "n_pairs_active": n_active,
                    "n_image_active": (image > 0).sum(axis=0),
                    "n_text_active": (text > 0).sum(axis=0),
                    "mean_image": image.mean(axis=0),
                    "mean_text": text.mean(axis=0),
                    "top_concepts": [" ".join(names[top[:, k]]) for k in range(len(mds))],
                }
            )
            feature_table = feature_table[feature_table["group"] != "inactive"].reset_index(drop=True)
            size_rows = []
            for g in GROUPS:
                observed = int(np.sum(groups == g))
                null = np.array(null_sizes[g])
                size_rows.append(
                    {
                        "group": g,
                        "n_features": observed,
                        "null_mean": float(null.mean()),
                        "null_q025": float(np.quantile(null, 0.025)),
                        "null_q975": float(np.quantile(null, 0.975)),
                        # two-sided: how unusual the observed size is under swapped modalities
                        "p_value": float((1 + np.sum(np.abs(null - null.mean()) >= abs(observed - null.mean()))) / (1 + len(null))),
                    }
                )
            size_table = pd.DataFrame(size_rows)

        ctx.table("features", feature_table)
        ctx.table("group_sizes", size_table)
        with ctx.timed("figures"):
            ctx.figure("mds_histogram", figures.mds_histogram(mds, mu, sigma, np.concatenate(null_mds), ctx.layer))

        metrics: dict[str, float] = {
            "n_active_features": int(np.isfinite(mds).sum()),
            "mds_mean": mu,
            "mds_std": sigma,
            "mds_std_null_mean": float(np.mean([np.nanstd(m) for m in null_mds])),
        }
        for row in size_rows:
            key = f"n_{row['group']}"
            metrics[key] = row["n_features"]
            metrics[f"{key}_null_mean"] = row["null_mean"]
            metrics[f"{key}_null_q025"] = row["null_q025"]
            metrics[f"{key}_null_q975"] = row["null_q975"]
            metrics[f"{key}_p"] = row["p_value"]
        log.info(
            "layer %d: %d ImgD, %d CrossD, %d TextD of %d active features (MDS mean %.2f, std %.2f; null std %.2f)",
            ctx.layer, metrics["n_ImgD"], metrics["n_CrossD"], metrics["n_TextD"], metrics["n_active_features"],
            mu, sigma, metrics["mds_std_null_mean"],
        )
        return metrics
