"""SAEEval: does the job's SAE read each modality faithfully? (Can a text-trained SAE read image tokens?)

Method, at one decoder layer, for the job's SAE and, as the null, `n_random_saes` random SAEs of
the same architecture and width matched to it in L0 (xmodal/saes/random.py), on the same tokens:
1. Tokens: every image soft token of the dataset and every concept-prompt token (activation
   cache), and the answer tokens (caption or concept text) that follow `n_images` images.
2. Reconstruction and sparsity per modality (image, text): explained variance, MSE, cosine
   similarity, L2 ratio (shrinkage), L0, and the dead and dense fractions (active on no token /
   on more than `dense_fraction` of the modality's tokens).
3. Splice: resid_post replaced by its reconstruction at image tokens only, text tokens only, or
   both, with the answer teacher-forced after the image; its next-token loss against the clean
   run and against zero-ablation at the same positions: SAELens's ce_loss_score =
   (CE_zero - CE_sae) / (CE_zero - CE_clean) and kl_div_score = (KL_zero - KL_sae) / KL_zero.
4. Every metric beside its null (mean, 95% interval, p by the (k+1)/(n+1) rule); metric keys are
   SAELens/SAEBench's names prefixed with the tokens (``image_explained_variance``,
   ``text_ce_loss_score``, ``both_kl_div_score``), so a ``-m layer=...`` sweep draws each
   against layer with the null as a band.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

from xmodal.errors import ConfigError, DatasetError
from xmodal.experiments.base import Experiment, RunContext
from xmodal.experiments.sae_eval import splice as S
from xmodal.experiments.sae_eval.config import AnswerSource, SAEEvalConfig
from xmodal.metrics.statistics import summarise_null
from xmodal.saes.quality import encode_decode, reconstruction_metrics
from xmodal.saes.random import random_sae_like

log = logging.getLogger(__name__)

MODALITIES = ("image", "text")
# Which way is better, for the p-value against random SAEs ("two-sided" where neither is).
BETTER = {
    "explained_variance": "greater",
    "mse": "less",
    "cossim": "greater",
    "l2_ratio": "two-sided",
    "l0": "two-sided",
    "frac_dead": "less",
    "frac_dense": "less",
    "ce_loss_score": "greater",
    "kl_div_score": "greater",
}


def with_null(key: str, observed: float, null: np.ndarray, alternative: str) -> dict[str, float]:
    """`key` and its null: key_p, key_null_mean, key_null_std, key_null_q025, key_null_q975, key_null_n."""
    summary = summarise_null(observed, null, alternative).as_dict()
    return {
        key: summary["observed"],
        f"{key}_p": summary["p_value"],
        f"{key}_null_mean": summary["null_mean"],
        f"{key}_null_std": summary["null_std"],
        f"{key}_null_q025": summary["null_q025"],
        f"{key}_null_q975": summary["null_q975"],
        f"{key}_null_n": summary["n_draws"],
    }


class SAEEval(Experiment):
    name: ClassVar[str] = "sae_eval"
    config: SAEEvalConfig

    def run(self, ctx: RunContext) -> dict[str, float]:
        sae = ctx.features.sae
        if sae is None:
            raise ConfigError("experiment=sae_eval evaluates an SAE; choose one (e.g. sae=organism or sae=local), not sae=none")
        if ctx.features.transcoder:
            raise ConfigError(
                f"experiment=sae_eval scores an SAE's reconstruction of the vector it reads, and {ctx.features.name!r} is a transcoder "
                "(it reads its MLP's input and predicts the MLP's output); evaluate an SAE (sae.transcoder=false)"
            )
        images, answers = self.splice_examples(ctx)
        with ctx.timed("tokens"):
            batches = [
                S.answer_batch(
                    ctx.model, images[i : i + ctx.batch_size], answers[i : i + ctx.batch_size], ctx.positions.image_prompt, ctx.positions.use_chat_template
                )
                for i in range(0, len(images), ctx.batch_size)
            ]
            tokens = self.tokens(ctx, batches)  # 1.
        pooled = torch.cat(list(tokens.values()))
        target_l0 = reconstruction_metrics(pooled, *encode_decode(sae, pooled)[::-1])["l0"]
        saes = {"sae": sae} | {f"random_{i}": random_sae_like(sae, pooled, target_l0, seed=ctx.seed * 1000 + i) for i in range(self.config.n_random_saes)}
        with ctx.timed("reconstruction"):
            reconstruction = self.reconstruction(tokens, saes)  # 2.
        with ctx.timed("splice"):
            splice = self.splice(ctx, batches, saes)  # 3.
        metrics, table = self.with_nulls(reconstruction, splice)  # 4.
        metrics |= {
            "n_image_tokens": len(tokens["image"]),
            "n_text_tokens": len(tokens["text"]),
            "n_splice_images": len(images),
            "n_answer_tokens": int(sum(b.predicts.sum() for b in batches)),
            "random_sae_target_l0": target_l0,
        }
        ctx.table("reconstruction", reconstruction)
        ctx.table("splice", splice)
        ctx.table("metrics", table)
        with ctx.timed("figures"):
            ctx.figure("metrics_by_modality", metrics_figure(table, ctx.layer, ctx.features.name))
        log.info(
            "layer %d: explained variance image %.3f (random %.3f), text %.3f (random %.3f); %s",
            ctx.layer,
            metrics["image_explained_variance"],
            metrics["image_explained_variance_null_mean"],
            metrics["text_explained_variance"],
            metrics["text_explained_variance_null_mean"],
            ", ".join(
                f"{site} splice ce_loss_score {metrics[f'{site}_ce_loss_score']:.3f} (random {metrics[f'{site}_ce_loss_score_null_mean']:.3f})"
                for site in dict.fromkeys(str(s) for s in self.config.splice_sites)
            ),
        )
        return metrics

    # 1. ------------------------------------------------------------------------------------
    def splice_examples(self, ctx: RunContext) -> tuple[list, list[str]]:
        """`n_images` images (seeded choice) and the answer that follows each."""
        pool = ctx.dataset.images
        if self.config.answer == AnswerSource.caption:
            pool = [img for img in pool if img.caption]
            if not pool:
                raise DatasetError(
                    f"dataset {ctx.dataset.name!r} has no image captions to score; use experiment.answer=concept "
                    "(the concept's text as the answer) or a captioned dataset (dataset=organism_concepts)"
                )
        texts = {c.name: c.text for c in ctx.dataset.concepts}
        rng = np.random.default_rng(ctx.seed)
        chosen = sorted(rng.choice(len(pool), size=min(self.config.n_images, len(pool)), replace=False))
        images = [pool[i] for i in chosen]
        answers = [img.caption if self.config.answer == AnswerSource.caption else texts[img.concept] for img in images]
        return [img.load() for img in images], answers

    def tokens(self, ctx: RunContext, batches: list[S.AnswerBatch]) -> dict[str, torch.Tensor]:
        """Rows at the SAE's site (resid_post, mlp_out, attn_out) per modality: the dataset's image tokens; its
        concept-prompt tokens and the answer tokens."""
        acts = ctx.activations(site=ctx.features.site)[ctx.layer]
        answer_rows = []
        for batch in batches:
            captured: list[torch.Tensor] = []

            def keep(hidden: torch.Tensor) -> torch.Tensor:
                captured.append(hidden.float().cpu())
                return hidden

            answer_only = batch.predicts.roll(1, dims=1) & batch.text  # the answer tokens themselves
            with torch.inference_mode(), S.spliced(ctx.model.hook_point(ctx.layer, ctx.features.site), keep, answer_only):
                ctx.model.model(**{k: v.to(ctx.model.device) if isinstance(v, torch.Tensor) else v for k, v in batch.inputs.items()}, use_cache=False)
            answer_rows.extend(captured)
        image = acts.image_token_rows()  # every image token of the dataset: the metrics compare whole distributions
        return {"image": image, "text": torch.cat([acts.text_tokens.float(), *answer_rows])}

    # 2. ------------------------------------------------------------------------------------
    def reconstruction(self, tokens: dict[str, torch.Tensor], saes: dict[str, Any]) -> pd.DataFrame:
        rows = []
        for name, sae in saes.items():
            for modality, x in tokens.items():
                codes, x_hat = encode_decode(sae, x)
                rows.append({"sae": name, "tokens": modality, "n_tokens": len(x), **reconstruction_metrics(x, x_hat, codes, self.config.dense_fraction)})
        return pd.DataFrame(rows)

    # 3. ------------------------------------------------------------------------------------
    def splice(self, ctx: RunContext, batches: list[S.AnswerBatch], saes: dict[str, Any]) -> pd.DataFrame:
        """One row per SAE (and zero-ablation) and site: CE and KL on the answers, and the two scores."""
        targets = torch.cat([b.targets for b in batches])

        def run(reconstruct: S.Reconstruct | None, site: str) -> torch.Tensor:
            return torch.cat([S.answer_logprobs(ctx.model, b, ctx.layer, reconstruct, site, ctx.features.site) for b in batches])

        clean = run(None, "both")
        ce_clean = S.cross_entropy(clean, targets)
        rows = []
        for site in dict.fromkeys(str(s) for s in self.config.splice_sites):
            ablated = run(S.zero, site)
            ce_zero, kl_zero = S.cross_entropy(ablated, targets), S.kl_from_clean(clean, ablated)
            rows.append(
                {
                    "sae": "zero_ablation",
                    "site": site,
                    "ce_loss_without_sae": ce_clean,
                    "ce_loss_with_sae": ce_zero,
                    "ce_loss_with_ablation": ce_zero,
                    "kl_div_with_sae": kl_zero,
                    "kl_div_with_ablation": kl_zero,
                    "ce_loss_score": 0.0,
                    "kl_div_score": 0.0,
                }
            )
            for name, sae in saes.items():
                spliced = run(S.sae_reconstruction(sae), site)
                ce_sae, kl_sae = S.cross_entropy(spliced, targets), S.kl_from_clean(clean, spliced)
                rows.append(
                    {
                        "sae": name,
                        "site": site,
                        "ce_loss_without_sae": ce_clean,
                        "ce_loss_with_sae": ce_sae,
                        "ce_loss_with_ablation": ce_zero,
                        "kl_div_with_sae": kl_sae,
                        "kl_div_with_ablation": kl_zero,
                        "ce_loss_score": S.ce_loss_score(ce_clean, ce_sae, ce_zero),
                        "kl_div_score": S.kl_div_score(kl_sae, kl_zero),
                    }
                )
        return pd.DataFrame(rows)

    # 4. ------------------------------------------------------------------------------------
    def with_nulls(self, reconstruction: pd.DataFrame, splice: pd.DataFrame) -> tuple[dict[str, float], pd.DataFrame]:
        """Flat metrics (each with its random-SAE null) and the same as a table, one row per metric."""
        metrics: dict[str, float] = {}
        rows = []
        groups = [
            (reconstruction, "tokens", [m for m in BETTER if m in reconstruction]),
            (splice[splice["sae"] != "zero_ablation"], "site", ["ce_loss_score", "kl_div_score"]),
        ]
        for frame, by, names in groups:
            for prefix, part in frame.groupby(by, sort=False):
                trained = part[part["sae"] == "sae"].iloc[0]
                null = part[part["sae"].str.startswith("random_")]
                for name in names:
                    key = f"{prefix}_{name}"
                    values = with_null(key, float(trained[name]), null[name].to_numpy(dtype=float), BETTER[name])
                    metrics |= values
                    rows.append(
                        {
                            "tokens": prefix,
                            "metric": name,
                            "value": values[key],
                            "null_mean": values[f"{key}_null_mean"],
                            "null_q025": values[f"{key}_null_q025"],
                            "null_q975": values[f"{key}_null_q975"],
                            "p": values[f"{key}_p"],
                        }
                    )
        clean = splice.iloc[0]
        metrics["ce_loss_without_sae"] = float(clean["ce_loss_without_sae"])
        for _, row in splice[splice["sae"].isin(["sae", "zero_ablation"])].iterrows():
            if row["sae"] == "sae":
                metrics[f"{row['site']}_ce_loss_with_sae"] = float(row["ce_loss_with_sae"])
                metrics[f"{row['site']}_kl_div_with_sae"] = float(row["kl_div_with_sae"])
            else:
                metrics[f"{row['site']}_ce_loss_with_ablation"] = float(row["ce_loss_with_sae"])
                metrics[f"{row['site']}_kl_div_with_ablation"] = float(row["kl_div_with_sae"])
        return metrics, pd.DataFrame(rows)


def metrics_figure(table: pd.DataFrame, layer: int, sae_name: str) -> plt.Figure:
    """One panel per metric: the SAE's value per modality (bars) beside its random-SAE null (mean, 95% interval)."""
    names = list(dict.fromkeys(table["metric"]))
    fig, axes = plt.subplots(1, len(names), figsize=(2.3 * len(names), 3.2))
    for ax, name in zip(np.atleast_1d(axes), names):
        part = table[table["metric"] == name]
        x = np.arange(len(part))
        ax.bar(x - 0.2, part["value"], width=0.4, label=sae_name, color="tab:blue")
        ax.bar(x + 0.2, part["null_mean"], width=0.4, label="random SAE (L0-matched)", color="tab:gray")
        ax.errorbar(
            x + 0.2, part["null_mean"], yerr=[part["null_mean"] - part["null_q025"], part["null_q975"] - part["null_mean"]], fmt="none", color="black", lw=1
        )
        ax.set_xticks(x, part["tokens"], fontsize=8)
        ax.set_title(name, fontsize=9)
    np.atleast_1d(axes)[0].legend(fontsize=7)
    fig.suptitle(f"SAE evaluation by modality, layer {layer} (splice sites: image, text, both)", fontsize=10)
    fig.tight_layout()
    return fig
