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
import logging
from typing import ClassVar, Sequence

import numpy as np
import pandas as pd

from xmodal.data.variants import ATTRIBUTES, attribute_variants
from xmodal.errors import ConfigError
from xmodal.experiments.base import Experiment, RunContext
from xmodal.metrics.probes import ProbeScore, over_represented, prepare_features, transfer, within_modality
from xmodal.reporting import figures

log = logging.getLogger(__name__)

DEFAULT_TEMPLATES = (
    "{concept}",
    "a photo of {concept}",
    "an image of {concept}",
    "this is {concept}",
    "a picture showing {concept}",
    "{concept}, seen in a picture",
)


class LinearProbeTransfer(Experiment):
    name: ClassVar[str] = "probe"

    def __init__(
        self,
        name: str = "probe",
        text_templates: Sequence[str] = DEFAULT_TEMPLATES,
        n_permutations: int = 100,
        budget: int | None = None,
        binarise: bool = False,
        max_active_fraction: float | None = None,
        train_per_class: int | None = None,
        attributes: Sequence[str] = ("modality", "brightness", "redness"),
        n_jobs: int = -1,
    ) -> None:
        bad = [t for t in text_templates if "{concept}" not in t]
        if bad or not text_templates:
            raise ConfigError(f"experiment.text_templates must each contain '{{concept}}'; these do not: {bad}")
        unknown = sorted(set(attributes) - {"modality", *ATTRIBUTES})
        if unknown:
            raise ConfigError(f"unknown attribute probes {unknown}; choose from modality, {', '.join(ATTRIBUTES)}")
        self.text_templates = list(text_templates)
        self.n_permutations = n_permutations
        self.budget = budget
        self.binarise = binarise
        self.max_active_fraction = max_active_fraction
        self.train_per_class = train_per_class
        self.attributes = list(attributes)
        self.n_jobs = n_jobs

    def run(self, ctx: RunContext) -> dict[str, float]:
        text_x, text_y = [], []
        for template in self.text_templates:
            codes = ctx.codes(positions=dataclasses.replace(ctx.positions, text_prompt=template), modalities=("text",))
            text_x.append(codes.text)
            text_y += codes.concepts
        image_x = ctx.codes(modalities=("image",)).image
        text_x, text_y = np.vstack(text_x), np.array(text_y)
        image_y = np.array([img.concept for img in ctx.dataset.images])

        keep = None
        if self.max_active_fraction is not None:
            keep = over_represented(np.vstack([text_x, image_x]), self.max_active_fraction)
            log.info("Removed %d over-represented features (active in > %.0f%% of samples)", int((~keep).sum()), 100 * self.max_active_fraction)
        text_x, image_x = (prepare_features(x, self.binarise, keep) for x in (text_x, image_x))

        scores: dict[str, ProbeScore] = {}
        seed, perms, budget = ctx.seed, self.n_permutations, self.budget
        with ctx.timed("metrics"):
            scores["text_to_text"] = within_modality(text_x, text_y, seed, perms, budget, self.train_per_class, what="text probe", n_jobs=self.n_jobs)
            scores["image_to_image"] = within_modality(image_x, image_y, seed, perms, budget, self.train_per_class, what="image probe", n_jobs=self.n_jobs)
            scores["text_to_image"] = transfer(text_x, text_y, image_x, image_y, seed, perms, budget, what="text-to-image probe")
            scores["image_to_text"] = transfer(image_x, image_y, text_x, text_y, seed, perms, budget, what="image-to-text probe")
            if "modality" in self.attributes:
                x = np.vstack([text_x, image_x])
                y = np.array(["text"] * len(text_x) + ["image"] * len(image_x))
                scores["modality"] = within_modality(x, y, seed, perms, budget, what="modality probe", n_jobs=self.n_jobs)
            for attribute in (a for a in self.attributes if a in ATTRIBUTES):
                variants, labels, groups = attribute_variants(ctx.dataset, attribute)
                x = prepare_features(ctx.codes(dataset=variants, modalities=("image",)).image, self.binarise, keep)
                scores[attribute] = within_modality(x, labels, seed, perms, budget, groups=groups, what=f"{attribute} probe", n_jobs=self.n_jobs)

        table = pd.DataFrame([{"probe": name, **score.as_row()} for name, score in scores.items()])
        ctx.table("probes", table)
        with ctx.timed("figures"):
            ctx.figure("probe_accuracy", figures.probe_accuracy(table, ctx.layer))

        metrics: dict[str, float] = {"n_text_samples": len(text_y), "n_image_samples": len(image_y), "n_features": int(text_x.shape[1])}
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
