"""SteeringEval: does a feature found in text change what the model says about an image?

Method (seed 000, cross-modal steering), at one decoder layer:
1. Pick the feature: given (`feature`), or the one most specific to the concept's text
   (its text activation minus the mean over the other concepts' texts). With
   `feature_source=image` the choice uses the concept's images instead: a positive
   control showing what steering a feature the images really use does.
2. Describe images of other concepts while steering that feature at layer L (add its
   decoder direction times strength x scale, or clamp it to strength x scale; scale is
   the feature's largest pooled activation on the dataset), at image tokens, text
   tokens or both, for every strength in `strengths` (a dose-response curve).
3. Measure per image: whether the description names the concept (a word list), the
   change in log-probability of the concept word's first token at the first answer
   position, and the KL divergence from the unsteered distribution there.
4. Controls in the same run: strength 0; a random feature of matched scale; the same
   direction added at another layer. Effects come with bootstrap confidence intervals,
   and the feature-minus-random difference with a paired bootstrap interval.
"""

from __future__ import annotations

import logging
import re
from contextlib import nullcontext
from typing import ClassVar, Sequence

import numpy as np
import pandas as pd
import torch
from scipy import stats
from tqdm.auto import tqdm

from xmodal.activations.steering import Steering, steer
from xmodal.errors import ConfigError, DatasetError
from xmodal.experiments.base import Experiment, RunContext
from xmodal.models.generation import describe_images
from xmodal.reporting import figures

log = logging.getLogger(__name__)


def mentions(text: str, words: Sequence[str]) -> bool:
    """Whether `text` contains one of `words` as a whole word ("red." counts, "redrawing" does not)."""
    return any(re.search(rf"(?<!\w){re.escape(w.strip().lower())}(?!\w)", text.lower()) for w in words if w.strip())


def bootstrap_ci(values: np.ndarray, seed: int, n_resamples: int = 1000) -> tuple[float, float]:
    if len(values) < 2 or np.all(values == values[0]):
        return float(np.mean(values)), float(np.mean(values))
    result = stats.bootstrap((values,), np.mean, n_resamples=n_resamples, random_state=seed, method="percentile")
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


class SteeringEval(Experiment):
    name: ClassVar[str] = "steering"

    def __init__(
        self,
        name: str = "steering",
        concept: str = "snow",
        feature: int | None = None,
        feature_source: str = "text",
        mode: str = "add",
        where: str = "image",
        strengths: Sequence[float] = (0.0, 0.25, 0.5, 1.0, 2.0),
        n_images: int = 12,
        control_layer: int | None = None,
        concept_words: dict[str, list[str]] | None = None,
        prompt: str = "",
        max_new_tokens: int = 12,
        do_sample: bool = False,
        temperature: float = 1.0,
        n_bootstrap: int = 1000,
    ) -> None:
        if mode not in ("add", "clamp"):
            raise ConfigError(f"experiment.mode={mode!r}; use add or clamp")
        if feature_source not in ("text", "image"):
            raise ConfigError(f"experiment.feature_source={feature_source!r}; use text or image")
        if where not in ("image", "text", "both"):
            raise ConfigError(f"experiment.where={where!r}; use image, text or both")
        if 0.0 not in strengths:
            strengths = (0.0, *strengths)  # the unsteered reference is always measured
        self.concept = concept
        self.feature = feature
        self.feature_source = feature_source
        self.mode = mode
        self.where = where
        self.strengths = sorted(float(s) for s in strengths)
        self.n_images = n_images
        self.control_layer = control_layer
        self.concept_words = dict(concept_words or {})
        self.prompt = prompt
        self.generation = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature)
        self.n_bootstrap = n_bootstrap

    # ----------------------------------------------------------- choices --
    def target_concept(self, ctx: RunContext):
        for concept in ctx.dataset.concepts:
            if self.concept in (concept.name, concept.text):
                return concept
        names = ", ".join(c.name for c in ctx.dataset.concepts[:12])
        raise DatasetError(f"experiment.concept={self.concept!r} is not in dataset {ctx.dataset.name!r} (it has {names}, ...)")

    def choose_features(self, ctx: RunContext, concept_index: int) -> tuple[int, int, float, float]:
        """The steered feature, a random control of matched scale, and both scales."""
        codes = ctx.codes()
        d_sae = codes.text.shape[1]
        scale = np.maximum(codes.text.max(axis=0), codes.image.max(axis=0))
        if self.feature is None:
            # text: the method's choice; image: a positive control (a feature the images themselves use)
            by_concept = codes.text if self.feature_source == "text" else codes.image_by_concept()
            others = np.delete(by_concept, concept_index, axis=0)
            specificity = by_concept[concept_index] - others.mean(axis=0)
            feature = int(np.argmax(specificity))
            log.info("feature %d is the most specific to %r's %s (specificity %.3f)", feature, self.concept, self.feature_source, specificity[feature])
        else:
            feature = int(self.feature)
            if not 0 <= feature < d_sae:
                raise ConfigError(f"experiment.feature={feature} is outside the SAE, which has features 0..{d_sae - 1}")
        if scale[feature] <= 0:
            raise ConfigError(
                f"feature {feature} never fires on dataset {ctx.dataset.name!r}, so it has no activation scale; pick another feature"
            )
        rng = np.random.default_rng(ctx.seed)
        matched = np.flatnonzero((scale >= 0.5 * scale[feature]) & (scale <= 2.0 * scale[feature]))
        matched = matched[matched != feature]
        pool = matched if len(matched) else np.flatnonzero((scale > 0) & (np.arange(d_sae) != feature))
        random_feature = int(rng.choice(pool))
        return feature, random_feature, float(scale[feature]), float(scale[random_feature])

    def steering(self, ctx: RunContext, feature: int, value: float, mode: str) -> Steering:
        sae = ctx.features.sae
        direction = sae.W_dec[feature].detach().float()

        def feature_activation(hidden: torch.Tensor) -> torch.Tensor:
            return sae.encode(hidden.to(sae.W_enc.dtype))[..., feature].float()

        return Steering(direction, value, mode, self.where, feature_activation if mode == "clamp" else None)

    # --------------------------------------------------------- measuring --
    @torch.inference_mode()
    def first_answer_logprobs(self, ctx: RunContext, images: list, steering: Steering | None, layer: int) -> torch.Tensor:
        """log p(next token) at the first answer position, (n_images, vocab)."""
        adapter = ctx.model
        adapter.tokenizer.padding_side = "left"
        rows = []
        for start in range(0, len(images), ctx.positions.batch_size):
            inputs = adapter.image_inputs(images[start : start + ctx.positions.batch_size], self.prompt, True).to(adapter.device)
            with self._maybe_steer(ctx, inputs, steering, layer):
                logits = adapter.model(**inputs, use_cache=False).logits[:, -1].float()
            rows.append(torch.log_softmax(logits, dim=-1).cpu())
        return torch.cat(rows)

    def _maybe_steer(self, ctx: RunContext, inputs, steering: Steering | None, layer: int):
        if steering is None:
            return nullcontext()
        image_mask = ctx.model.image_token_mask(inputs["input_ids"])
        return steer(ctx.model.decoder_layers()[layer], steering, image_mask)

    def describe(self, ctx: RunContext, images: list, steering: Steering | None, layer: int) -> list[str]:
        return describe_images(
            ctx.model, images, self.prompt, True, batch_size=ctx.positions.batch_size, seed=ctx.seed,
            around=lambda inputs: self._maybe_steer(ctx, inputs, steering, layer), **self.generation,
        )  # fmt: skip

    # ---------------------------------------------------------------- run --
    def run(self, ctx: RunContext) -> dict[str, float]:
        if ctx.features.sae is None:
            raise ConfigError("experiment=steering steers an SAE feature; choose an SAE (e.g. sae=organism), not sae=none")
        concept = self.target_concept(ctx)
        concept_index = [c.name for c in ctx.dataset.concepts].index(concept.name)
        words = self.concept_words.get(concept.name, [concept.text])
        # no leading space: the first answer token starts the model's turn ("red", not " red")
        first_tokens = [ctx.model.tokenizer(w.strip(), add_special_tokens=False)["input_ids"] if w.strip() else [] for w in words]
        if not words or not all(first_tokens):
            raise DatasetError(f"concept words {words} of {concept.name!r} give no tokens; give non-empty words (experiment.concept_words)")
        word_token = first_tokens[0][0]
        feature, random_feature, scale, random_scale = self.choose_features(ctx, concept_index)
        control_layer = self.control_layer if self.control_layer is not None else max(0, ctx.layer - 4)
        if control_layer == ctx.layer:
            control_layer = min(ctx.model.num_layers - 1, ctx.layer + 4)
        ctx.model.check_layer(control_layer)

        rng = np.random.default_rng(ctx.seed)
        candidates = [img for img in ctx.dataset.images if img.concept != concept.name]
        chosen = rng.choice(len(candidates), size=min(self.n_images, len(candidates)), replace=False)
        images = [candidates[i].load() for i in sorted(chosen)]
        sources = [candidates[i].source for i in sorted(chosen)]

        conditions = [
            ("feature", ctx.layer, feature, scale, self.mode),
            ("random_feature", ctx.layer, random_feature, random_scale, self.mode),
            ("feature_other_layer", control_layer, feature, scale, "add"),  # the encoder belongs to layer L: add there
        ]
        with ctx.timed("steering"):
            base_text = self.describe(ctx, images, None, ctx.layer)
            base_logprobs = self.first_answer_logprobs(ctx, images, None, ctx.layer)
            rows = []
            runs = [(c, s) for c in conditions for s in self.strengths]
            for (condition, layer, f, f_scale, mode), strength in tqdm(runs, desc=f"steering layer {ctx.layer}", disable=not ctx.progress, leave=False):
                if strength == 0:
                    texts, logprobs = base_text, base_logprobs
                else:
                    steering = self.steering(ctx, f, strength * f_scale, mode)
                    texts = self.describe(ctx, images, steering, layer)
                    logprobs = self.first_answer_logprobs(ctx, images, steering, layer)
                kl = (base_logprobs.exp() * (base_logprobs - logprobs)).sum(dim=-1)
                for i, (text, source) in enumerate(zip(texts, sources)):
                    rows.append({
                        "condition": condition, "layer": layer, "feature": f, "strength": strength, "mode": mode,
                        "image": source, "text": text, "mentions": mentions(text, words),
                        "delta_logprob": float(logprobs[i, word_token] - base_logprobs[i, word_token]),
                        "kl": float(kl[i]),
                    })  # fmt: skip
        samples = pd.DataFrame(rows)
        summary = self.summarise(samples, ctx.seed)
        ctx.table("descriptions", samples)
        ctx.table("dose_response", summary)
        with ctx.timed("figures"):
            ctx.figure("dose_response", figures.dose_response(summary, concept.name, ctx.layer))

        top = summary[summary["strength"] == max(self.strengths)].set_index("condition")
        metrics = {
            "feature": feature, "random_feature": random_feature, "feature_scale": scale, "control_layer": control_layer,
            "baseline_mention_rate": float(samples[samples["strength"] == 0]["mentions"].mean()),
        }  # fmt: skip
        for condition in top.index:
            for key in ("mention_rate", "mention_rate_ci_low", "mention_rate_ci_high", "delta_logprob", "kl"):
                metrics[f"{condition}_{key}_max_strength"] = float(top.loc[condition, key])
        metrics["feature_minus_random_mention_rate_max_strength"] = float(top.loc["feature", "minus_random"])
        metrics["feature_minus_random_ci_low_max_strength"] = float(top.loc["feature", "minus_random_ci_low"])
        metrics["feature_minus_random_ci_high_max_strength"] = float(top.loc["feature", "minus_random_ci_high"])
        log.info(
            "layer %d, feature %d (%s): mention rate %.2f at strength %g vs random feature %.2f and baseline %.2f",
            ctx.layer, feature, concept.name, metrics["feature_mention_rate_max_strength"], max(self.strengths),
            metrics["random_feature_mention_rate_max_strength"], metrics["baseline_mention_rate"],
        )
        return metrics

    def summarise(self, samples: pd.DataFrame, seed: int) -> pd.DataFrame:
        rows = []
        for (condition, strength), group in samples.groupby(["condition", "strength"], sort=False):
            said = group["mentions"].to_numpy(dtype=float)
            low, high = bootstrap_ci(said, seed, self.n_bootstrap)
            dl_low, dl_high = bootstrap_ci(group["delta_logprob"].to_numpy(), seed, self.n_bootstrap)
            row = {
                "condition": condition, "strength": strength, "layer": int(group["layer"].iloc[0]), "n_images": len(group),
                "mention_rate": said.mean(), "mention_rate_ci_low": low, "mention_rate_ci_high": high,
                "delta_logprob": group["delta_logprob"].mean(), "delta_logprob_ci_low": dl_low, "delta_logprob_ci_high": dl_high,
                "kl": group["kl"].mean(),
            }  # fmt: skip
            random = samples[(samples["condition"] == "random_feature") & (samples["strength"] == strength)]
            # paired over images: the same image described under both features
            diff_low, diff_high = bootstrap_ci(said - random["mentions"].to_numpy(dtype=float), seed, self.n_bootstrap)
            row |= {"minus_random": said.mean() - random["mentions"].mean(), "minus_random_ci_low": diff_low, "minus_random_ci_high": diff_high}
            rows.append(row)
        return pd.DataFrame(rows)
