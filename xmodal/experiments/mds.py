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
5. Interpretability per group (eqs. 5-6): embedding similarity I(z) and WinRate W(z) of
   each feature's top-m images (image embedder) and top-m concept texts (text embedder,
   all-MiniLM-L6-v2), against random samples; null: random samples in place of the top m.
6. Zero-mask interventions: remove ImgD, TextD or CrossD features from every sample's
   codes, decode through the SAE, and read the category out per modality; null: as many
   random active features removed, `n_random_masks` times.
"""

from __future__ import annotations

import logging
from typing import ClassVar

import numpy as np
import pandas as pd

import torch

from xmodal.activations.codes import ConceptCodes, concept_codes
from xmodal.errors import DatasetError
from xmodal.saes.loading import FeatureSpace
from xmodal.saes.training import train_topk_sae
from xmodal.experiments.base import Experiment, RunContext
from xmodal.metrics.interpretability import feature_interpretability
from xmodal.metrics.interventions import zero_mask_effects
from xmodal.metrics.modality import GROUPS, dominance_groups, modality_dominance, swapped_modalities
from xmodal.models.embedders import MINILM, image_embedder, text_embedder
from xmodal.reporting import figures

log = logging.getLogger(__name__)


class MDSClassifier(Experiment):
    name: ClassVar[str] = "mds"

    def __init__(
        self,
        name: str = "mds",
        n_null: int = 200,
        top_concepts: int = 3,
        interpretability: bool = True,
        top_m: int = 5,
        text_embedder: str = MINILM,
        image_embedder: str = "vision_tower",
        image_embedder_path: str | None = None,
        zero_mask: bool = True,
        n_random_masks: int = 20,
        msae: bool = False,
        msae_d_sae: int = 256,
        msae_k: int = 16,
        msae_epochs: float = 30.0,
    ) -> None:
        self.n_null = n_null
        self.top_concepts = top_concepts
        self.interpretability = interpretability
        self.top_m = top_m
        self.text_embedder = text_embedder
        self.image_embedder = image_embedder
        self.image_embedder_path = image_embedder_path
        self.zero_mask = zero_mask
        self.n_random_masks = n_random_masks
        self.msae = msae
        self.msae_shape = (msae_d_sae, msae_k, msae_epochs)

    def run(self, ctx: RunContext) -> dict[str, float]:
        if self.msae:
            self.space = self.train_msae(ctx)
            codes = concept_codes(ctx.activations()[ctx.layer], self.space, ctx.positions)
        else:
            self.space = ctx.features
            codes = ctx.codes()
        if self.space.sae is None:
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
        if self.interpretability:
            metrics |= self.interpretability_scores(ctx, codes, groups)
        if self.zero_mask:
            metrics |= self.zero_mask_interventions(ctx, codes, groups)
        log.info(
            "layer %d: %d ImgD, %d CrossD, %d TextD of %d active features (MDS mean %.2f, std %.2f; null std %.2f)",
            ctx.layer, metrics["n_ImgD"], metrics["n_CrossD"], metrics["n_TextD"], metrics["n_active_features"],
            mu, sigma, metrics["mds_std_null_mean"],
        )
        return metrics

    def interpretability_scores(self, ctx: RunContext, codes: ConceptCodes, groups: np.ndarray) -> dict[str, float]:
        """I(z) and WinRate per group and modality, each beside its random-sample null."""
        embed_text, text_name = text_embedder(self.text_embedder)
        embed_images, image_name = image_embedder(self.image_embedder, ctx.model, self.image_embedder_path)
        by_source = {image.source: image for image in ctx.dataset.images}
        texts = [c.text for c in ctx.dataset.concepts]
        with ctx.timed("embeddings"):
            samples = {
                "text": (codes.text, embed_text(texts)),
                "image": (codes.image, _batched(embed_images, [by_source[s].load() for s in codes.image_sources])),
            }
        rows, metrics = [], {}
        with ctx.timed("interpretability"):
            for modality, (matrix, embeddings) in samples.items():
                for g in GROUPS:
                    features = np.flatnonzero(groups == g)
                    scores = feature_interpretability(matrix, embeddings, features, self.top_m, ctx.seed)
                    scored = scores.dropna(subset=["I"])
                    row = {
                        "modality": modality, "group": g, "n_features": len(features), "n_scored": len(scored),
                        "I_mean": float(scored["I"].mean()) if len(scored) else np.nan,
                        "I_null_mean": float(scored["I_null"].mean()) if len(scored) else np.nan,
                        "W_mean": float(scored["W"].mean()) if len(scored) else np.nan,
                        "W_null_mean": float(scored["W_null"].mean()) if len(scored) else np.nan,
                        "embedder": text_name if modality == "text" else image_name,
                    }  # fmt: skip
                    rows.append(row)
                    for key in ("I_mean", "I_null_mean", "W_mean", "W_null_mean", "n_scored"):
                        metrics[f"{key.replace('_mean', '')}_{modality}_{g}"] = row[key]
        table = pd.DataFrame(rows)
        ctx.table("interpretability", table)
        lookup = table.set_index(["modality", "group"])["I_mean"]
        # The paper's Table 2: how much better each modality's own features read on its inputs.
        metrics["visual_monosemanticity"] = float(lookup["image", "ImgD"] - lookup["image", "TextD"])
        metrics["textual_monosemanticity"] = float(lookup["text", "TextD"] - lookup["text", "ImgD"])
        log.info("embedders: text %s; images %s", text_name, image_name)
        return metrics

    def zero_mask_interventions(self, ctx: RunContext, codes: ConceptCodes, groups: np.ndarray) -> dict[str, float]:
        """Readout accuracy per modality after removing each group (and random sets of equal size)."""
        categories = {c.name: c.category for c in ctx.dataset.concepts}
        use_category = len(set(categories.values())) >= 2
        label_of = (lambda c: categories[c]) if use_category else (lambda c: c)
        decode = lambda matrix: self.space.decode(torch.from_numpy(matrix).float()).numpy()  # noqa: E731
        feature_sets = {g: np.flatnonzero(groups == g) for g in ("ImgD", "TextD", "CrossD")}
        active = np.flatnonzero(groups != "inactive")
        rows, metrics = [], {}
        with ctx.timed("zero_mask"):
            for modality, matrix, owners in (("image", codes.image, codes.image_concepts), ("text", codes.text, codes.concepts)):
                labels = np.array([label_of(c) for c in owners])
                if min(np.unique(labels, return_counts=True)[1]) < 2:
                    log.warning("zero-mask: some %s label has a single sample; its readout is left out", modality)
                    continue
                for row in zero_mask_effects(matrix, labels, decode, feature_sets, active, self.n_random_masks, ctx.seed):
                    rows.append({"modality": modality, "label": "category" if use_category else "concept", **row})
                    metrics[f"readout_{modality}_minus_{row['removed']}"] = row["accuracy"]
                    if row["removed"] != "none":
                        metrics[f"readout_{modality}_minus_random_{row['removed']}_mean"] = row["random_mean"]
                        metrics[f"readout_{modality}_minus_{row['removed']}_p"] = row["p_value"]
        if rows:
            ctx.table("zero_mask", pd.DataFrame(rows))
        return metrics


    def train_msae(self, ctx: RunContext) -> FeatureSpace:
        """The paper's multimodal SAE: one TopK SAE (sae-lens) on both modalities' tokens at this layer.

        Text tokens are resampled to as many rows as image tokens, so neither modality
        owns the dictionary by sheer count. Saved in sae-lens format under msae/.
        """
        d_sae, k, epochs = self.msae_shape
        acts = ctx.activations()[ctx.layer]
        image_rows = acts.image_tokens.reshape(-1, acts.image_tokens.shape[-1]).float()
        text_rows = acts.text_tokens.float()
        if len(text_rows) == 0 or len(image_rows) == 0:
            raise DatasetError("experiment.msae=true needs text and image tokens; the dataset gives one modality only")
        generator = torch.Generator().manual_seed(ctx.seed)
        text_rows = text_rows[torch.randint(len(text_rows), (len(image_rows),), generator=generator)]
        rows = torch.cat([image_rows, text_rows])
        batch_size = min(256, len(rows))
        with ctx.timed("msae"):
            sae = train_topk_sae(rows, ctx.layer, d_sae, k, int(epochs * len(rows)), batch_size, 4e-4, ctx.seed,
                                 model_name=ctx.model.name)  # fmt: skip
            sae.save_inference_model(ctx.writer.output_dir / "msae")
        identity = {"kind": "msae", "d_sae": d_sae, "k": k, "epochs": epochs, "seed": ctx.seed}
        return FeatureSpace("msae", ctx.layer, sae.eval(), int(rows.shape[1]), identity)


def _batched(embed, items: list, batch_size: int = 32) -> np.ndarray:
    return np.vstack([embed(items[i : i + batch_size]) for i in range(0, len(items), batch_size)])
