"""RepresentationShift: how far did multimodal training move the decoder's text representations?

Method (seed 001: Gemma 2 2B against PaliGemma 2 3B's decoder), at one decoder layer:
1. The same text prompts (each concept in each template, or with `prompts=sentences` whole
   sentences, the code pooled over all their tokens) go through the base LLM
   (`experiment.base_model`, a config in conf/model/) and through the VLM.
2. Both are encoded through the same SAE and pooled per prompt.
3. Per prompt: cosine similarity and L2 distance of the two code vectors.
   Per feature: the mean coefficient change (VLM - base); the features that gain and
   lose most; the distribution of all coefficient differences.
4. Null: the same cosine for mismatched prompts (base prompt i against VLM prompt j),
   with a permutation p-value for the matched mean.
5. The distance itself, for comparing checkpoints: the mean over prompts of 1 - cosine and the
   relative L2 distance, each with a bootstrap 95% interval over prompts.
The two models must share the residual width and tokenise the prompts identically.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import ClassVar, Sequence

import numpy as np
import pandas as pd

from xmodal.data.concepts import ConceptDataset
from xmodal.data.sentences import sentence_dataset
from xmodal.errors import ConfigError
from xmodal.experiments.base import Experiment, RunContext
from xmodal.experiments.shift.config import PromptSet, ShiftConfig
from xmodal.metrics import overlap as M
from xmodal.metrics import statistics as S
from xmodal.models.base import ModelAdapter
from xmodal.models.named import load_named_model
from xmodal.reporting import figures

log = logging.getLogger(__name__)


def check_compatible(base: ModelAdapter, vlm: ModelAdapter, texts: Sequence[str], layer: int) -> None:
    if base.hidden_size != vlm.hidden_size:
        raise ConfigError(
            f"base model {base.name!r} has hidden size {base.hidden_size} but model {vlm.name!r} has {vlm.hidden_size}; "
            "RepresentationShift compares a VLM with the LLM its decoder came from, which share the residual width"
        )
    base.check_layer(layer)
    for text in texts:
        a = base.tokenizer(text, add_special_tokens=False)["input_ids"]
        b = vlm.tokenizer(text, add_special_tokens=False)["input_ids"]
        if a != b:
            raise ConfigError(f"base model {base.name!r} and model {vlm.name!r} tokenise {text!r} differently ({a} vs {b}); their tokenizers are incompatible")


class RepresentationShift(Experiment):
    name: ClassVar[str] = "shift"
    needs_images: ClassVar[bool] = False
    config: ShiftConfig

    def run(self, ctx: RunContext) -> dict[str, float]:
        dataset = self.prompt_dataset(ctx)
        base = self.load_base(ctx, dataset)
        base_codes, prompts = self.prompt_codes(ctx, base, dataset)
        vlm_codes, _ = self.prompt_codes(ctx, ctx.model, dataset)
        with ctx.timed("metrics"):
            cosine = _cosine_matrix(base_codes, vlm_codes)
            observed, p_value, null = S.permutation_test(
                lambda order: float(np.nanmean(cosine[np.arange(len(prompts)), order])), len(prompts), self.config.n_permutations, ctx.seed
            )
            prompt_table = self.prompt_table(prompts, base_codes, vlm_codes, cosine)
            prompt_table.insert(1, "category", [c.category for c in dataset.concepts] * (len(prompts) // len(dataset.concepts)))
            feature_table = self.feature_shift(base_codes, vlm_codes)
        delta = vlm_codes - base_codes
        ctx.table("prompts", prompt_table)
        ctx.table("feature_shift", feature_table)
        with ctx.timed("figures"):
            figure = figures.shift_distribution(
                delta, prompt_table["cosine"].to_numpy(), prompt_table["cosine_null"].to_numpy(), ctx.layer, base.name, ctx.model.name
            )
            ctx.figure("coefficient_differences", figure)

        changed = delta[np.abs(delta) > 0]
        metrics = {
            "n_prompts": len(prompts),
            "cosine": observed,
            "cosine_null_mean": float(np.nanmean(null)),
            "cosine_null_q025": float(np.nanquantile(null, 0.025)),
            "cosine_null_q975": float(np.nanquantile(null, 0.975)),
            "cosine_p": p_value,
            "l2_mean": float(prompt_table["l2"].to_numpy().mean()),
            "relative_l2_mean": float(np.nanmean(prompt_table["relative_l2"])),
            **self.distances(prompt_table, ctx.seed),
            "fraction_coefficients_changed": float(changed.size / delta.size),
            "abs_change_mean": float(np.abs(delta).mean()),
        }
        log.info(
            "layer %d: %s vs %s: cosine %.3f (mismatched prompts %.3f, p=%.3g); distance 1 - cosine %.3f [%.3f, %.3f], relative L2 %.3f [%.3f, %.3f]",
            ctx.layer,
            ctx.model.name,
            base.name,
            observed,
            metrics["cosine_null_mean"],
            p_value,
            metrics["cosine_distance"],
            metrics["cosine_distance_ci_low"],
            metrics["cosine_distance_ci_high"],
            metrics["relative_l2_mean"],
            metrics["relative_l2_ci_low"],
            metrics["relative_l2_ci_high"],
        )
        return metrics

    # 1. the two models --------------------------------------------------------------
    def prompt_dataset(self, ctx: RunContext) -> ConceptDataset:
        """The job's concepts, or whole sentences (each one a text-only "concept" made of all its tokens)."""
        return ctx.dataset if self.config.prompts == PromptSet.concepts else sentence_dataset(self.config.sentences_file)

    def load_base(self, ctx: RunContext, dataset: ConceptDataset) -> ModelAdapter:
        """The base LLM (a conf/model name), checked against the VLM: residual width, layer, tokenisation."""
        base = load_named_model(str(self.config.base_model), self.config.base_model_overrides, key="experiment.base_model")
        check_compatible(base, ctx.model, [c.text for c in dataset.concepts], ctx.layer)
        return base

    # 2. codes per prompt ---------------------------------------------------------------
    def prompt_codes(self, ctx: RunContext, model: ModelAdapter, dataset: ConceptDataset) -> tuple[np.ndarray, list[str]]:
        templates = self.config.text_templates if self.config.prompts == PromptSet.concepts else ["{concept}"]
        rows, prompts = [], []
        for template in templates:
            positions = dataclasses.replace(ctx.positions, text_prompt=template)
            rows.append(ctx.codes(positions=positions, dataset=dataset, modalities=("text",), model=model).text)
            prompts += [template.replace("{concept}", c.text) for c in dataset.concepts]
        return np.vstack(rows), prompts

    # 3-4. per prompt, with its mismatched-prompt null -------------------------------------
    @staticmethod
    def prompt_table(prompts: list[str], base_codes: np.ndarray, vlm_codes: np.ndarray, cosine: np.ndarray) -> pd.DataFrame:
        l2 = np.linalg.norm(vlm_codes - base_codes, axis=1)
        base_norm = np.linalg.norm(base_codes, axis=1)
        return pd.DataFrame(
            {
                "prompt": prompts,
                "cosine": np.diag(cosine),
                "cosine_null": M.off_diagonal_mean(cosine),
                "l2": l2,
                "relative_l2": l2 / np.where(base_norm > 0, base_norm, np.nan),
                "l0_base": (base_codes > 0).sum(axis=1),
                "l0_vlm": (vlm_codes > 0).sum(axis=1),
            }
        )

    # 5. the distance, with an interval over prompts ---------------------------------------
    @staticmethod
    def distances(prompt_table: pd.DataFrame, seed: int) -> dict[str, float]:
        """Mean 1 - cosine and mean relative L2 over prompts, each with a bootstrap 95% interval over prompts.

        A prompt whose code vector is all zero in either model has no cosine (or no relative L2)
        and is left out of that measure; `*_n_prompts` says how many remained.
        """
        out: dict[str, float] = {}
        for name, values in (("cosine_distance", 1 - prompt_table["cosine"].to_numpy(float)), ("relative_l2", prompt_table["relative_l2"].to_numpy(float))):
            finite = values[np.isfinite(values)]
            low, high = S.bootstrap_ci(finite, seed) if finite.size else (float("nan"), float("nan"))
            out |= {f"{name}_ci_low": low, f"{name}_ci_high": high, f"{name}_n_prompts": int(finite.size)}
            if name == "cosine_distance":
                out[name] = float(finite.mean()) if finite.size else float("nan")
        return out

    # 3. per feature ----------------------------------------------------------------------
    def feature_shift(self, base_codes: np.ndarray, vlm_codes: np.ndarray) -> pd.DataFrame:
        """The features whose mean coefficient gained most, then those that lost most."""
        mean_delta = (vlm_codes - base_codes).mean(axis=0)
        order = np.argsort(mean_delta, kind="stable")
        k = min(self.config.top_features, len(order))
        chosen = np.concatenate([order[::-1][:k], order[:k]])  # largest gains, then largest losses
        return pd.DataFrame(
            {
                "feature": chosen,
                "direction": ["gain"] * k + ["loss"] * k,
                "mean_change": mean_delta[chosen],
                "mean_base": base_codes.mean(axis=0)[chosen],
                "mean_vlm": vlm_codes.mean(axis=0)[chosen],
            }
        )


def _cosine_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    norm_a = np.linalg.norm(a, axis=1, keepdims=True)
    norm_b = np.linalg.norm(b, axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (a / norm_a) @ (b / norm_b).T
