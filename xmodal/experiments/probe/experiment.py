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
   low-data splits (`train_per_class` examples per class, or `train_split` 1:9 ... 5:5).
5. Nulls: chance (majority rate) and a label-shuffled control with a permutation p-value;
   for the transfer probes the shuffle runs over all training rows or, with
   `null=within_category`, only within each category. With `label=category` the folds keep
   each concept on one side (no concept in both train and test).
6. Seed 003's extras: the top-N curve (each image token keeps only its N largest SAE
   activations, then the tokens are summed; an image probe at each N and with all), and
   per class the features active in most of its images, against their rate in other classes.

With `features=vision_tower` the probes read the VLM's own vision tower instead (patch
states mean-pooled; seed 001's MODE option, seed 003's ViT baseline): image probes only,
as text never passes through the tower, and the layer plays no part.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Callable, ClassVar

import numpy as np
import pandas as pd

from xmodal.data.concepts import ConceptDataset
from xmodal.data.variants import ATTRIBUTES, attribute_variants
from xmodal.errors import ConfigError
from xmodal.experiments.base import Experiment, RunContext
from xmodal.experiments.probe.config import ProbeAttribute, ProbeConfig, ProbeFeatures, ProbeLabel, ProbeNull, TrainSplit
from xmodal.metrics.probes import (
    ProbeScore,
    over_represented,
    prepare_features,
    shared_features,
    split_shortfall,
    transfer,
    within_modality,
)
from xmodal.models.embedders import embed_in_batches, image_embedder
from xmodal.reporting import figures

log = logging.getLogger(__name__)


class LinearProbeTransfer(Experiment):
    name: ClassVar[str] = "probe"
    needs_decoder: ClassVar[bool] = False  # runs on a dual encoder's embeddings too
    config: ProbeConfig

    def run(self, ctx: RunContext) -> dict[str, float]:
        if self.config.features == ProbeFeatures.vision_tower:
            return self.run_on_vision_tower(ctx)
        (text_x, text_y, text_concepts), (image_x, image_y, image_concepts) = self.samples(ctx)
        self.skipped: dict[str, str] = {}
        keep = self.feature_filter(text_x, image_x)
        self.shared_features(ctx, image_x, image_y, keep)
        text_x, image_x = (prepare_features(x, self.config.binarise, keep) for x in (text_x, image_x))
        with ctx.timed("metrics"):
            scores = self.concept_probes(ctx, (text_x, text_y, text_concepts), (image_x, image_y, image_concepts))
            scores |= self.attribute_probes(ctx, text_x, image_x, keep)
            curve = self.top_n_curve(ctx, image_y, image_concepts, keep)
        self.save_weights(ctx, scores, keep, int(text_x.shape[1]))
        return self.report(ctx, scores, len(text_y), len(image_y), int(text_x.shape[1])) | curve

    def run_on_vision_tower(self, ctx: RunContext) -> dict[str, float]:
        """Image probes (concepts, then the image attributes) on the vision tower's pooled patch states."""
        embed, _ = image_embedder("vision_tower", ctx.model)

        def tower_features(dataset: ConceptDataset) -> np.ndarray:
            images = [img.load() for img in dataset.images]
            with ctx.timed("vision_tower"):
                raw = embed_in_batches(embed, images, ctx.batch_size, desc=f"{ctx.model.name}: vision tower")
            return prepare_features(raw, self.config.binarise)

        self.skipped = {}
        image_x = tower_features(ctx.dataset)
        image_concepts = np.array([img.concept for img in ctx.dataset.images])
        image_y = self.labels(ctx, list(image_concepts))
        with ctx.timed("metrics"):
            scores = self.within(ctx, "image_to_image", image_x, image_y, image_concepts, what="vision-tower image probe")
            scores |= self.image_attribute_probes(ctx, tower_features, what="vision-tower ")
        self.save_weights(ctx, scores, None, int(image_x.shape[1]))
        return self.report(ctx, scores, 0, len(image_y), int(image_x.shape[1]))

    def within(self, ctx: RunContext, name: str, x: np.ndarray, y: np.ndarray, concepts: np.ndarray, what: str) -> dict[str, ProbeScore]:
        """{name: a cross-validated probe inside one modality}, with the configured budget and low-data split;
        folds grouped by concept when a class holds several. A `train_split` that leaves a class without a
        training example skips the probe ({}), with the reason in self.skipped (result.json and table
        skipped_probes say so): seed 003's 1:9 sweep has too few text samples per class."""
        c = self.config
        fraction = TrainSplit(c.train_split).train_fraction if c.train_split is not None else None
        shortfall = split_shortfall(y, None, fraction) if fraction is not None else None
        if shortfall is not None:
            log.warning("Skipped the %s: %s", what, shortfall)
            self.skipped[name] = f"{what}: {shortfall}"
            return {}
        return {
            name: within_modality(
                x,
                y,
                ctx.seed,
                c.n_permutations,
                c.budget,
                c.train_per_class,
                what=what,
                n_jobs=c.n_jobs,
                train_fraction=fraction,
                concepts=concepts,
                **self.solver(ctx),
            )
        }

    def solver(self, ctx: RunContext) -> dict[str, str]:
        """The probe solver and, for torch, the model's device (its GPU when it has one)."""
        return {"solver": str(self.config.solver), "device": str(ctx.model.device)}

    # 1. samples --------------------------------------------------------------------
    def samples(self, ctx: RunContext) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """((text codes, classes, concepts), (image codes, classes, concepts)): each concept in every template, and every image."""
        text_x, text_y = [], []
        for template in self.config.text_templates:
            codes = ctx.codes(positions=dataclasses.replace(ctx.positions, text_prompt=template), modalities=("text",))
            text_x.append(codes.text)
            text_y += codes.concepts
        image_x = ctx.codes(modalities=("image",)).image
        image_y = [img.concept for img in ctx.dataset.images]
        return (np.vstack(text_x), self.labels(ctx, text_y), np.array(text_y)), (image_x, self.labels(ctx, image_y), np.array(image_y))

    def labels(self, ctx: RunContext, concepts: list[str]) -> np.ndarray:
        """The class of each sample: its concept, or with label=category the concept's category."""
        if self.config.label == ProbeLabel.concept:
            return np.array(concepts)
        category = {c.name: c.category for c in ctx.dataset.concepts}
        return np.array([category[c] for c in concepts])

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
        self, ctx: RunContext, text: tuple[np.ndarray, np.ndarray, np.ndarray], image: tuple[np.ndarray, np.ndarray, np.ndarray]
    ) -> dict[str, ProbeScore]:
        """Within each modality (cross-validated) and across (trained on one, tested on the other).
        Each argument: (codes, classes, concepts)."""
        c = self.config
        scores = self.within(ctx, "text_to_text", *text, what="text probe") | self.within(ctx, "image_to_image", *image, what="image probe")
        for name, (train, test) in {"text_to_image": (text, image), "image_to_text": (image, text)}.items():
            scores[name] = transfer(
                train[0],
                train[1],
                test[0],
                test[1],
                ctx.seed,
                c.n_permutations,
                c.budget,
                what=f"{name.replace('_', '-')} probe",
                null_groups=self.null_groups(ctx, train[2]),
                **self.solver(ctx),
            )
        return scores

    def null_groups(self, ctx: RunContext, concepts: np.ndarray) -> np.ndarray | None:
        """Per training row, the group its shuffled label stays in: None (all rows), or its concept's category."""
        if self.config.null == ProbeNull.all:
            return None
        category = {cc.name: cc.category for cc in ctx.dataset.concepts}
        per_category = pd.Series(list(category)).groupby(list(category.values())).nunique()
        if per_category.max() < 2:
            raise ConfigError(
                "experiment.null=within_category shuffles concept labels inside categories, and every category of this dataset "
                f"holds one concept ({dict(per_category)}); use experiment.null=all"
            )
        return np.array([category[cc] for cc in concepts])

    # 3. attribute probes ----------------------------------------------------------------
    def attribute_probes(self, ctx: RunContext, text_x: np.ndarray, image_x: np.ndarray, keep: np.ndarray | None) -> dict[str, ProbeScore]:
        """Modality (text rows against image rows), then each image attribute on its variants, grouped by source image."""
        c, scores = self.config, {}
        if ProbeAttribute.modality in c.attributes:
            x = np.vstack([text_x, image_x])
            y = np.array(["text"] * len(text_x) + ["image"] * len(image_x))
            scores["modality"] = within_modality(x, y, ctx.seed, c.n_permutations, c.budget, what="modality probe", n_jobs=c.n_jobs, **self.solver(ctx))
        return scores | self.image_attribute_probes(
            ctx, lambda dataset: prepare_features(ctx.codes(dataset=dataset, modalities=("image",)).image, c.binarise, keep)
        )

    def image_attribute_probes(self, ctx: RunContext, features_of: Callable[[ConceptDataset], np.ndarray], what: str = "") -> dict[str, ProbeScore]:
        """Each image attribute (brightness, redness) on its variants, grouped by source image; `features_of` reads a dataset."""
        c, scores = self.config, {}
        for attribute in [str(a) for a in c.attributes if str(a) in ATTRIBUTES]:
            variants, labels, groups = attribute_variants(ctx.dataset, attribute)
            scores[attribute] = within_modality(
                features_of(variants),
                labels,
                ctx.seed,
                c.n_permutations,
                c.budget,
                groups=groups,
                what=f"{what}{attribute} probe",
                n_jobs=c.n_jobs,
                **self.solver(ctx),
            )
        return scores

    # 6. seed 003's top-N curve and shared features -----------------------------------------
    def top_n_curve(self, ctx: RunContext, image_y: np.ndarray, image_concepts: np.ndarray, keep: np.ndarray | None) -> dict[str, float]:
        """Image probes on codes where each token keeps its N largest features before the tokens are summed."""
        if not self.config.top_n_curve:
            return {}
        rows, metrics = [], {}
        counts = [*sorted(self.config.top_n_curve), None]  # None: every feature of every token, summed
        with ctx.timed("encode"):
            pooled = ctx.image_codes([("topn_per_token", n) if n else ("sum", 1) for n in counts])
        for n, codes in zip(counts, pooled):
            x = prepare_features(codes, self.config.binarise, keep)
            probe = self.within(ctx, f"top_{n or 'all'}", x, image_y, image_concepts, what=f"top-{n or 'all'} image probe")
            if not probe:
                continue
            score = next(iter(probe.values()))
            rows.append({"top_n": n if n is not None else "all", **score.as_row()})
            metrics |= {
                f"top_{n or 'all'}_image_macro_f1": score.macro_f1,
                f"top_{n or 'all'}_image_accuracy": score.accuracy,
                f"top_{n or 'all'}_image_accuracy_null_mean": score.shuffled_mean,
                f"top_{n or 'all'}_image_p": score.p_value,
            }
        if not rows:
            return metrics
        table = pd.DataFrame(rows).astype({"top_n": str})
        ctx.table("top_n_curve", table)
        ctx.figure("top_n_curve", figures.top_n_curve(table, ctx.layer))
        return metrics

    def shared_features(self, ctx: RunContext, image_x: np.ndarray, image_y: np.ndarray, keep: np.ndarray | None) -> None:
        """Table shared_features: per class, the SAE features active in most of its images (after the over-represented cut)."""
        if self.config.shared_features_per_class == 0:
            return
        table = shared_features(prepare_features(image_x, False, keep), image_y, self.config.shared_features_per_class)
        if keep is not None:  # back to SAE feature ids
            table["feature"] = np.flatnonzero(keep)[table["feature"].to_numpy()]
        ctx.table("shared_features", table)

    def save_weights(self, ctx: RunContext, scores: dict[str, ProbeScore], keep: np.ndarray | None, n_columns: int) -> None:
        """weights/probe_<name>.safetensors per probe: its parameters, with the SAE feature id of every column."""
        ids = np.flatnonzero(keep) if keep is not None else np.arange(n_columns)
        for name, score in scores.items():
            if score.weights is None:
                continue
            tensors = {**score.weights, "feature_ids": ids[score.weights["columns"]].astype(np.int64)}
            source = ctx.features.name if self.config.features == ProbeFeatures.decoder else f"{ctx.model.name} vision tower"
            metadata = {"probe": name, "classes": json.dumps(score.classes), "layer": str(ctx.layer), "features": source, "binarise": str(self.config.binarise)}
            ctx.tensors(f"probe_{name}", tensors, metadata)

    # report --------------------------------------------------------------------------------
    def report(self, ctx: RunContext, scores: dict[str, ProbeScore], n_text: int, n_image: int, n_features: int) -> dict[str, float]:
        table = pd.DataFrame([{"probe": name, **score.as_row()} for name, score in scores.items()])
        ctx.table("probes", table)
        with ctx.timed("figures"):
            ctx.figure("probe_accuracy", figures.probe_accuracy(table, ctx.layer))

        metrics: dict[str, float] = {"n_text_samples": n_text, "n_image_samples": n_image, "n_features": n_features}
        for name in self.skipped:  # a probe the split could not run: 1, with the reason in table skipped_probes
            metrics[f"{name}_skipped"] = 1
        if self.skipped:
            ctx.table("skipped_probes", pd.DataFrame({"probe": list(self.skipped), "reason": list(self.skipped.values())}))
        for name, score in scores.items():
            metrics[f"{name}_accuracy"] = score.accuracy
            metrics[f"{name}_accuracy_null_mean"] = score.shuffled_mean
            metrics[f"{name}_accuracy_null_q975"] = score.shuffled_q975
            metrics[f"{name}_chance"] = score.chance
            metrics[f"{name}_macro_f1"] = score.macro_f1
            metrics[f"{name}_p"] = score.p_value
        log.info(
            "layer %d (%s): %s",
            ctx.layer,
            self.config.features,
            "; ".join(f"{name} {s.accuracy:.2f} (shuffled {s.shuffled_mean:.2f}, chance {s.chance:.2f}, p={s.p_value:.3g})" for name, s in scores.items()),
        )
        return metrics
