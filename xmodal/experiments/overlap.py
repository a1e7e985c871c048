"""CrossModalOverlap: does a concept's text light up the same SAE features as its image?

Method (seed 000, the Gemma Scope 2 cross-modal plan), at one decoder layer:
1. Encode the concept's text tokens (inside the chat template) and its images' soft
   tokens through the SAE; pool per concept (text) and per image, then average the
   images of a concept.
2. Per concept: Jaccard overlap of the top-k features of text and image, and the
   Pearson and Spearman correlation of the two code vectors; mutual information
   between which features are active in each.
3. Per feature: correlation across concepts between its text and its image
   activation. Features above the threshold (0.6) are cross-modal candidates.
4. Specificity: for the features a concept shares across modalities, the ratio
   a(concept) / (a(concept) + a(partner)) against its confusable partner.
5. Null: every statistic again for mismatched text-image pairs (image rows shuffled),
   with a permutation p-value.
"""

from __future__ import annotations

import logging
from typing import ClassVar

import numpy as np
import pandas as pd
from scipy import stats
from sklearn.metrics import mutual_info_score

from xmodal.experiments.base import Experiment, RunContext
from xmodal.metrics import overlap as M
from xmodal.reporting import figures

log = logging.getLogger(__name__)


def _ids(indices: np.ndarray) -> str:
    return " ".join(str(int(i)) for i in indices)


class CrossModalOverlap(Experiment):
    name: ClassVar[str] = "overlap"

    def __init__(
        self,
        name: str = "overlap",
        top_k: int = 50,
        corr_threshold: float = 0.6,
        n_permutations: int = 1000,
        heatmap_features: int = 20,
    ) -> None:
        self.top_k = top_k
        self.corr_threshold = corr_threshold
        self.n_permutations = n_permutations
        self.heatmap_features = heatmap_features

    def run(self, ctx: RunContext) -> dict[str, float]:
        codes = ctx.codes()
        ctx.table("codes", codes.sparse_table())
        text, image = codes.text, codes.image_by_concept()
        concepts = ctx.dataset.concepts
        n = len(concepts)
        index = {c.name: i for i, c in enumerate(concepts)}

        with ctx.timed("metrics"):
            text_top = M.top_k_features(text, self.top_k)
            image_top = M.top_k_features(image, self.top_k)
            pair_matrices = {
                "jaccard_topk": M.jaccard_matrix(text_top, image_top),
                "pearson": M.pearson_matrix(text, image),
                "spearman": M.spearman_matrix(text, image),
                "mutual_information": M.mutual_information_matrix(text, image),
            }
            feature_r = M.feature_correlations(text, image)

            def pair_statistic(matrix: np.ndarray):
                return lambda order: float(np.nanmean(matrix[np.arange(n), order]))

            def crossmodal_count(order: np.ndarray) -> float:
                return float(M.count_above(M.feature_correlations(text, image[order]), self.corr_threshold))

            statistics = {name: pair_statistic(m) for name, m in pair_matrices.items()}
            statistics["n_crossmodal_features"] = crossmodal_count
            null_rows, nulls = [], {}
            for stat_name, statistic in statistics.items():
                observed, p_value, null = M.permutation_pvalue(statistic, n, self.n_permutations, ctx.seed)
                nulls[stat_name] = null
                null_rows.append(
                    {
                        "statistic": stat_name,
                        "observed": observed,
                        "null_mean": float(np.nanmean(null)),
                        "null_std": float(np.nanstd(null)),
                        "null_q025": float(np.nanquantile(null, 0.025)),
                        "null_q975": float(np.nanquantile(null, 0.975)),
                        "p_value": p_value,
                        "n_permutations": len(null),
                    }
                )
            null_table = pd.DataFrame(null_rows)

            mismatched = {name: M.off_diagonal_mean(m) for name, m in pair_matrices.items()}
            concept_rows = []
            for i, c in enumerate(concepts):
                shared = np.intersect1d(text_top[i], image_top[i])
                partner = index.get(c.partner) if c.partner else None
                others = [j for j in range(n) if j not in (i, partner)]
                row = {
                    "concept": c.name,
                    "category": c.category,
                    "partner": c.partner or "",
                    "n_images": int(sum(1 for s in codes.image_concepts if s == c.name)),
                    "l0_text": int((text[i] > 0).sum()),
                    "l0_image": int((image[i] > 0).sum()),
                    "n_shared_features": len(shared),
                }
                for stat_name, matrix in pair_matrices.items():
                    row[stat_name] = matrix[i, i]
                    row[f"{stat_name}_null"] = mismatched[stat_name][i]
                for modality, matrix in [("text", text), ("image", image)]:
                    row[f"specificity_{modality}"] = (
                        M.specificity(matrix, i, partner, shared) if partner is not None else np.nan
                    )
                    # Null: the same ratio against concepts that are not the partner.
                    row[f"specificity_{modality}_null"] = (
                        np.nanmean([M.specificity(matrix, i, j, shared) for j in others]) if len(shared) and others else np.nan
                    )
                row["top_text_features"] = _ids(text_top[i])
                row["top_image_features"] = _ids(image_top[i])
                row["shared_features"] = _ids(shared)
                concept_rows.append(row)
            concept_table = pd.DataFrame(concept_rows)

            finite = np.flatnonzero(np.isfinite(feature_r))
            feature_table = pd.DataFrame({"feature": finite, "r": feature_r[finite]}).sort_values("r", ascending=False)
            crossmodal = feature_table[feature_table["r"] > self.corr_threshold]
            crossmodal_rows = []
            names = np.array([c.name for c in concepts])
            for f, r in zip(crossmodal["feature"], crossmodal["r"]):
                both = np.minimum(text[:, f], image[:, f])
                crossmodal_rows.append(
                    {
                        "feature": int(f),
                        "r": float(r),
                        "p_value": float(stats.pearsonr(text[:, f], image[:, f]).pvalue),
                        "mutual_information": float(mutual_info_score(text[:, f] > 0, image[:, f] > 0)),
                        "n_concepts_text": int((text[:, f] > 0).sum()),
                        "n_concepts_image": int((image[:, f] > 0).sum()),
                        "top_concepts": " ".join(names[np.argsort(-both, kind="stable")[:3]]),
                    }
                )
            crossmodal_table = pd.DataFrame(
                crossmodal_rows,
                columns=["feature", "r", "p_value", "mutual_information", "n_concepts_text", "n_concepts_image", "top_concepts"],
            )

        ctx.table("concepts", concept_table)
        ctx.table("null", null_table)
        ctx.table("feature_correlations", feature_table)
        ctx.table("crossmodal_features", crossmodal_table)

        with ctx.timed("figures"):
            ctx.figure("jaccard_vs_baseline", figures.jaccard_vs_baseline(concept_table, self.top_k, ctx.layer))
            top_features = feature_table["feature"].to_numpy()[: self.heatmap_features]
            if len(top_features):
                ctx.figure(
                    "crossmodal_heatmap",
                    figures.crossmodal_heatmap(text, image, list(names), top_features, ctx.layer),
                )
            ctx.figure("null_distributions", figures.null_distributions(null_table, nulls, ctx.layer))

        metrics: dict[str, float] = {
            "n_concepts": n,
            "n_images": len(codes.image_concepts),
            "n_features": int(text.shape[1]),
            "l0_text_mean": float(concept_table["l0_text"].mean()),
            "l0_image_mean": float(concept_table["l0_image"].mean()),
        }
        for row in null_rows:
            metrics[row["statistic"]] = row["observed"]
            metrics[f"{row['statistic']}_null_mean"] = row["null_mean"]
            metrics[f"{row['statistic']}_null_q025"] = row["null_q025"]
            metrics[f"{row['statistic']}_null_q975"] = row["null_q975"]
            metrics[f"{row['statistic']}_p"] = row["p_value"]
        for modality in ("text", "image"):
            metrics[f"specificity_{modality}_mean"] = float(np.nanmean(concept_table[f"specificity_{modality}"])) if concept_table[f"specificity_{modality}"].notna().any() else float("nan")
            metrics[f"specificity_{modality}_null_mean"] = float(np.nanmean(concept_table[f"specificity_{modality}_null"])) if concept_table[f"specificity_{modality}_null"].notna().any() else float("nan")
        log.info(
            "layer %d: top-%d Jaccard %.3f (null %.3f, p=%.3g); %d features with r>%.2f (null %.1f, p=%.3g)",
            ctx.layer, self.top_k, metrics["jaccard_topk"], metrics["jaccard_topk_null_mean"], metrics["jaccard_topk_p"],
            metrics["n_crossmodal_features"], self.corr_threshold, metrics["n_crossmodal_features_null_mean"],
            metrics["n_crossmodal_features_p"],
        )
        return metrics
