"""LinearProbeTransfer: does a concept probe trained on one modality read the other?

Method (seeds 001 and 003), at one decoder layer, on SAE codes (or raw residuals):
1. Text samples: each concept inside several prompt templates; image samples: each
   image. Codes are pooled as in the other studies (`positions.*`).
2. Concept probes (logistic regression): within text and within image (stratified
   cross-validation), and across: trained on text, tested on images, and the reverse.
3. Attribute probes: modality (text vs image rows), brightness (each image made 50%
   darker vs 50% brighter) and redness (red channel scaled by 0.5 vs 1.5), cross-validated
   with the source image as group so no image is in both train and test.
4. Options: binarised codes, a feature budget (the k most class-separating features,
   chosen on training data), removal of features active in too many samples, and
   low-data splits (`train_per_class` examples per class).
5. Nulls: chance (majority rate) and a label-shuffled control with a permutation p-value.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import ClassVar

import numpy as np
import pandas as pd

from xmodal.data.variants import ATTRIBUTES, attribute_variants
from xmodal.experiments.base import Experiment, RunContext
from xmodal.experiments.probe.config import ProbeAttribute, ProbeConfig
from xmodal.metrics.probes import ProbeScore, over_represented, prepare_features, transfer, within_modality
from xmodal.reporting import figures

log = logging.getLogger(__name__)


class LinearProbeTransfer(Experiment):
    name: ClassVar[str] = "probe"
    config: ProbeConfig

    def run(self, ctx: RunContext) -> dict[str, float]:
        (text_x, text_y), (image_x, image_y) = self.samples(ctx)
        keep = self.feature_filter(text_x, image_x)
        text_x, image_x = (prepare_features(x, self.config.binarise, keep) for x in (text_x, image_x))
        with ctx.timed("metrics"):
            scores = self.concept_probes(text_x, text_y, image_x, image_y, ctx.seed)
            scores |= self.attribute_probes(ctx, text_x, image_x, keep)
        self.save_weights(ctx, scores, keep, int(text_x.shape[1]))
        return self.report(ctx, scores, len(text_y), len(image_y), int(text_x.shape[1]))

    # 1. samples --------------------------------------------------------------------
    def samples(self, ctx: RunContext) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
        """((text codes, concepts), (image codes, concepts)): each concept in every template, and every image."""
        text_x, text_y = [], []
        for template in self.config.text_templates:
            codes = ctx.codes(positions=dataclasses.replace(ctx.positions, text_prompt=template), modalities=("text",))
            text_x.append(codes.text)
            text_y += codes.concepts
        image_x = ctx.codes(modalities=("image",)).image
        image_y = np.array([img.concept for img in ctx.dataset.images])
        return (np.vstack(text_x), np.array(text_y)), (image_x, image_y)

    # 4. options ----------------------------------------------------------------------
    def feature_filter(self, text_x: np.ndarray, image_x: np.ndarray) -> np.ndarray | None:
        """Features kept after dropping over-represented ones (max_active_fraction); None keeps all."""
        if self.config.max_active_fraction is None:
            return None
        keep = over_represented(np.vstack([text_x, image_x]), self.config.max_active_fraction)
        log.info("Removed %d over-represented features (active in > %.0f%% of samples)", int((~keep).sum()), 100 * self.config.max_active_fraction)
        return keep

    # 2. concept probes, 5. nulls ---------------------------------------------------------
    def concept_probes(
        self, text_x: np.ndarray, text_y: np.ndarray, image_x: np.ndarray, image_y: np.ndarray, seed: int
    ) -> dict[str, ProbeScore]:
        """Within each modality (cross-validated) and across (trained on one, tested on the other)."""
        c = self.config
        return {
            "text_to_text": within_modality(text_x, text_y, seed, c.n_permutations, c.budget, c.train_per_class, what="text probe", n_jobs=c.n_jobs),
            "image_to_image": within_modality(image_x, image_y, seed, c.n_permutations, c.budget, c.train_per_class, what="image probe", n_jobs=c.n_jobs),
            "text_to_image": transfer(text_x, text_y, image_x, image_y, seed, c.n_permutations, c.budget, what="text-to-image probe"),
            "image_to_text": transfer(image_x, image_y, text_x, text_y, seed, c.n_permutations, c.budget, what="image-to-text probe"),
        }  # fmt: skip

    # 3. attribute probes ----------------------------------------------------------------
    def attribute_probes(self, ctx: RunContext, text_x: np.ndarray, image_x: np.ndarray, keep: np.ndarray | None) -> dict[str, ProbeScore]:
        """Modality (text rows against image rows), then each image attribute on its variants, grouped by source image."""
        c, scores = self.config, {}
        if ProbeAttribute.modality in c.attributes:
            x = np.vstack([text_x, image_x])
            y = np.array(["text"] * len(text_x) + ["image"] * len(image_x))
            scores["modality"] = within_modality(x, y, ctx.seed, c.n_permutations, c.budget, what="modality probe", n_jobs=c.n_jobs)
        for attribute in [str(a) for a in c.attributes if str(a) in ATTRIBUTES]:
            variants, labels, groups = attribute_variants(ctx.dataset, attribute)
            x = prepare_features(ctx.codes(dataset=variants, modalities=("image",)).image, c.binarise, keep)
            scores[attribute] = within_modality(x, labels, ctx.seed, c.n_permutations, c.budget, groups=groups,
                                                what=f"{attribute} probe", n_jobs=c.n_jobs)  # fmt: skip
        return scores

    def save_weights(self, ctx: RunContext, scores: dict[str, ProbeScore], keep: np.ndarray | None, n_columns: int) -> None:
        """weights/probe_<name>.safetensors per probe: its parameters, with the SAE feature id of every column."""
        ids = np.flatnonzero(keep) if keep is not None else np.arange(n_columns)
        for name, score in scores.items():
            if score.weights is None:
                continue
            tensors = {**score.weights, "feature_ids": ids[score.weights["columns"]].astype(np.int64)}
            metadata = {"probe": name, "classes": json.dumps(score.classes), "layer": str(ctx.layer), "sae": ctx.features.name,
                        "binarise": str(self.config.binarise)}  # fmt: skip
            ctx.tensors(f"probe_{name}", tensors, metadata)

    # report --------------------------------------------------------------------------------
    def report(self, ctx: RunContext, scores: dict[str, ProbeScore], n_text: int, n_image: int, n_features: int) -> dict[str, float]:
        table = pd.DataFrame([{"probe": name, **score.as_row()} for name, score in scores.items()])
        ctx.table("probes", table)
        with ctx.timed("figures"):
            ctx.figure("probe_accuracy", figures.probe_accuracy(table, ctx.layer))

        metrics: dict[str, float] = {"n_text_samples": n_text, "n_image_samples": n_image, "n_features": n_features}
        for name, score in scores.items():
            metrics[f"{name}_accuracy"] = score.accuracy
            metrics[f"{name}_accuracy_null_mean"] = score.shuffled_mean
            metrics[f"{name}_accuracy_null_q975"] = score.shuffled_q975
            metrics[f"{name}_chance"] = score.chance
            metrics[f"{name}_macro_f1"] = score.macro_f1
            metrics[f"{name}_p"] = score.p_value
        log.info(
            "layer %d: text->image %.2f (shuffled %.2f, chance %.2f, p=%.3g); image->text %.2f; within text %.2f, image %.2f",
            ctx.layer, scores["text_to_image"].accuracy, scores["text_to_image"].shuffled_mean, scores["text_to_image"].chance,
            scores["text_to_image"].p_value, scores["image_to_text"].accuracy, scores["text_to_text"].accuracy, scores["image_to_image"].accuracy,
        )
        return metrics
