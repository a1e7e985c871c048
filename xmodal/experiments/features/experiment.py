"""FeatureCards: what is an SAE feature about, in text and on the image?

Method, at one decoder layer, through the job's SAE:
1. Per-token SAE codes of the concept words and of every image soft token (activation cache),
   pooled per concept and per image as the other studies pool them.
2. The features: ``experiment.features``, or the ``n_features`` best by ``select``: cross-modal
   (Pearson r across concepts between a feature's text activation and its mean image activation,
   overlap's cross-modal features), most active on images, or most active on the words.
3. Per feature, with its null: the cross-modal r against concept re-pairings (and, for the
   selection, the best r of any feature against the best r under re-pairing); the Modality
   Dominance Score (seed 002) against random swaps of modality within each image-word pair.
4. Per feature, a card: the top images with the feature's activation at each image token drawn
   over the image (the token grid from the model's adapter), the top concept words with the
   token where it peaks, the activation histograms per modality, and the numbers of step 3.
5. An export of the same features in the JSON shape SAEDashboard writes for Neuronpedia, so a
   feature of a hub SAE (Gemma Scope) found here can be looked up there.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch

from xmodal.activations.codes import ConceptCodes, codes_from_readout
from xmodal.activations.readout import LayerReadout
from xmodal.errors import ConfigError
from xmodal.experiments.base import Experiment, RunContext
from xmodal.experiments.features.config import FeaturesConfig, FeatureSelection
from xmodal.metrics import modality as MD
from xmodal.metrics import overlap as M
from xmodal.metrics import statistics as S
from xmodal.reporting import figures
from xmodal.saes.loading import FeatureSpace

log = logging.getLogger(__name__)


class FeatureCards(Experiment):
    name: ClassVar[str] = "features"
    config: FeaturesConfig

    def run(self, ctx: RunContext) -> dict[str, float]:
        self.check_features(ctx.features)
        acts = ctx.readout()  # pooled codes, and every token's non-zero codes, from one pass
        codes = codes_from_readout(acts, ctx.positions)
        with ctx.timed("metrics"):
            chosen = self.choose_features(codes)
            stats, best = self.feature_statistics(codes, chosen, ctx.seed)
        with ctx.timed("token_activations"):
            ragged = acts.image_tokens.grids is not None  # dynamic resolution: each image its own grid
            image_tokens = acts.image_tokens.feature_maps_per_image(chosen) if ragged else acts.image_tokens.feature_maps(chosen)
            word_tokens = [acts.text_tokens_of(i)[:, chosen].numpy() for i in range(len(acts.concepts))]
        token_labels = self.word_token_labels(ctx, acts)
        ctx.table("features", stats)
        examples = self.top_examples(codes, chosen, word_tokens, token_labels)
        ctx.table("examples", examples)
        grid = None if ragged else ctx.model.image_token_grid(acts.tokens_per_image)
        with ctx.timed("figures"):
            images = ctx.dataset.images  # activation row i is dataset image i (extraction keeps the order)
            for n, feature in enumerate(chosen):
                top = examples[(examples["feature"] == feature) & (examples["modality"] == "image")]
                # by row: several images can share one source description
                pictures = [images[i].load() for i in top["row"]]
                maps = [acts.image_tokens.token_map(i, image_tokens[n][i]) if ragged else image_tokens[n][i].reshape(grid) for i in top["row"]]
                words = examples[(examples["feature"] == feature) & (examples["modality"] == "text")]
                ctx.figure(
                    f"feature_{feature}",
                    figures.feature_card(
                        feature,
                        ctx.layer,
                        pictures,
                        maps,
                        list(top["concept"]),
                        words,
                        codes.text[:, feature],
                        codes.image[:, feature],
                        stats.set_index("feature").loc[feature].to_dict(),
                    ),
                )
        ctx.export("neuronpedia", self.neuronpedia_batch(ctx, acts, chosen, image_tokens, word_tokens, token_labels, codes))
        log.info(
            "layer %d: cards for features %s; best cross-modal r %.3f (re-paired concepts: %.3f, p=%.3g)",
            ctx.layer,
            chosen,
            best["value"],
            best["null_mean"],
            best["p"],
        )
        return {
            "n_features": len(chosen),
            "best_crossmodal_r": best["value"],
            "best_crossmodal_r_null_mean": best["null_mean"],
            "best_crossmodal_r_null_q025": best["null_q025"],
            "best_crossmodal_r_null_q975": best["null_q975"],
            "best_crossmodal_r_p": best["p"],
        }

    # 2. which features ----------------------------------------------------------------------
    def check_features(self, space: FeatureSpace) -> None:
        if space.sae is None:
            raise ConfigError("experiment=features describes SAE features, and this job has sae=none; add an SAE, e.g. sae=organism")
        outside = [f for f in self.config.features if f >= space.d_sae]
        if outside:
            raise ConfigError(
                f"experiment.features holds {outside}, outside SAE {space.name!r}, which has {space.d_sae} features "
                f"(0..{space.d_sae - 1}); pick ids in that range"
            )

    def choose_features(self, codes: ConceptCodes) -> list[int]:
        if self.config.features:
            return [int(f) for f in self.config.features]
        if self.config.select == FeatureSelection.crossmodal:
            score = np.nan_to_num(M.feature_correlations(codes.text, codes.image_by_concept()), nan=-np.inf)
        elif self.config.select == FeatureSelection.image:
            score = codes.image.mean(axis=0)
        else:
            score = codes.text.mean(axis=0)
        return [int(f) for f in np.argsort(-score, kind="stable")[: self.config.n_features]]

    # 3. the numbers, each with its null ---------------------------------------------------------
    def feature_statistics(self, codes: ConceptCodes, chosen: list[int], seed: int) -> tuple[pd.DataFrame, dict[str, float]]:
        """Per chosen feature: cross-modal r (re-paired p), MDS (modality-swap 95%), activity; and the best r overall."""
        text, image = codes.text, codes.image_by_concept()
        rng = np.random.default_rng(seed)
        orders = [rng.permutation(len(text)) for _ in range(self.config.n_permutations)]
        r = M.feature_correlations(text, image)
        null_r = np.stack([M.feature_correlations(text, image[order]) for order in orders])  # (draws, features)
        owners = np.array([codes.concepts.index(c) for c in codes.image_concepts])
        pair_text = text[owners]  # each image paired with its concept's words
        mds, _ = MD.modality_dominance(codes.image, pair_text)
        null_mds = np.stack([MD.modality_dominance(*MD.swapped_modalities(codes.image, pair_text, rng))[0] for _ in range(200)])
        rows = []
        for f in chosen:
            draws = null_r[:, f][np.isfinite(null_r[:, f])]
            finite = np.isfinite(r[f]) and draws.size
            rows.append(
                {
                    "feature": f,
                    "crossmodal_r": r[f],
                    "crossmodal_r_null_q975": float(np.quantile(draws, 0.975)) if finite else np.nan,
                    "crossmodal_r_p": S.pvalue(r[f], draws),
                    "mds": mds[f],
                    "mds_null_q025": float(np.nanquantile(null_mds[:, f], 0.025)) if np.isfinite(mds[f]) else np.nan,
                    "mds_null_q975": float(np.nanquantile(null_mds[:, f], 0.975)) if np.isfinite(mds[f]) else np.nan,
                    "mean_text": float(text[:, f].mean()),
                    "mean_image": float(codes.image[:, f].mean()),
                    "active_text": float((text[:, f] > 0).mean()),
                    "active_image": float((codes.image[:, f] > 0).mean()),
                }
            )
        best_null = np.nanmax(np.where(np.isfinite(null_r), null_r, -np.inf), axis=1)
        best = float(np.nanmax(np.where(np.isfinite(r), r, -np.inf)))
        null = S.summarise_null(best, best_null)  # the largest r of each re-pairing: a max-statistic null
        summary = {"value": best, "null_mean": null.null_mean, "null_q025": null.null_q025, "null_q975": null.null_q975, "p": null.p_value}
        return pd.DataFrame(rows), summary

    # 4. the examples on each card ------------------------------------------------------------------
    def word_token_labels(self, ctx: RunContext, acts: LayerReadout) -> list[list[str]]:
        """Each concept's tokens as strings (the same tokenisation as the extraction)."""
        texts = {c.name: c.text for c in ctx.dataset.concepts}
        labels = []
        for i, concept in enumerate(acts.concepts):
            prompt = ctx.model.text_prompt(ctx.positions.text_prompt, texts[concept], ctx.positions.use_chat_template, ctx.positions.max_concept_tokens)
            tokens = [ctx.model.tokenizer.decode([prompt.input_ids[p]]) for p in prompt.concept_positions]
            n_rows = len(acts.text_tokens_of(i))
            labels.append(tokens if len(tokens) == n_rows else [f"<token {k}>" for k in range(n_rows)])
        return labels

    def top_examples(self, codes: ConceptCodes, chosen: list[int], word_tokens: list[np.ndarray], token_labels: list[list[str]]) -> pd.DataFrame:
        rows = []
        for n, f in enumerate(chosen):
            # only items where the feature is active: a card of zeros says nothing
            for rank, i in enumerate(active_first(codes.image[:, f], self.config.top_images)):
                rows.append(
                    {
                        "feature": f,
                        "modality": "image",
                        "rank": rank,
                        "row": int(i),
                        "item": codes.image_sources[i],
                        "concept": codes.image_concepts[i],
                        "activation": float(codes.image[i, f]),
                        "peak_token": "",
                    }
                )
            for rank, i in enumerate(active_first(codes.text[:, f], self.config.top_texts)):
                peak = int(np.argmax(word_tokens[i][:, n]))
                rows.append(
                    {
                        "feature": f,
                        "modality": "text",
                        "rank": rank,
                        "row": int(i),
                        "item": codes.concepts[i],
                        "concept": codes.concepts[i],
                        "activation": float(codes.text[i, f]),
                        "peak_token": token_labels[i][peak],
                    }
                )
        return pd.DataFrame(rows)

    # 5. the Neuronpedia / SAEDashboard export --------------------------------------------------------
    def neuronpedia_batch(
        self,
        ctx: RunContext,
        acts: LayerReadout,
        chosen: list[int],
        image_tokens: list[np.ndarray] | list[list[np.ndarray]],
        word_tokens: list[np.ndarray],
        token_labels: list[list[str]],
        codes: ConceptCodes,
    ) -> dict[str, Any]:
        """SAEDashboard's NeuronpediaDashboardBatch shape: the top examples as one bin; image tokens named by grid cell."""
        grids = acts.image_tokens.grids

        def cell_names(image: int) -> list[str]:
            if grids is None:
                rows, cols = ctx.model.image_token_grid(acts.tokens_per_image)
                return [f"<image r{r}c{c}>" for r in range(rows) for c in range(cols)]
            # ragged images: grid g of the image (its base view, tiles, thumbnail), row and column in it
            return [f"<image g{g} r{r}c{c}>" for g, (rows, cols) in enumerate(grids[image]) for r in range(rows) for c in range(cols)]

        logit_effects = self.logit_effects(ctx, chosen)
        features = []
        for n, f in enumerate(chosen):
            every = np.concatenate(
                [np.concatenate([np.ravel(m) for m in image_tokens[n]]) if len(image_tokens[n]) else np.zeros(0), *[w[:, n] for w in word_tokens]]
            )
            active = every[every > 0]
            heights, edges = np.histogram(active, bins=20) if active.size else (np.zeros(0), np.zeros(1))
            examples = [
                {"tokens": cell_names(i), "values": image_tokens[n][i].tolist(), "source": codes.image_sources[i]}
                for i in active_first(codes.image[:, f], self.config.top_images)
            ]
            examples += [
                {"tokens": token_labels[i], "values": word_tokens[i][:, n].tolist(), "source": codes.concepts[i]}
                for i in active_first(codes.text[:, f], self.config.top_texts)
            ]
            peak = [max(e["values"]) for e in examples] or [0.0]
            positive, negative = logit_effects[n]
            features.append(
                {
                    "feature_index": f,
                    "pos_str": [s for s, _ in positive],
                    "pos_values": [v for _, v in positive],
                    "neg_str": [s for s, _ in negative],
                    "neg_values": [v for _, v in negative],
                    "frac_nonzero": float(active.size / max(every.size, 1)),
                    "freq_hist_data_bar_values": ((edges[:-1] + edges[1:]) / 2).tolist(),
                    "freq_hist_data_bar_heights": heights.tolist(),
                    "n_prompts_total": len(acts.concepts) + len(acts.image_sources),
                    "n_tokens_in_prompt": 0,
                    "dataset": ctx.dataset.name,
                    "activations": [{"bin_min": float(min(peak)), "bin_max": float(max(peak)), "bin_contains": len(examples), **e} for e in examples],
                }
            )
        return {
            "model_id": self.config.neuronpedia_model_id or ctx.model.name,
            "layer": ctx.layer,
            "sae_set": self.config.neuronpedia_sae_set or ctx.features.name,
            "features": features,
        }

    @staticmethod
    def logit_effects(ctx: RunContext, chosen: list[int], k: int = 10) -> list[tuple[list, list]]:
        """Per feature, the tokens its decoder direction raises and lowers most through the unembedding."""
        unembed = ctx.model.model.get_output_embeddings()
        if unembed is None:
            return [([], []) for _ in chosen]
        with torch.inference_mode():
            directions = ctx.features.sae.W_dec[chosen].float().to(unembed.weight.device)
            effects = (directions @ unembed.weight.float().T).cpu()
        decode = ctx.model.tokenizer.decode
        out = []
        for row in effects:
            top, bottom = torch.topk(row, k), torch.topk(-row, k)
            out.append(
                (
                    [(decode([int(t)]), float(v)) for v, t in zip(top.values, top.indices)],
                    [(decode([int(t)]), float(-v)) for v, t in zip(bottom.values, bottom.indices)],
                )
            )
        return out


def active_first(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest values, active ones (> 0) only."""
    order = np.argsort(-values, kind="stable")[:k]
    return order[values[order] > 0]
