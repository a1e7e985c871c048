"""CrossModalOverlap: does a concept's text light up the same SAE features as its image?

Method (seed 000, the Gemma Scope 2 cross-modal plan), at one decoder layer:
1. Encode the concept's text tokens (inside the chat template) and its images' soft
   tokens through the SAE; pool per concept (text) and per image, then average the
   images of a concept.
2. Per concept: Jaccard overlap of the top-k features of text and image, and of all
   their active features; the Pearson and Spearman correlation of the two code vectors;
   mutual information between which features are active in each.
3. Per feature: correlation across concepts between its text and its image
   activation. Features above the threshold (0.6) are cross-modal candidates.
4. Specificity: for the features a concept shares across modalities, the ratio
   a(concept) / (a(concept) + a(partner)) against its confusable partner, within each
   modality and across them (text-cat against image-dog, image-cat against text-dog);
   per concept, and per cross-modal feature for the concept it fires for most.
5. Null: every statistic again for mismatched text-image pairs (image rows shuffled),
   with a permutation p-value. ``null=within_category`` re-pairs only inside each concept's
   category, so that what concepts share only with their category stays at its null. A
   cross-modal feature's p is against the largest feature correlation of each re-pairing
   (max-statistic null): the features are chosen because their r is large.
6. Figures: the concepts' text and image codes in one 2-D PCA embedding, each pair joined
   (the concept geometry), and where the top cross-modal features fire on their images.
"""

from __future__ import annotations

import logging
from typing import Callable, ClassVar

import numpy as np
import pandas as pd
from sklearn.metrics import mutual_info_score

from xmodal.activations.codes import ConceptCodes
from xmodal.data.concepts import Concept
from xmodal.experiments.base import Experiment, RunContext
from xmodal.experiments.overlap.config import OverlapConfig
from xmodal.metrics import overlap as M
from xmodal.metrics import statistics as S
from xmodal.reporting import figures

log = logging.getLogger(__name__)


def _ids(indices: np.ndarray) -> str:
    return " ".join(str(int(i)) for i in indices)


def specificity_terms(text: np.ndarray, image: np.ndarray) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, the concept's codes, the partner's codes) for each specificity ratio the plan names."""
    return [("text", text, text), ("image", image, image), ("text_vs_image_partner", text, image), ("image_vs_text_partner", image, text)]


class CrossModalOverlap(Experiment):
    name: ClassVar[str] = "overlap"
    needs_decoder: ClassVar[bool] = False  # runs on a dual encoder's embeddings too
    config: OverlapConfig

    def run(self, ctx: RunContext) -> dict[str, float]:
        # code row i is dataset concept i; a null the dataset cannot give stops before any extraction
        groups = S.null_groups([c.category for c in ctx.dataset.concepts], self.config.null)
        codes = self.encode(ctx)
        text, image = codes.text, codes.image_by_concept()
        with ctx.timed("metrics"):
            text_top, image_top = M.top_k_features(text, self.config.top_k), M.top_k_features(image, self.config.top_k)
            pair_matrices = self.pair_statistics(text, image, text_top, image_top)
            feature_table = self.feature_correlations(text, image)
            null_table, nulls = self.null_distributions(text, image, pair_matrices, groups, ctx.seed)
            concept_table = self.concept_table(ctx.dataset.concepts, codes, pair_matrices, text_top, image_top)
            crossmodal_table = self.crossmodal_features(text, image, feature_table, ctx.dataset.concepts, groups, ctx.seed)
        ctx.table("concepts", concept_table)
        ctx.table("null", null_table)
        ctx.table("feature_correlations", feature_table)
        ctx.table("crossmodal_features", crossmodal_table)
        self.draw(ctx, text, image, concept_table, feature_table, null_table, nulls)
        metrics = self.summarise(ctx.layer, codes, concept_table, null_table)
        metrics["n_crossmodal_features_significant"] = int((crossmodal_table["p_value"] < 0.05).sum()) if len(crossmodal_table) else 0
        c = self.config
        ctx.verdict(
            "features_crossmodal",
            metrics["n_crossmodal_features_significant"] >= c.min_crossmodal_features,
            f"seed 000: at least {c.min_crossmodal_features} features with text-image r > {c.corr_threshold:g} across concepts, "
            "each beyond the null (max-statistic permutation p < 0.05 over re-pairings of the concepts)",
            n_features=metrics["n_crossmodal_features_significant"],
            n_above_threshold=metrics["n_crossmodal_features"],
            n_above_threshold_null_mean=metrics["n_crossmodal_features_null_mean"],
        )
        return metrics

    # 1. codes ---------------------------------------------------------------
    def encode(self, ctx: RunContext) -> ConceptCodes:
        """Pooled SAE codes of every concept's text and image, written as a sparse table."""
        codes = ctx.codes()
        ctx.table("codes", codes.sparse_table())
        return codes

    # 2. per concept ---------------------------------------------------------
    @staticmethod
    def pair_statistics(text: np.ndarray, image: np.ndarray, text_top: list[np.ndarray], image_top: list[np.ndarray]) -> dict[str, np.ndarray]:
        """Concept-by-concept matrices (text row i, image column j): the diagonal is matched, the rest the null."""
        return {
            "jaccard_topk": M.jaccard_matrix(text_top, image_top),
            "jaccard_active": M.jaccard_matrix(M.active_features(text), M.active_features(image)),  # seed 000: all active, not only top k
            "pearson": M.pearson_matrix(text, image),
            "spearman": M.spearman_matrix(text, image),
            "mutual_information": M.mutual_information_matrix(text, image),
        }

    # 3. per feature ---------------------------------------------------------
    @staticmethod
    def feature_correlations(text: np.ndarray, image: np.ndarray) -> pd.DataFrame:
        """Each feature's text-image correlation across concepts, strongest first."""
        feature_r = M.feature_correlations(text, image)
        finite = np.flatnonzero(np.isfinite(feature_r))
        return pd.DataFrame({"feature": finite, "r": feature_r[finite]}).sort_values("r", ascending=False)

    def crossmodal_features(
        self, text: np.ndarray, image: np.ndarray, feature_table: pd.DataFrame, concepts: list[Concept], groups: np.ndarray, seed: int
    ) -> pd.DataFrame:
        """The features above the correlation threshold, with their p-value, MI, top concepts and, for the
        concept they fire for most in both modalities, the plan's four specificity ratios against its partner.

        The p-value is against the largest feature correlation of each re-pairing of the concepts
        (max-statistic null): a feature chosen for its large r is compared with the largest r that
        chance gives any feature, not with a single feature's Pearson null.
        """
        crossmodal = feature_table[feature_table["r"] > self.config.corr_threshold]
        names = [c.name for c in concepts]
        p_values = np.array([])
        if len(crossmodal):
            orders = S.repairings(groups, self.config.n_permutations, np.random.default_rng(seed))
            null_r = np.stack([M.feature_correlations(text, image[order]) for order in orders])
            p_values = S.max_statistic_pvalues(crossmodal["r"].to_numpy(), null_r)
        rows = []
        for f, r, p_value in zip(crossmodal["feature"], crossmodal["r"], p_values):
            both = np.minimum(text[:, f], image[:, f])
            owner = int(np.argmax(both))
            partner = names.index(concepts[owner].partner) if concepts[owner].partner in names else None
            row = {
                "feature": int(f),
                "r": float(r),
                "p_value": float(p_value),
                "mutual_information": float(mutual_info_score(text[:, f] > 0, image[:, f] > 0)),
                "n_concepts_text": int((text[:, f] > 0).sum()),
                "n_concepts_image": int((image[:, f] > 0).sum()),
                "top_concepts": " ".join(np.array(names)[np.argsort(-both, kind="stable")[:3]]),
                "concept": names[owner],
                "partner": names[partner] if partner is not None else "",
            }
            for name, mine, theirs in specificity_terms(text, image):
                row[f"specificity_{name}"] = M.specificity(mine, owner, partner, np.array([f]), theirs) if partner is not None else np.nan
            rows.append(row)
        columns = ["feature", "r", "p_value", "mutual_information", "n_concepts_text", "n_concepts_image", "top_concepts", "concept", "partner"]
        return pd.DataFrame(rows, columns=columns + [f"specificity_{name}" for name, _, _ in specificity_terms(text, image)])

    # 4. specificity, with 2 per concept ----------------------------------------
    @staticmethod
    def concept_table(
        concepts: list[Concept],
        codes: ConceptCodes,
        pair_matrices: dict[str, np.ndarray],
        text_top: list[np.ndarray],
        image_top: list[np.ndarray],
    ) -> pd.DataFrame:
        """One row per concept: its pair statistics and specificity, each beside its mismatched-pair null."""
        text, image = codes.text, codes.image_by_concept()
        n = len(concepts)
        index = {c.name: i for i, c in enumerate(concepts)}
        mismatched = {name: M.off_diagonal_mean(m) for name, m in pair_matrices.items()}
        rows = []
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
            # text-cat vs text-dog, image-cat vs image-dog, and the plan's cross terms text-cat vs image-dog, image-cat vs text-dog
            for name, mine, theirs in specificity_terms(text, image):
                row[f"specificity_{name}"] = M.specificity(mine, i, partner, shared, theirs) if partner is not None else np.nan
                # Null: the same ratio against concepts that are not the partner.
                row[f"specificity_{name}_null"] = np.nanmean([M.specificity(mine, i, j, shared, theirs) for j in others]) if len(shared) and others else np.nan
            row["top_text_features"] = _ids(text_top[i])
            row["top_image_features"] = _ids(image_top[i])
            row["shared_features"] = _ids(shared)
            rows.append(row)
        return pd.DataFrame(rows)

    # 5. null ------------------------------------------------------------------
    def null_distributions(
        self, text: np.ndarray, image: np.ndarray, pair_matrices: dict[str, np.ndarray], groups: np.ndarray, seed: int
    ) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
        """Every matched statistic against mismatched pairings (image rows permuted inside `groups`), with its p-value."""
        n = len(text)

        def pair_statistic(matrix: np.ndarray) -> Callable[[np.ndarray], float]:
            return lambda order: float(np.nanmean(matrix[np.arange(n), order]))

        def crossmodal_count(order: np.ndarray) -> float:
            return float(M.count_above(M.feature_correlations(text, image[order]), self.config.corr_threshold))

        statistics = {name: pair_statistic(m) for name, m in pair_matrices.items()}
        statistics["n_crossmodal_features"] = crossmodal_count
        rows, nulls = [], {}
        for stat_name, statistic in statistics.items():
            observed, p_value, null = S.permutation_test(statistic, n, self.config.n_permutations, seed, groups)
            nulls[stat_name] = null
            rows.append(
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
        return pd.DataFrame(rows), nulls

    # report ---------------------------------------------------------------------
    def draw(
        self,
        ctx: RunContext,
        text: np.ndarray,
        image: np.ndarray,
        concept_table: pd.DataFrame,
        feature_table: pd.DataFrame,
        null_table: pd.DataFrame,
        nulls: dict[str, np.ndarray],
    ) -> None:
        with ctx.timed("figures"):
            ctx.figure("jaccard_vs_baseline", figures.jaccard_vs_baseline(concept_table, self.config.top_k, ctx.layer))
            top_features = feature_table["feature"].to_numpy()[: self.config.heatmap_features]
            if len(top_features):
                names = [c.name for c in ctx.dataset.concepts]
                ctx.figure("crossmodal_heatmap", figures.crossmodal_heatmap(text, image, names, top_features, ctx.layer))
                if ctx.features.sae is not None:  # where the top cross-modal SAE features fire on their images
                    r = feature_table.set_index("feature")["r"]
                    ctx.patch_heatmaps("crossmodal_patches", top_features[:3], [f"feature {f} (r={r[f]:.2f})" for f in top_features[:3]])
            ctx.figure("null_distributions", figures.null_distributions(null_table, nulls, ctx.layer))
            concepts = ctx.dataset.concepts
            ctx.figure("concept_geometry", figures.concept_geometry(text, image, [c.name for c in concepts], [c.category for c in concepts], ctx.layer))

    def summarise(self, layer: int, codes: ConceptCodes, concept_table: pd.DataFrame, null_table: pd.DataFrame) -> dict[str, float]:
        metrics: dict[str, float] = {
            "n_concepts": len(concept_table),
            "n_images": len(codes.image_concepts),
            "n_features": int(codes.text.shape[1]),
            "l0_text_mean": float(concept_table["l0_text"].mean()),
            "l0_image_mean": float(concept_table["l0_image"].mean()),
        }
        for row in null_table.to_dict("records"):
            metrics[row["statistic"]] = row["observed"]
            for key in ("null_mean", "null_q025", "null_q975"):
                metrics[f"{row['statistic']}_{key}"] = row[key]
            metrics[f"{row['statistic']}_p"] = row["p_value"]
        for name, _, _ in specificity_terms(codes.text, codes.text):
            for column in (f"specificity_{name}", f"specificity_{name}_null"):
                values = concept_table[column]
                metrics[f"{column}_mean"] = float(np.nanmean(values)) if values.notna().any() else float("nan")
        log.info(
            "layer %d: top-%d Jaccard %.3f (null %.3f, p=%.3g); %d features with r>%.2f (null %.1f, p=%.3g)",
            layer,
            self.config.top_k,
            metrics["jaccard_topk"],
            metrics["jaccard_topk_null_mean"],
            metrics["jaccard_topk_p"],
            metrics["n_crossmodal_features"],
            self.config.corr_threshold,
            metrics["n_crossmodal_features_null_mean"],
            metrics["n_crossmodal_features_p"],
        )
        return metrics
