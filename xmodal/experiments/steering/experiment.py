"""SteeringEval: does a feature found in text change what the model says about an image?

Method (seed 000, cross-modal steering), at one decoder layer:
1. Pick the feature: given (`feature`), or the one most specific to the concept's text
   (its text activation minus the mean over the other concepts' texts). With
   `feature_source=image` the choice uses the concept's images instead: a positive
   control showing what steering a feature the images really use does.
2. Describe images of other concepts (those named in `images`, by default sea and grass
   scenes for "snow", else any other concept's) while steering that feature at layer L
   (clamp it to strength x scale, the default, or add its decoder direction times
   strength x scale; scale is
   the feature's largest pooled activation on the dataset), at image tokens, text
   tokens or both, for every strength in `strengths` (a dose-response curve).
3. Measure per image: whether the description names the concept (a word list), the
   change in log-probability of the concept word's first token at the first answer
   position, and the KL divergence from the unsteered distribution there.
4. Controls in the same run: strength 0; a random feature of matched scale; the same
   feature steered in the same mode (clamp or add) at another layer. Effects come with bootstrap confidence intervals,
   and the feature-minus-random difference with a paired bootstrap interval and a paired
   sign-flip permutation p-value (`steering_effect_p`).

Two more forms from seed 000's plan:
- `mode=ablate`: the feature clamped to 0 (the safety-transfer test: ablate a text feature,
  then see whether the model still names the concept in its own images). One steered level,
  written as strength 1; the effect sought is a drop, so the test is one-sided the other way.
- `inputs=texts`: text-only prompts (`text_prompts`, no image) instead of images; with
  `feature_source=image` this is the reverse direction, an image-derived feature steering text.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import replace
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from xmodal.activations.batch_size import Workload, resolve_batch_size
from xmodal.activations.steering import Steering, steer
from xmodal.data.concepts import Concept
from xmodal.errors import ConfigError, DatasetError
from xmodal.experiments.base import Experiment, RunContext
from xmodal.experiments.steering.config import FeatureSource, SteeringConfig, SteeringInputs, SteeringMode
from xmodal.metrics.mentions import mentions
from xmodal.metrics.statistics import bootstrap_ci, null_draws, pvalue
from xmodal.models.generation import describe_images
from xmodal.reporting import figures

log = logging.getLogger(__name__)


class SteeringEval(Experiment):
    name: ClassVar[str] = "steering"
    config: SteeringConfig

    def __init__(self, config: SteeringConfig) -> None:
        super().__init__(config)
        self.strengths = config.strengths_with_zero()
        self.generation = dict(max_new_tokens=config.max_new_tokens, do_sample=config.do_sample, temperature=config.temperature)

    # ----------------------------------------------------------- choices --
    def target_concept(self, ctx: RunContext) -> Concept:
        for concept in ctx.dataset.concepts:
            if self.config.concept in (concept.name, concept.text):
                return concept
        names = ", ".join(c.name for c in ctx.dataset.concepts[:12])
        raise DatasetError(f"experiment.concept={self.config.concept!r} is not in dataset {ctx.dataset.name!r} (it has {names}, ...)")

    def concept_words(self, ctx: RunContext, concept: Concept) -> tuple[list[str], int]:
        """The words that count as naming the concept, and the first token of the first word."""
        words = self.config.concept_words.get(concept.name, [concept.text])
        # no leading space: the first answer token starts the model's turn ("red", not " red")
        first_tokens = [ctx.model.tokenizer(w.strip(), add_special_tokens=False)["input_ids"] if w.strip() else [] for w in words]
        if not words or not all(first_tokens):
            raise DatasetError(f"concept words {words} of {concept.name!r} give no tokens; give non-empty words (experiment.concept_words)")
        return list(words), first_tokens[0][0]

    def control_layer(self, ctx: RunContext) -> int:
        """Where the same direction is added as a control: layer - 4, or layer + 4 near the bottom."""
        layer = self.config.control_layer if self.config.control_layer is not None else max(0, ctx.layer - 4)
        if layer == ctx.layer:
            layer = min(ctx.model.num_layers - 1, ctx.layer + 4)
        ctx.model.check_layer(layer)
        return layer

    def images_to_describe(self, ctx: RunContext, concept: Concept) -> tuple[list, list[str]]:
        """Up to `n_images` images (seeded choice) of the concepts in `images`, or of any other concept, and their sources.

        Under inputs=texts, the text prompts (each its own source); under mode=ablate with no `images`, the concept's own images.
        """
        if self.config.inputs == SteeringInputs.texts:
            return list(self.config.text_prompts), list(self.config.text_prompts)
        rng = np.random.default_rng(ctx.seed)
        if self.config.mode == SteeringMode.ablate and not self.config.images:
            candidates = [img for img in ctx.dataset.images if img.concept == concept.name]
            if not candidates:
                raise DatasetError(
                    f"experiment.mode=ablate describes images of {concept.name!r}, and dataset {ctx.dataset.name!r} has none; name others in experiment.images"
                )
        elif self.config.images:
            names = {c.name for c in ctx.dataset.concepts}
            unknown = [name for name in self.config.images if name not in names]
            if unknown:
                raise ConfigError(
                    f"experiment.images names {unknown}, not concepts of dataset {ctx.dataset.name!r} "
                    f"(it has {sorted(names)[:12]}{' ...' if len(names) > 12 else ''}); use its concepts or experiment.images=[]"
                )
            candidates = [img for img in ctx.dataset.images if img.concept in self.config.images]
        else:
            candidates = [img for img in ctx.dataset.images if img.concept != concept.name]
        chosen = sorted(rng.choice(len(candidates), size=min(self.config.n_images, len(candidates)), replace=False))
        return [candidates[i].load() for i in chosen], [candidates[i].source for i in chosen]

    def choose_features(self, ctx: RunContext, concept_index: int) -> tuple[int, int, float, float]:
        """The steered feature, a random control of matched scale, and both scales."""
        codes = ctx.codes()
        d_sae = codes.text.shape[1]
        scale = np.maximum(codes.text.max(axis=0), codes.image.max(axis=0))
        if self.config.feature is None:
            # text: the method's choice; image: a positive control (a feature the images themselves use)
            by_concept = codes.text if self.config.feature_source == FeatureSource.text else codes.image_by_concept()
            others = np.delete(by_concept, concept_index, axis=0)
            specificity = by_concept[concept_index] - others.mean(axis=0)
            feature = int(np.argmax(specificity))
            log.info(
                "feature %d is the most specific to %r's %s (specificity %.3f)", feature, self.config.concept, self.config.feature_source, specificity[feature]
            )
        else:
            feature = int(self.config.feature)
            if not 0 <= feature < d_sae:
                raise ConfigError(f"experiment.feature={feature} is outside the SAE, which has features 0..{d_sae - 1}")
        if scale[feature] <= 0:
            raise ConfigError(f"feature {feature} never fires on dataset {ctx.dataset.name!r}, so it has no activation scale; pick another feature")
        rng = np.random.default_rng(ctx.seed)
        matched = np.flatnonzero((scale >= 0.5 * scale[feature]) & (scale <= 2.0 * scale[feature]))
        matched = matched[matched != feature]
        pool = matched if len(matched) else np.flatnonzero((scale > 0) & (np.arange(d_sae) != feature))
        random_feature = int(rng.choice(pool))
        return feature, random_feature, float(scale[feature]), float(scale[random_feature])

    def steering(self, ctx: RunContext, feature: int, value: float, mode: str) -> Steering:
        """The hook's settings; ablate is a clamp to 0 whatever `value` is."""
        if mode == SteeringMode.ablate:
            value, mode = 0.0, "clamp"
        sae = ctx.features.sae
        if mode == "clamp" and ctx.features.transcoder:
            raise ConfigError(
                f"clamp steering reads the feature's activation where it writes, but transcoder {ctx.features.name!r} reads the MLP's input; "
                "use experiment.mode=add with a transcoder"
            )
        direction = sae.W_dec[feature].detach().float()

        def feature_activation(hidden: torch.Tensor) -> torch.Tensor:
            return sae.encode(hidden.to(sae.W_enc.dtype))[..., feature].float()

        return Steering(direction, value, mode, str(self.config.where), feature_activation if mode == "clamp" else None)

    # --------------------------------------------------------- measuring --
    def model_inputs(self, ctx: RunContext, items: list) -> Any:
        """A batch's inputs: images with the prompt, or (inputs=texts) text-only prompts in the chat template, left-padded."""
        adapter = ctx.model
        adapter.tokenizer.padding_side = "left"
        if self.config.inputs == SteeringInputs.images:
            return adapter.image_inputs(items, self.config.prompt, True).to(adapter.device)
        rendered = [adapter.render_prompt(text, False, True) for text in items]
        bos = getattr(adapter.tokenizer, "bos_token", None)
        has_bos = bool(bos) and rendered[0].startswith(bos)
        return adapter.tokenizer(rendered, padding=True, return_tensors="pt", add_special_tokens=not has_bos).to(adapter.device)

    @torch.inference_mode()
    def first_answer_logprobs(self, ctx: RunContext, images: list, steering: Steering | None, layer: int) -> torch.Tensor:
        """log p(next token) at the first answer position, (n_images, vocab)."""
        adapter = ctx.model
        rows, batch = [], self.generation_batch_size(ctx)
        for start in range(0, len(images), batch):
            inputs = self.model_inputs(ctx, images[start : start + batch])
            with self._maybe_steer(ctx, inputs, steering, layer):
                logits = adapter.model(**inputs, use_cache=False).logits[:, -1].float()
            rows.append(torch.log_softmax(logits, dim=-1).cpu())
        return torch.cat(rows)

    def generation_batch_size(self, ctx: RunContext) -> int:
        """positions.batch_size, with `auto` probed on this study's workload: its prompt, a full forward pass and generation."""
        positions = replace(ctx.positions, image_prompt=self.config.prompt, use_chat_template=True)
        return resolve_batch_size(ctx.model, positions.batch_size, [ctx.layer], ctx.dataset, positions, Workload.GENERATE, self.config.max_new_tokens)

    def _maybe_steer(self, ctx: RunContext, inputs, steering: Steering | None, layer: int):
        if steering is None:
            return nullcontext()
        image_mask = ctx.model.image_token_mask(inputs["input_ids"])
        return steer(ctx.model.hook_point(layer, ctx.features.writes), steering, image_mask)  # sae.site: resid_post, mlp_out, attn_out

    def describe(self, ctx: RunContext, images: list, steering: Steering | None, layer: int) -> list[str]:
        if self.config.inputs == SteeringInputs.texts:
            return self.continue_texts(ctx, images, steering, layer)
        return describe_images(
            ctx.model,
            images,
            self.config.prompt,
            True,
            batch_size=self.generation_batch_size(ctx),
            seed=ctx.seed,
            around=lambda inputs: self._maybe_steer(ctx, inputs, steering, layer),
            **self.generation,
        )

    @torch.inference_mode()
    def continue_texts(self, ctx: RunContext, prompts: list[str], steering: Steering | None, layer: int) -> list[str]:
        """The model's answer to each text-only prompt, greedy (or seeded sampling), steered at `layer`."""
        c, batch, texts = self.config, self.generation_batch_size(ctx), []
        sampling = dict(do_sample=True, temperature=c.temperature, top_k=0, top_p=1.0) if c.do_sample else dict(do_sample=False)
        for start in range(0, len(prompts), batch):
            inputs = self.model_inputs(ctx, prompts[start : start + batch])
            if c.do_sample:
                torch.manual_seed(ctx.seed + start)
            with self._maybe_steer(ctx, inputs, steering, layer):
                out = ctx.model.model.generate(**inputs, max_new_tokens=c.max_new_tokens, **sampling)
            texts += [t.strip() for t in ctx.model.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)]
        return texts

    # ---------------------------------------------------------------- run --
    def run(self, ctx: RunContext) -> dict[str, float]:
        if ctx.features.sae is None:
            raise ConfigError("experiment=steering steers an SAE feature; choose an SAE (e.g. sae=organism), not sae=none")
        concept = self.target_concept(ctx)
        words, word_token = self.concept_words(ctx, concept)
        concept_index = [c.name for c in ctx.dataset.concepts].index(concept.name)
        feature, random_feature, scale, random_scale = self.choose_features(ctx, concept_index)
        control_layer = self.control_layer(ctx)
        images, sources = self.images_to_describe(ctx, concept)
        conditions = self.conditions(ctx.layer, control_layer, feature, random_feature, scale, random_scale)
        with ctx.timed("steering"):
            samples = self.steer_and_describe(ctx, images, sources, conditions, words, word_token)
        summary = self.summarise(samples, ctx.seed)
        ctx.table("descriptions", samples)
        ctx.table("dose_response", summary)
        with ctx.timed("figures"):
            ctx.figure("dose_response", figures.dose_response(summary, concept.name, ctx.layer))
            ctx.patch_heatmaps("feature_patches", [feature, random_feature], [f"steered: feature {feature}", f"random: feature {random_feature}"])

        top = summary[summary["strength"] == max(self.strengths)].set_index("condition")
        metrics = {
            "feature": feature,
            "random_feature": random_feature,
            "feature_scale": scale,
            "control_layer": control_layer,
            "baseline_mention_rate": float(samples[samples["strength"] == 0]["mentions"].mean()),
        }
        for condition in top.index:
            for key in ("mention_rate", "mention_rate_ci_low", "mention_rate_ci_high", "delta_logprob", "kl"):
                metrics[f"{condition}_{key}_max_strength"] = float(top.loc[condition, key])
        metrics["feature_minus_random_mention_rate_max_strength"] = float(top.loc["feature", "minus_random"])
        metrics["feature_minus_random_ci_low_max_strength"] = float(top.loc["feature", "minus_random_ci_low"])
        metrics["feature_minus_random_ci_high_max_strength"] = float(top.loc["feature", "minus_random_ci_high"])
        metrics |= self.effect_test(samples, ctx.seed)
        direction = "fewer" if self.config.mode == SteeringMode.ablate else "more"
        ctx.verdict(
            "steering_beyond_random",
            metrics["steering_effect_p"] < 0.05,
            f"seed 000: the steered feature gives {direction} mentions of {concept.name!r} than a random feature of matched scale "
            f"(paired sign-flip permutation over inputs, one-sided p < 0.05, mode={self.config.mode}, strength {max(self.strengths):g})",
            effect=metrics["steering_effect"],
            p=metrics["steering_effect_p"],
        )
        log.info(
            "layer %d, feature %d (%s): mention rate %.2f at strength %g vs random feature %.2f and baseline %.2f",
            ctx.layer,
            feature,
            concept.name,
            metrics["feature_mention_rate_max_strength"],
            max(self.strengths),
            metrics["random_feature_mention_rate_max_strength"],
            metrics["baseline_mention_rate"],
        )
        return metrics

    def effect_test(self, samples: pd.DataFrame, seed: int) -> dict[str, float]:
        """Feature minus random feature at the top strength, paired over inputs, against sign flips of the differences.

        One-sided: a rise in mentions for add and clamp, a drop for ablate. run() turns it into the
        plan's success bar: an effect beyond the random-feature control (p < 0.05).
        """
        top = samples[samples["strength"] == max(self.strengths)]
        feature = top[top["condition"] == "feature"]["mentions"].to_numpy(dtype=float)
        random = top[top["condition"] == "random_feature"]["mentions"].to_numpy(dtype=float)
        diff = feature - random
        observed = float(diff.mean())
        null = null_draws(lambda rng: float(np.mean(diff * rng.choice([-1.0, 1.0], size=len(diff)))), self.config.n_bootstrap, seed)
        alternative = "less" if self.config.mode == SteeringMode.ablate else "greater"
        p_value = pvalue(observed, null, alternative)
        return {
            "steering_effect": observed,
            "steering_effect_null_mean": float(null.mean()),
            "steering_effect_p": p_value,
        }

    def conditions(
        self, layer: int, control_layer: int, feature: int, random_feature: int, scale: float, random_scale: float
    ) -> list[tuple[str, int, int, float, str]]:
        """(condition, layer, feature, scale, mode) of the steered run and its two controls, all in one mode.

        The other-layer control differs from the main condition in its layer alone: under clamp it reads
        the feature's activation there with the same SAE encoder, so a clamp that only works at layer L
        is what it tests, not clamp against add.
        """
        mode = str(self.config.mode)
        return [
            ("feature", layer, feature, scale, mode),
            ("random_feature", layer, random_feature, random_scale, mode),
            ("feature_other_layer", control_layer, feature, scale, mode),
        ]

    def steer_and_describe(
        self,
        ctx: RunContext,
        images: list,
        sources: list[str],
        conditions: list[tuple[str, int, int, float, str]],
        words: list[str],
        word_token: int,
    ) -> pd.DataFrame:
        """Step 2-3: describe the images under every condition and strength; one row per image."""
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
                rows.append(
                    {
                        "condition": condition,
                        "layer": layer,
                        "feature": f,
                        "strength": strength,
                        "mode": mode,
                        "image": source,
                        "text": text,
                        "mentions": mentions(text, words),
                        "delta_logprob": float(logprobs[i, word_token] - base_logprobs[i, word_token]),
                        "kl": float(kl[i]),
                    }
                )
        return pd.DataFrame(rows)

    def summarise(self, samples: pd.DataFrame, seed: int) -> pd.DataFrame:
        rows = []
        for (condition, strength), group in samples.groupby(["condition", "strength"], sort=False):
            said = group["mentions"].to_numpy(dtype=float)
            low, high = bootstrap_ci(said, seed, self.config.n_bootstrap)
            dl_low, dl_high = bootstrap_ci(group["delta_logprob"].to_numpy(), seed, self.config.n_bootstrap)
            row = {
                "condition": condition,
                "strength": strength,
                "layer": int(group["layer"].iloc[0]),
                "n_images": len(group),
                "mention_rate": said.mean(),
                "mention_rate_ci_low": low,
                "mention_rate_ci_high": high,
                "delta_logprob": group["delta_logprob"].mean(),
                "delta_logprob_ci_low": dl_low,
                "delta_logprob_ci_high": dl_high,
                "kl": group["kl"].mean(),
            }
            random = samples[(samples["condition"] == "random_feature") & (samples["strength"] == strength)]
            # paired over images: the same image described under both features
            diff_low, diff_high = bootstrap_ci(said - random["mentions"].to_numpy(dtype=float), seed, self.config.n_bootstrap)
            row |= {"minus_random": said.mean() - random["mentions"].mean(), "minus_random_ci_low": diff_low, "minus_random_ci_high": diff_high}
            rows.append(row)
        return pd.DataFrame(rows)
