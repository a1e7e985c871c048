"""RepresentationAlignment: are two representations of the same concepts alike, without an SAE?

Method (Kornblith et al. 2019 for CKA; Huh et al. 2024, "The Platonic Representation
Hypothesis", for mutual k-NN and CKNNA), at one decoder layer:
1. Two paired representations, one row per concept:
   - ``compare=modalities``: the concept word's resid_post pooled over its tokens, against the
     mean over the concept's images of resid_post pooled over the image's soft tokens;
   - ``compare=models``: the same inputs (``experiment.modality``) through this model and
     through ``experiment.other_model`` (by default the LLM the decoder came from, as in the
     shift study; or e.g. ``organism_frozen`` against ``organism``).
   ``representation=sae`` reads both through this job's SAE instead of raw residuals.
2. Alignment: linear CKA, its unbiased form (Song et al.'s HSIC), mutual k-NN and CKNNA.
3. Null: the same measures after re-pairing the rows at random (concept i of one side against
   concept j of the other), with a one-sided permutation p-value each. ``null=within_category``
   re-pairs only inside each concept's category (colours with colours, ...), so that alignment
   which only separates the categories stays at its null: what remains is finer than categories.
4. Figures: both sides' concept-by-concept cosine kernels, and each measure against its null.
CKA asks whether the two sides arrange the concepts alike, not whether they use the same
features: it is 1 for representations equal up to rotation and scale.
"""

from __future__ import annotations

import logging
from typing import ClassVar

import numpy as np
import pandas as pd

from xmodal.activations.codes import ConceptCodes
from xmodal.errors import ConfigError
from xmodal.experiments.alignment.config import AlignmentConfig, Comparison, Modality, Representation
from xmodal.experiments.base import Experiment, RunContext
from xmodal.metrics import alignment as A
from xmodal.metrics import statistics as S
from xmodal.models.base import ModelAdapter
from xmodal.models.named import load_named_model
from xmodal.reporting import figures
from xmodal.saes.loading import FeatureSpace, no_sae

log = logging.getLogger(__name__)


class RepresentationAlignment(Experiment):
    name: ClassVar[str] = "alignment"
    config: AlignmentConfig

    def run(self, ctx: RunContext) -> dict[str, float]:
        concepts, side_a, side_b, labels = self.paired_representations(ctx)
        categories = self.null_groups(ctx, concepts)
        with ctx.timed("metrics"):
            scores, null = self.alignment_with_null(side_a, side_b, categories, ctx.seed)
        ctx.table("alignment", scores)
        ctx.table("null", null)
        ctx.table(
            "concepts",
            pd.DataFrame({"concept": concepts, "l2_" + labels[0]: np.linalg.norm(side_a, axis=1), "l2_" + labels[1]: np.linalg.norm(side_b, axis=1)}),
        )
        with ctx.timed("figures"):
            ctx.figure("kernels", figures.concept_kernels(side_a, side_b, concepts, labels, ctx.layer))
            null_table = scores.rename(columns={"metric": "statistic", "value": "observed", "p": "p_value"})
            draws = {m: null.loc[null["metric"] == m, "value"].to_numpy() for m in scores["metric"]}
            ctx.figure("null", figures.null_distributions(null_table, draws, ctx.layer))

        metrics: dict[str, float] = {"n_concepts": len(concepts), "k_neighbours": self.config.k_neighbours}
        for row in scores.itertuples():
            metrics.update(
                {
                    row.metric: row.value,
                    f"{row.metric}_null_mean": row.null_mean,
                    f"{row.metric}_null_q025": row.null_q025,
                    f"{row.metric}_null_q975": row.null_q975,
                    f"{row.metric}_p": row.p,
                }
            )
        log.info(
            "layer %d, %s vs %s: CKA %.3f (null %.3f, p=%.3g), unbiased %.3f, mutual %d-NN %.3f (null %.3f, p=%.3g), CKNNA %.3f",
            ctx.layer,
            *labels,
            metrics["cka"],
            metrics["cka_null_mean"],
            metrics["cka_p"],
            metrics["cka_unbiased"],
            self.config.k_neighbours,
            metrics["mutual_knn"],
            metrics["mutual_knn_null_mean"],
            metrics["mutual_knn_p"],
            metrics["cknna"],
        )
        return metrics

    # 1. the two paired representations ----------------------------------------------------
    def paired_representations(self, ctx: RunContext) -> tuple[list[str], np.ndarray, np.ndarray, tuple[str, str]]:
        """Concept names, the two sides (one row per concept, same order) and their labels."""
        self.check_enough(len(ctx.dataset.concepts))  # before any extraction
        if self.config.compare == Comparison.modalities:
            codes = self.pooled(ctx, ctx.model, ("text", "image"))
            has_images = np.isin(codes.concepts, codes.image_concepts)
            if has_images.sum() < len(codes.concepts):
                log.warning("%d concepts have no image and are left out", int((~has_images).sum()))
            concepts = [c for c, keep in zip(codes.concepts, has_images) if keep]
            side_a, side_b, labels = codes.text[has_images], codes.image_by_concept()[has_images], ("text", "image")
        else:
            other = self.load_other(ctx)
            modality = Modality(self.config.modality).value
            mine, theirs = self.pooled(ctx, ctx.model, (modality,)), self.pooled(ctx, other, (modality,))
            if modality == "text":
                concepts, side_a, side_b = mine.concepts, mine.text, theirs.text
            else:  # images alone carry no text rows: the concepts are those the images belong to
                concepts = list(dict.fromkeys(mine.image_concepts))
                side_a, side_b = mean_image_per_concept(mine, concepts), mean_image_per_concept(theirs, concepts)
            labels = (f"{ctx.model.name} {modality}", f"{other.name} {modality}")
        self.check_enough(len(concepts))
        return concepts, side_a, side_b, labels

    def pooled(self, ctx: RunContext, model: ModelAdapter, modalities: tuple[str, ...]) -> ConceptCodes:
        return ctx.codes(modalities=modalities, model=None if model is ctx.model else model, space=self.feature_space(ctx, model))

    def feature_space(self, ctx: RunContext, model: ModelAdapter) -> FeatureSpace:
        if self.config.representation == Representation.sae:
            if ctx.features.sae is None:
                raise ConfigError("experiment.representation=sae needs an SAE, and this job has sae=none; add e.g. sae=organism")
            return ctx.features
        raw = no_sae(layer=ctx.layer)
        raw.check_model(model.name, model.hidden_size, ctx.layer)
        return raw

    def load_other(self, ctx: RunContext) -> ModelAdapter:
        other = load_named_model(str(self.config.other_model), self.config.other_model_overrides, key="experiment.other_model")
        other.check_layer(ctx.layer)
        if self.config.modality == Modality.image and not other.supports_images:
            raise ConfigError(
                f"experiment.other_model={self.config.other_model!r} reads no images, so experiment.modality=image "
                "cannot compare it; use experiment.modality=text or a VLM"
            )
        if self.config.representation == Representation.sae and other.hidden_size != ctx.model.hidden_size:
            raise ConfigError(
                f"experiment.representation=sae reads both models through one SAE, but {other.name!r} has hidden size "
                f"{other.hidden_size} and {ctx.model.name!r} {ctx.model.hidden_size}; use experiment.representation=residual"
            )
        return other

    def check_enough(self, n_concepts: int) -> None:
        if self.config.k_neighbours >= n_concepts:
            raise ConfigError(
                f"experiment.k_neighbours={self.config.k_neighbours} needs more concepts than that; this dataset gives "
                f"{n_concepts} (with images, for compare=modalities); lower experiment.k_neighbours or add concepts"
            )

    # 2-3. the measures and their re-pairing nulls -------------------------------------------
    def null_groups(self, ctx: RunContext, concepts: list[str]) -> np.ndarray:
        """Per concept, the group its re-pairings stay in: one group, or its category."""
        category = {c.name: c.category for c in ctx.dataset.concepts}
        return S.null_groups([category.get(c) for c in concepts], self.config.null)

    def alignment_with_null(self, side_a: np.ndarray, side_b: np.ndarray, groups: np.ndarray, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
        """One row per measure (value, null mean and 95% range, p), and the null draws in long form."""
        k = self.config.k_neighbours
        orders = S.repairings(groups, self.config.n_permutations, np.random.default_rng(seed))
        rows, nulls = [], []
        for metric, score in A.ALIGNMENT_FUNCTIONS.items():
            value = score(side_a, side_b, k)
            null = np.array([score(side_a, side_b[order], k) for order in orders])
            summary = S.summarise_null(value, null)  # one-sided, the observed pairing counted among the draws
            rows.append(
                {
                    "metric": metric,
                    "value": value,
                    "null_mean": summary.null_mean,
                    "null_q025": summary.null_q025,
                    "null_q975": summary.null_q975,
                    "p": summary.p_value,
                }
            )
            nulls.append(pd.DataFrame({"metric": metric, "draw": np.arange(len(null)), "value": null}))
        return pd.DataFrame(rows), pd.concat(nulls, ignore_index=True)


def mean_image_per_concept(codes: ConceptCodes, concepts: list[str]) -> np.ndarray:
    owners = np.asarray(codes.image_concepts)
    return np.stack([codes.image[owners == concept].mean(axis=0) for concept in concepts])
