"""RepresentationShift: how far did multimodal training move the decoder's text representations?

Method (seed 001: Gemma 2 2B against PaliGemma 2 3B's decoder), at one decoder layer:
1. The same text prompts (each concept in each template) go through the base LLM
   (`experiment.base_model`, a config in conf/model/) and through the VLM.
2. Both are encoded through the same SAE and pooled per prompt.
3. Per prompt: cosine similarity and L2 distance of the two code vectors.
   Per feature: the mean coefficient change (VLM - base); the features that gain and
   lose most; the distribution of all coefficient differences.
4. Null: the same cosine for mismatched prompts (base prompt i against VLM prompt j),
   with a permutation p-value for the matched mean.
The two models must share the residual width and tokenise the prompts identically.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import ClassVar, Sequence

import numpy as np
import pandas as pd
from hydra import compose
from hydra.core.global_hydra import GlobalHydra

from xmodal.errors import ConfigError
from xmodal.experiments.base import Experiment, RunContext
from xmodal.metrics import overlap as M
from xmodal.models.base import ModelAdapter, instantiate_model
from xmodal.reporting import figures

log = logging.getLogger(__name__)


def load_base_model(name: str, overrides: Sequence[str] = ()) -> ModelAdapter:
    """Instantiate conf/model/<name>.yaml (with `model.*` overrides) inside the running Hydra app."""
    if not GlobalHydra.instance().is_initialized():
        raise ConfigError("experiment=shift loads its base model through Hydra; run it with python -m xmodal.run")
    try:
        cfg = compose(config_name="config", overrides=[f"model={name}", *overrides])
    except Exception as err:  # Hydra's MissingConfigException lists the options
        raise ConfigError(f"experiment.base_model={name!r} is not a config in conf/model/: {str(err).splitlines()[0]}") from err
    return instantiate_model(cfg.model)


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
            raise ConfigError(
                f"base model {base.name!r} and model {vlm.name!r} tokenise {text!r} differently ({a} vs {b}); "
                "their tokenizers are incompatible"
            )


class RepresentationShift(Experiment):
    name: ClassVar[str] = "shift"

    def __init__(self, name: str = "shift", base_model: str | None = None, base_model_overrides: Sequence[str] = (),
                 text_templates: Sequence[str] = ("{concept}",), top_features: int = 20, n_permutations: int = 1000) -> None:
        if not base_model:
            raise ConfigError(
                "experiment=shift needs a base LLM, and this model config names none (model.base_model); "
                "set experiment.base_model to a config in conf/model/, e.g. experiment.base_model=gemma2_2b"
            )
        bad = [o for o in base_model_overrides if not o.startswith("model.")]
        if bad:
            raise ConfigError(f"experiment.base_model_overrides may only set model.* keys; got {bad}")
        self.base_model = base_model
        self.base_model_overrides = list(base_model_overrides)
        self.text_templates = list(text_templates)
        self.top_features = top_features
        self.n_permutations = n_permutations

    def prompt_codes(self, ctx: RunContext, model: ModelAdapter) -> tuple[np.ndarray, list[str]]:
        rows, prompts = [], []
        for template in self.text_templates:
            positions = dataclasses.replace(ctx.positions, text_prompt=template)
            rows.append(ctx.codes(positions=positions, modalities=("text",), model=model).text)
            prompts += [template.replace("{concept}", c.text) for c in ctx.dataset.concepts]
        return np.vstack(rows), prompts

    def run(self, ctx: RunContext) -> dict[str, float]:
        base = load_base_model(self.base_model, self.base_model_overrides)
        check_compatible(base, ctx.model, [c.text for c in ctx.dataset.concepts], ctx.layer)
        base_codes, prompts = self.prompt_codes(ctx, base)
        vlm_codes, _ = self.prompt_codes(ctx, ctx.model)

        with ctx.timed("metrics"):
            n = len(prompts)
            cosine = _cosine_matrix(base_codes, vlm_codes)
            l2 = np.linalg.norm(vlm_codes - base_codes, axis=1)
            base_norm = np.linalg.norm(base_codes, axis=1)
            observed, p_value, null = M.permutation_pvalue(
                lambda order: float(np.nanmean(cosine[np.arange(n), order])), n, self.n_permutations, ctx.seed
            )
            delta = vlm_codes - base_codes
            mean_delta = delta.mean(axis=0)
            matched, mismatched = np.diag(cosine), M.off_diagonal_mean(cosine)
            prompt_table = pd.DataFrame(
                {
                    "prompt": prompts,
                    "cosine": matched,
                    "cosine_null": mismatched,
                    "l2": l2,
                    "relative_l2": l2 / np.where(base_norm > 0, base_norm, np.nan),
                    "l0_base": (base_codes > 0).sum(axis=1),
                    "l0_vlm": (vlm_codes > 0).sum(axis=1),
                }
            )
            order = np.argsort(mean_delta, kind="stable")
            k = min(self.top_features, len(order))
            chosen = np.concatenate([order[::-1][:k], order[:k]])  # largest gains, then largest losses
            feature_table = pd.DataFrame(
                {
                    "feature": chosen,
                    "direction": ["gain"] * k + ["loss"] * k,
                    "mean_change": mean_delta[chosen],
                    "mean_base": base_codes.mean(axis=0)[chosen],
                    "mean_vlm": vlm_codes.mean(axis=0)[chosen],
                }
            )
        ctx.table("prompts", prompt_table)
        ctx.table("feature_shift", feature_table)
        with ctx.timed("figures"):
            ctx.figure("coefficient_differences", figures.shift_distribution(delta, matched, mismatched, ctx.layer, base.name, ctx.model.name))

        changed = delta[np.abs(delta) > 0]
        metrics = {
            "n_prompts": n,
            "cosine": observed,
            "cosine_null_mean": float(np.nanmean(null)),
            "cosine_null_q025": float(np.nanquantile(null, 0.025)),
            "cosine_null_q975": float(np.nanquantile(null, 0.975)),
            "cosine_p": p_value,
            "l2_mean": float(l2.mean()),
            "relative_l2_mean": float(np.nanmean(prompt_table["relative_l2"])),
            "fraction_coefficients_changed": float(changed.size / delta.size),
            "abs_change_mean": float(np.abs(delta).mean()),
        }
        log.info(
            "layer %d: %s vs %s: cosine %.3f (mismatched prompts %.3f, p=%.3g), relative L2 %.3f",
            ctx.layer, ctx.model.name, base.name, observed, metrics["cosine_null_mean"], p_value, metrics["relative_l2_mean"],
        )
        return metrics


def _cosine_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    norm_a = np.linalg.norm(a, axis=1, keepdims=True)
    norm_b = np.linalg.norm(b, axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (a / norm_a) @ (b / norm_b).T
