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
   the tails hold only what sampling noise puts there. The spread of MDS (`mds_std`), the
   study's informative statistic, gets a one-sided p against the spread of each draw.
5. Interpretability per group (eqs. 5-6): embedding similarity I(z) and WinRate W(z) of
   each feature's top-m images (an image embedder independent of the model; where it cannot
   load, the model's own vision tower only if the model config allows it, recorded as
   `image_embedder_is_fallback`) and top-m concept texts (text embedder,
   all-MiniLM-L6-v2), against random samples; null: random samples in place of the top m.
   Over all active features too (group "all"): Table 1's I, W per modality and the WinRate
   gap between them.
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
from xmodal.errors import DatasetError, ModelLoadError
from xmodal.experiments.base import Experiment, RunContext
from xmodal.experiments.mds.config import ImageEmbedderKind, MDSConfig
from xmodal.metrics.interpretability import feature_interpretability
from xmodal.metrics.interventions import zero_mask_effects
from xmodal.metrics.modality import GROUPS, dominance_groups, modality_dominance, swapped_modalities
from xmodal.metrics.statistics import pvalue, summarise_null
from xmodal.models.base import hub_model_reachable
from xmodal.models.embedders import ImageEmbedder, embed_in_batches, image_embedder, text_embedder
from xmodal.reporting import figures
from xmodal.saes.loading import FeatureSpace
from xmodal.saes.training import train_topk_sae

log = logging.getLogger(__name__)


class MDSClassifier(Experiment):
    name: ClassVar[str] = "mds"
    needs_decoder: ClassVar[bool] = False  # runs on a dual encoder's embeddings too
    config: MDSConfig

    def run(self, ctx: RunContext) -> dict[str, float]:
        self.space, codes = self.encode(ctx)
        image, text = self.matched_pairs(codes)
        with ctx.timed("metrics"):
            mds, n_active = modality_dominance(image, text)
            groups, mu, sigma = dominance_groups(mds)
            null_sizes, null_mds = self.swapped_null(image, text, ctx.seed)
            feature_table = self.feature_table(codes, image, text, mds, groups, n_active)
            size_table = self.group_sizes(groups, null_sizes)
        ctx.table("features", feature_table)
        ctx.table("group_sizes", size_table)
        if self.config.top_examples:
            self.top_examples(ctx, codes, feature_table)
        with ctx.timed("figures"):
            ctx.figure("mds_histogram", figures.mds_histogram(mds, mu, sigma, np.concatenate(null_mds), ctx.layer))
            if self.space is ctx.features and ctx.features.sae is not None:  # not the on-the-fly MSAE: its codes are not per token here
                examples = feature_table.sort_values("n_pairs_active", ascending=False, kind="stable").groupby("group").head(1)
                ctx.patch_heatmaps(
                    "group_examples",
                    examples["feature"],
                    [f"{g}: feature {f} (MDS {m:.2f})" for g, f, m in zip(examples["group"], examples["feature"], examples["mds"])],
                )

        metrics: dict[str, float] = {
            "n_active_features": int(np.isfinite(mds).sum()),
            "mds_mean": mu,
            **self.spread_against_null(sigma, null_mds),
        }
        for row in size_table.to_dict("records"):
            key = f"n_{row['group']}"
            metrics[key] = row["n_features"]
            for stat in ("null_mean", "null_q025", "null_q975"):
                metrics[f"{key}_{stat}"] = row[stat]
            metrics[f"{key}_p"] = row["p_value"]
        if self.config.interpretability:
            metrics |= self.interpretability_scores(ctx, codes, groups)
        if self.config.zero_mask:
            metrics |= self.zero_mask_interventions(ctx, codes, groups)
        log.info(
            "layer %d: %d ImgD, %d CrossD, %d TextD of %d active features (MDS mean %.2f, std %.2f; null std %.2f, p=%.3g)",
            ctx.layer,
            metrics["n_ImgD"],
            metrics["n_CrossD"],
            metrics["n_TextD"],
            metrics["n_active_features"],
            mu,
            sigma,
            metrics["mds_std_null_mean"],
            metrics["mds_std_p"],
        )
        return metrics

    # 1. codes -------------------------------------------------------------------
    def encode(self, ctx: RunContext) -> tuple[FeatureSpace, ConceptCodes]:
        """The feature space (the configured SAE, or a multimodal SAE trained here) and its pooled codes."""
        if self.config.msae:
            space = self.train_msae(ctx)
            codes = concept_codes(ctx.activations()[ctx.layer], space, ctx.positions)
        else:
            space, codes = ctx.features, ctx.codes()
        if space.sae is None:
            log.warning("sae=none: MDS needs non-negative codes, so residual dimensions enter with their positive part")
        return space, codes

    @staticmethod
    def matched_pairs(codes: ConceptCodes) -> tuple[np.ndarray, np.ndarray]:
        """(image codes, text codes): one row per image, beside its concept's text."""
        concept_index = {name: i for i, name in enumerate(codes.concepts)}
        owners = np.array([concept_index[c] for c in codes.image_concepts])
        return codes.image, codes.text[owners]

    def top_examples(self, ctx: RunContext, codes: ConceptCodes, feature_table: pd.DataFrame) -> None:
        """Figures 2-4 of the paper: per group, its two features active in most pairs, with their top images
        (figure `top_images`) and top texts (table `top_examples`, both modalities)."""
        n = self.config.top_examples
        chosen = feature_table.sort_values("n_pairs_active", ascending=False, kind="stable").groupby("group", sort=False).head(2)
        rows, grid, labels = [], [], []
        for feature, group, mds in zip(chosen["feature"], chosen["group"], chosen["mds"]):
            for modality, matrix, names in (("image", codes.image, codes.image_concepts), ("text", codes.text, codes.concepts)):
                order = [i for i in np.argsort(-matrix[:, feature], kind="stable")[:n] if matrix[i, feature] > 0]
                rows += [
                    {
                        "feature": int(feature),
                        "group": group,
                        "mds": float(mds),
                        "modality": modality,
                        "rank": rank + 1,
                        "concept": names[i],
                        "text": ctx.dataset.concept(names[i]).text,
                        "activation": float(matrix[i, feature]),
                    }
                    for rank, i in enumerate(order)
                ]
                if modality == "image" and order:  # a feature silent on every image has its texts in the table only
                    grid.append([ctx.dataset.images[i].load() for i in order])  # code row i is dataset image i
                    labels.append(f"{group} {feature}\nMDS {mds:.2f}")
        ctx.table("top_examples", pd.DataFrame(rows))
        if grid:
            ctx.figure(
                "top_images",
                figures.image_grid(grid, labels, [f"#{k + 1}" for k in range(n)], f"Top images of each group's busiest features, layer {ctx.layer}"),
            )

    # 4. null ----------------------------------------------------------------------
    def swapped_null(self, image: np.ndarray, text: np.ndarray, seed: int) -> tuple[dict[str, list[int]], list[np.ndarray]]:
        """Group sizes and MDS values after swapping modalities within pairs at random, `n_null` times."""
        rng = np.random.default_rng(seed)
        null_sizes: dict[str, list[int]] = {g: [] for g in GROUPS}
        null_mds = []
        for _ in range(self.config.n_null):
            null_image, null_text = swapped_modalities(image, text, rng)
            shuffled, _ = modality_dominance(null_image, null_text)
            null_groups, _, _ = dominance_groups(shuffled)
            null_mds.append(shuffled)
            for g in GROUPS:
                null_sizes[g].append(int(np.sum(null_groups == g)))
        return null_sizes, null_mds

    @staticmethod
    def spread_against_null(sigma: float, null_mds: list[np.ndarray]) -> dict[str, float]:
        """mds_std against the spread of each swapped-modality draw: one-sided, a modality signal widens it."""
        summary = summarise_null(sigma, np.array([np.nanstd(m) for m in null_mds]))
        return {
            "mds_std": sigma,
            "mds_std_null_mean": summary.null_mean,
            "mds_std_null_q025": summary.null_q025,
            "mds_std_null_q975": summary.null_q975,
            "mds_std_p": summary.p_value,
        }

    # 2-3. per feature ---------------------------------------------------------------
    def feature_table(
        self, codes: ConceptCodes, image: np.ndarray, text: np.ndarray, mds: np.ndarray, groups: np.ndarray, n_active: np.ndarray
    ) -> pd.DataFrame:
        """Every active feature: its MDS, group, activity per modality and the concepts it fires for most."""
        names = np.array(codes.concepts)
        per_concept = codes.image_by_concept() + codes.text  # concepts x features, both modalities
        top = np.argsort(-per_concept, axis=0, kind="stable")[: self.config.top_concepts]
        table = pd.DataFrame(
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
        return table[table["group"] != "inactive"].reset_index(drop=True)

    @staticmethod
    def group_sizes(groups: np.ndarray, null_sizes: dict[str, list[int]]) -> pd.DataFrame:
        """Each group's size against its swapped-modality null, with a two-sided p-value."""
        rows = []
        for g in GROUPS:
            observed = int(np.sum(groups == g))
            null = np.array(null_sizes[g])
            rows.append(
                {
                    "group": g,
                    "n_features": observed,
                    "null_mean": float(null.mean()),
                    "null_q025": float(np.quantile(null, 0.025)),
                    "null_q975": float(np.quantile(null, 0.975)),
                    # two-sided: how unusual the observed size is under swapped modalities
                    "p_value": pvalue(observed, null, "two-sided"),
                }
            )
        return pd.DataFrame(rows)

    # 5. interpretability -----------------------------------------------------------
    def interpretability_scores(self, ctx: RunContext, codes: ConceptCodes, groups: np.ndarray) -> dict[str, float]:
        """I(z) and WinRate per group and modality, each beside its random-sample null."""
        embed_text, text_name = text_embedder(self.config.text_embedder)
        embed_images, image_name, is_fallback = self.image_embedder(ctx)
        texts = [c.text for c in ctx.dataset.concepts]
        with ctx.timed("embeddings"):
            samples = {
                "text": (codes.text, embed_text(texts)),
                # code row i is dataset image i; sources can repeat (the organism's rendered words), so not by source
                "image": (codes.image, embed_in_batches(embed_images, [image.load() for image in ctx.dataset.images])),
            }
        rows, metrics = [], {"image_embedder_is_fallback": int(is_fallback)}
        ctx.metadata |= {"image_embedder": image_name, "text_embedder": text_name}  # the embedders used, by name, in result.json
        with ctx.timed("interpretability"):
            for modality, (matrix, embeddings) in samples.items():
                for g in (*GROUPS, "all"):  # "all": every active feature, the paper's Table 1
                    features = np.flatnonzero(groups != "inactive") if g == "all" else np.flatnonzero(groups == g)
                    scores = feature_interpretability(matrix, embeddings, features, self.config.top_m, ctx.seed)
                    scored = scores.dropna(subset=["I"])
                    row = {
                        "modality": modality,
                        "group": g,
                        "n_features": len(features),
                        "n_scored": len(scored),
                        "I_mean": float(scored["I"].mean()) if len(scored) else np.nan,
                        "I_null_mean": float(scored["I_null"].mean()) if len(scored) else np.nan,
                        "W_mean": float(scored["W"].mean()) if len(scored) else np.nan,
                        "W_null_mean": float(scored["W_null"].mean()) if len(scored) else np.nan,
                        "embedder": text_name if modality == "text" else image_name,
                    }
                    rows.append(row)
                    for key in ("I_mean", "I_null_mean", "W_mean", "W_null_mean", "n_scored"):
                        metrics[f"{key.replace('_mean', '')}_{modality}_{g}"] = row[key]
        table = pd.DataFrame(rows)
        ctx.table("interpretability", table)
        lookup = table.set_index(["modality", "group"])["I_mean"]
        # The paper's Table 2: how much better each modality's own features read on its inputs.
        metrics["visual_monosemanticity"] = float(lookup["image", "ImgD"] - lookup["image", "TextD"])
        metrics["textual_monosemanticity"] = float(lookup["text", "TextD"] - lookup["text", "ImgD"])
        # Table 1: the overall WinRate gap between modalities (|delta| large: features lean to one modality).
        winrate = table.set_index(["modality", "group"])
        metrics["winrate_delta_image_minus_text"] = float(winrate.loc[("image", "all"), "W_mean"] - winrate.loc[("text", "all"), "W_mean"])
        metrics["winrate_delta_image_minus_text_null"] = float(winrate.loc[("image", "all"), "W_null_mean"] - winrate.loc[("text", "all"), "W_null_mean"])
        log.info("embedders: text %s; images %s", text_name, image_name)
        return metrics

    def image_embedder(self, ctx: RunContext) -> tuple[ImageEmbedder, str, bool]:
        """The configured image embedder, its name and False; if it cannot be loaded, the fallback (where
        experiment.image_embedder_fallback, by default the model config's, allows one), named as such, and True."""
        c = self.config
        fallback = c.image_embedder_fallback if c.image_embedder_fallback != c.image_embedder else None
        try:
            if fallback is not None and c.image_embedder == ImageEmbedderKind.hf and not hub_model_reachable(str(c.image_embedder_path)):
                raise ModelLoadError(f"{c.image_embedder_path} is neither on disk nor in the Hugging Face cache, and the hub does not answer")
            return (*image_embedder(str(c.image_embedder), ctx.model, c.image_embedder_path), False)
        except ModelLoadError as err:
            if fallback is None:
                raise ModelLoadError(
                    f"image embedder {c.image_embedder_path} cannot be loaded ({str(err).split(';')[0]}) and model "
                    f"{ctx.model.name!r} allows no fallback; put it in the Hugging Face cache, or set "
                    "experiment.image_embedder_fallback=vision_tower (not independent of the model) or experiment.interpretability=false"
                ) from err
            log.warning(
                "image embedder %s cannot be loaded (%s); I(z) on images uses %s instead, which is not independent of the model under study",
                c.image_embedder_path,
                str(err).split(";")[0],
                fallback,
            )
            embed, name = image_embedder(str(fallback), ctx.model, None)
            return embed, f"{name}; fallback, {c.image_embedder_path} not loadable", True

    # 6. zero-mask interventions ------------------------------------------------------
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
                for row in zero_mask_effects(matrix, labels, decode, feature_sets, active, self.config.n_random_masks, ctx.seed):
                    rows.append({"modality": modality, "label": "category" if use_category else "concept", **row})
                    metrics[f"readout_{modality}_minus_{row['removed']}"] = row["accuracy"]
                    if row["removed"] != "none":
                        metrics[f"readout_{modality}_minus_random_{row['removed']}_mean"] = row["random_mean"]
                        metrics[f"readout_{modality}_minus_{row['removed']}_p"] = row["p_value"]
        if rows:
            ctx.table("zero_mask", pd.DataFrame(rows))
        return metrics

    # the paper's multimodal SAE (experiment.msae=true) -------------------------------
    def train_msae(self, ctx: RunContext) -> FeatureSpace:
        """The paper's multimodal SAE: one TopK SAE (sae-lens) on both modalities' tokens at this layer.

        Matched pairs: every image token is paired with a token of its own concept's text, so
        both modalities give as many rows and neither owns the dictionary by sheer count (on a
        dual encoder, each image embedding with its concept's text embedding). Saved in
        sae-lens format under msae/.
        """
        d_sae, k, epochs = self.config.msae_d_sae, self.config.msae_k, self.config.msae_epochs
        acts = ctx.activations()[ctx.layer]
        image_rows = acts.image_token_rows()  # the matched pairs this SAE trains on are in memory by the method's design
        text_rows = acts.text_tokens.float()
        if len(text_rows) == 0 or len(image_rows) == 0:
            raise DatasetError("experiment.msae=true needs text and image tokens; the dataset gives one modality only")
        # Matched pairs, as the paper's objective has them: beside each image token, a token of its own concept's text.
        generator = torch.Generator().manual_seed(ctx.seed)
        owner = {name: i for i, name in enumerate(acts.concepts)}
        concept_of_row = torch.tensor([owner[c] for c in acts.image_concepts]).repeat_interleave(acts.tokens_per_image)
        start, length = acts.text_offsets[concept_of_row], acts.text_offsets[concept_of_row + 1] - acts.text_offsets[concept_of_row]
        text_rows = text_rows[start + (torch.rand(len(concept_of_row), generator=generator) * length).long()]
        rows = torch.cat([image_rows, text_rows])
        batch_size = min(256, len(rows))
        with ctx.timed("msae"):
            sae = train_topk_sae(rows, ctx.layer, d_sae, k, int(epochs * len(rows)), batch_size, 4e-4, ctx.seed, model_name=ctx.model.name)
            sae.save_inference_model(ctx.writer.output_dir / "msae")
        identity = {"kind": "msae", "d_sae": d_sae, "k": k, "epochs": epochs, "seed": ctx.seed}
        return FeatureSpace("msae", ctx.layer, sae.eval(), int(rows.shape[1]), identity)
