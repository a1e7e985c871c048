"""LogitLens: at which layer do a concept's image tokens start to "say" the concept?

Method, at one decoder layer:
1. resid_post at every image soft token of every image, and at the concept words' tokens (the
   text prompt in ``positions.text_prompt``), from the activation cache.
2. Logit lens (nostalgebraist 2020): each residual read through the model's final norm and
   unembedding (``ModelAdapter.logit_lens``). An image's next-token distribution is the mean of
   its tokens' softmaxes; a concept word's is read at its last token. Two scores: is a form of
   the concept word (" red", "red", " Red", "Red": their first tokens) among the top
   ``top_k`` of the whole vocabulary; and, among the concept words only, is the image's own
   concept in the top ``concept_top_k``.
3. Nearest words (LatentLens, Neo et al. 2024): each image's mean image-token residual against
   every concept word's residual at the same layer (mean over the word's tokens), by cosine after
   removing each side's mean (``centre``); is the image's own concept among its
   ``concept_top_k`` nearest words.
4. Null: the same rates with the images' (or words') concept labels shuffled, with a one-sided
   permutation p-value; among-concept rates also have their chance level, k / concepts.
   ``null=within_category`` shuffles labels only inside each concept's category, so that an image
   which only says its category (a colour word for a colour) stays at its null.
5. Tables per image and per word (the top tokens decoded), and figures: the rates against
   their nulls, and example images with what their tokens say.
"""

from __future__ import annotations

import logging
from typing import ClassVar

import numpy as np
import pandas as pd
import torch

from xmodal.activations.extract import LayerActivations
from xmodal.errors import ConfigError
from xmodal.experiments.base import Experiment, RunContext
from xmodal.experiments.lens.config import LensConfig
from xmodal.metrics import statistics as S
from xmodal.models.base import ModelAdapter
from xmodal.reporting import figures

log = logging.getLogger(__name__)

TOKEN_CHUNK = 32  # image tokens read through the unembedding at once (a 256-token image x 262k vocabulary is 268 MB)


class LogitLens(Experiment):
    name: ClassVar[str] = "lens"
    config: LensConfig

    def run(self, ctx: RunContext) -> dict[str, float]:
        if self.config.concept_top_k >= len(ctx.dataset.concepts):
            raise ConfigError(
                f"experiment.concept_top_k={self.config.concept_top_k} must be below the number of concepts "
                f"({len(ctx.dataset.concepts)}), or every concept is a hit; lower it"
            )
        # a null the dataset cannot give stops before any extraction
        group_of = dict(zip([c.name for c in ctx.dataset.concepts], S.null_groups([c.category for c in ctx.dataset.concepts], self.config.null)))
        acts = ctx.activations()[ctx.layer]
        word_ids = concept_word_ids(ctx.model, [self.concept_text(ctx, c) for c in acts.concepts])
        labels = np.array([acts.concepts.index(c) for c in acts.image_concepts])
        with ctx.timed("logit_lens"):
            image_logprobs = self.image_logprobs(ctx.model, acts)
            word_logprobs = self.word_logprobs(ctx.model, acts)
        with ctx.timed("nearest_words"):
            nearest = self.nearest_word_similarity(acts)
        with ctx.timed("metrics"):
            hits = {
                "image_logit_lens_topk": vocabulary_hits(image_logprobs, word_ids, self.config.top_k),
                "image_logit_lens_concept": among_concepts_hits(concept_scores(image_logprobs, word_ids), self.config.concept_top_k),
                "image_nearest_word": among_concepts_hits(nearest, self.config.concept_top_k),
                "text_logit_lens_topk": vocabulary_hits(word_logprobs, word_ids, self.config.top_k),
                "text_logit_lens_concept": among_concepts_hits(concept_scores(word_logprobs, word_ids), self.config.concept_top_k),
            }
            rows = {name: labels if name.startswith("image") else np.arange(len(acts.concepts)) for name in hits}
            summary = self.rates_with_null(hits, rows, np.array([group_of[c] for c in acts.concepts]), ctx.seed)
        ctx.table("summary", summary)
        ctx.table("images", self.image_table(ctx.model, acts, image_logprobs, word_ids, nearest, hits))
        ctx.table("words", self.word_table(ctx.model, acts, word_logprobs, word_ids, hits))
        with ctx.timed("figures"):
            ctx.figure("hit_rates", figures.lens_rates(summary, ctx.layer))
            ctx.figure("examples", self.examples_figure(ctx, acts, image_logprobs, nearest))

        metrics: dict[str, float] = {"n_images": len(labels), "n_concepts": len(acts.concepts)}
        for row in summary.itertuples():
            metrics.update(
                {
                    row.measure: row.rate,
                    f"{row.measure}_null_mean": row.null_mean,
                    f"{row.measure}_null_q025": row.null_q025,
                    f"{row.measure}_null_q975": row.null_q975,
                    f"{row.measure}_p": row.p,
                }
            )
        log.info(
            "layer %d: image tokens say their concept (top %d of the vocabulary) %.2f (null %.2f, p=%.3g); among concept words %.2f "
            "(chance %.2f); nearest word %.2f; concept words' own lens %.2f",
            ctx.layer,
            self.config.top_k,
            metrics["image_logit_lens_topk"],
            metrics["image_logit_lens_topk_null_mean"],
            metrics["image_logit_lens_topk_p"],
            metrics["image_logit_lens_concept"],
            self.config.concept_top_k / len(acts.concepts),
            metrics["image_nearest_word"],
            metrics["text_logit_lens_topk"],
        )
        return metrics

    @staticmethod
    def concept_text(ctx: RunContext, name: str) -> str:
        return next(c.text for c in ctx.dataset.concepts if c.name == name)

    # 2. the logit lens ---------------------------------------------------------------------
    @staticmethod
    def image_logprobs(model: ModelAdapter, acts: LayerActivations) -> torch.Tensor:
        """(n_images, vocab): log of the mean over an image's tokens of their next-token softmax."""
        rows = []
        for tokens in acts.image_tokens:
            total = None
            for start in range(0, len(tokens), TOKEN_CHUNK):
                probs = torch.softmax(model.logit_lens(tokens[start : start + TOKEN_CHUNK]), dim=-1).sum(dim=0)
                total = probs if total is None else total + probs
            rows.append(torch.log(total / len(tokens)))
        return torch.stack(rows)

    @staticmethod
    def word_logprobs(model: ModelAdapter, acts: LayerActivations) -> torch.Tensor:
        """(n_concepts, vocab): the next-token log-softmax at each concept word's last token."""
        last = torch.stack([acts.text_tokens_of(i)[-1] for i in range(len(acts.concepts))])
        return torch.log_softmax(model.logit_lens(last), dim=-1)

    # 3. nearest concept words ------------------------------------------------------------------
    def nearest_word_similarity(self, acts: LayerActivations) -> np.ndarray:
        """(n_images, n_concepts) cosine of each image's mean token residual with each word's residual."""
        images = acts.image_token_mean().numpy()
        words = torch.stack([acts.text_tokens_of(i).float().mean(dim=0) for i in range(len(acts.concepts))]).numpy()
        if self.config.centre:
            images, words = images - images.mean(axis=0), words - words.mean(axis=0)
        images = images / np.maximum(np.linalg.norm(images, axis=1, keepdims=True), 1e-12)
        words = words / np.maximum(np.linalg.norm(words, axis=1, keepdims=True), 1e-12)
        return images @ words.T

    # 4. rates against shuffled labels -------------------------------------------------------------
    def rates_with_null(self, hits: dict[str, np.ndarray], labels: dict[str, np.ndarray], concept_groups: np.ndarray, seed: int) -> pd.DataFrame:
        """Each rate against its rows' labels re-paired (inside the group of their concept, per `concept_groups`)."""
        rows = []
        for name, hit in hits.items():
            own = labels[name]
            rate, p_value, null = S.permutation_test(
                lambda order: float(hit[np.arange(len(own)), own[order]].mean()),
                len(own),
                self.config.n_permutations,
                seed,
                concept_groups[own],
            )
            k = self.config.top_k if name.endswith("topk") else self.config.concept_top_k
            rows.append(
                {
                    "measure": name,
                    "k": k,
                    "rate": rate,
                    "null_mean": float(null.mean()),
                    "null_q025": float(np.quantile(null, 0.025)),
                    "null_q975": float(np.quantile(null, 0.975)),
                    "p": p_value,
                    "chance": float("nan") if name.endswith("topk") else k / hit.shape[1],
                    "n": len(own),
                }
            )
        return pd.DataFrame(rows)

    # 5. tables and figures --------------------------------------------------------------------------
    def image_table(
        self, model: ModelAdapter, acts: LayerActivations, logprobs: torch.Tensor, word_ids: list[list[int]], nearest: np.ndarray, hits: dict[str, np.ndarray]
    ) -> pd.DataFrame:
        labels = [acts.concepts.index(c) for c in acts.image_concepts]
        scores = concept_scores(logprobs, word_ids)
        return pd.DataFrame(
            {
                "image": acts.image_sources,
                "concept": acts.image_concepts,
                "lens_top_tokens": top_tokens(model, logprobs, self.config.top_k),
                "lens_says_concept": [bool(hits["image_logit_lens_topk"][i, c]) for i, c in enumerate(labels)],
                "lens_top_concept": [acts.concepts[j] for j in scores.argmax(axis=1)],
                "nearest_word": [acts.concepts[j] for j in nearest.argmax(axis=1)],
            }
        )

    def word_table(
        self, model: ModelAdapter, acts: LayerActivations, logprobs: torch.Tensor, word_ids: list[list[int]], hits: dict[str, np.ndarray]
    ) -> pd.DataFrame:
        scores = concept_scores(logprobs, word_ids)
        return pd.DataFrame(
            {
                "concept": acts.concepts,
                "lens_top_tokens": top_tokens(model, logprobs, self.config.top_k),
                "lens_says_concept": np.diag(hits["text_logit_lens_topk"]).astype(bool),
                "lens_top_concept": [acts.concepts[j] for j in scores.argmax(axis=1)],
            }
        )

    def examples_figure(self, ctx: RunContext, acts: LayerActivations, logprobs: torch.Tensor, nearest: np.ndarray):
        """The first image of each concept, up to n_example_images: its top 3 lens tokens and its nearest word."""
        first_of_concept = list(dict.fromkeys(acts.image_concepts))[: self.config.n_example_images]
        chosen = [acts.image_concepts.index(c) for c in first_of_concept]
        pictures = [ctx.dataset.images[i].load() for i in chosen]  # activation row i is dataset image i
        tops = top_tokens(ctx.model, logprobs[chosen], 3)
        titles = [f"{acts.image_concepts[i]}\nlens: {tops[n]}\nnearest word: {acts.concepts[nearest[i].argmax()]}" for n, i in enumerate(chosen)]
        return figures.image_grid([pictures], [f"layer {ctx.layer}"], titles, "What the image tokens say")


def concept_word_ids(model: ModelAdapter, texts: list[str]) -> list[list[int]]:
    """Per concept, the first token of each form of its word: bare and after a space, as written and capitalised."""
    ids = []
    for text in texts:
        forms = {text, f" {text}", text[:1].upper() + text[1:], f" {text[:1].upper()}{text[1:]}"}
        first = {model.tokenizer(form, add_special_tokens=False)["input_ids"][0] for form in forms if form.strip()}
        ids.append(sorted(first))
    return ids


def vocabulary_hits(logprobs: torch.Tensor, word_ids: list[list[int]], k: int) -> np.ndarray:
    """(rows, n_concepts) bool: does a form of concept c's word rank among row i's top k tokens?"""
    top = [set(row) for row in torch.topk(logprobs, k, dim=-1).indices.tolist()]
    return np.array([[bool(row & set(ids)) for ids in word_ids] for row in top])


def concept_scores(logprobs: torch.Tensor, word_ids: list[list[int]]) -> np.ndarray:
    """(rows, n_concepts): each concept's best log-probability over its word forms."""
    return np.stack([logprobs[:, ids].max(dim=-1).values.numpy() for ids in word_ids], axis=1)


def among_concepts_hits(scores: np.ndarray, k: int) -> np.ndarray:
    """(rows, n_concepts) bool: is concept c among row i's k best-scoring concepts?"""
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    hits = np.zeros_like(scores, dtype=bool)
    np.put_along_axis(hits, order, True, axis=1)
    return hits


def top_tokens(model: ModelAdapter, logprobs: torch.Tensor, k: int) -> list[str]:
    return [" | ".join(repr(model.tokenizer.decode([t]))[1:-1] for t in row) for row in torch.topk(logprobs, k, dim=-1).indices.tolist()]
