"""DASynthesis: can an image be synthesised, at layer L, from a concept's text alone?

Method (seed 004), at one decoder layer L:
1. Concept vectors: each concept word alone in the chat template, resid_post averaged
   over its tokens, minus the mean over Appendix C's 100 baseline words.
2. Synthesis (Direct Ascent Synthesis): for each concept, an image parameterised as
   grey plus squashed multi-resolution components, optimised so that its weighted,
   grey-centred image-token representation at L has maximal cosine with the concept
   vector, under random shifts and noise (synthesis.py beside this file). Learning rate and
   temperature come from Appendix E's per-layer presets (Gemma 3 4B layers, matched by
   relative depth) unless set.
3. Final cosine of each image with its own concept against the images synthesised for
   the other concepts (the mismatched-pair null, with a permutation p-value). The grey
   image is no control here: it is the baseline the representations are centred on, so its
   own centred representation is zero and its cosine undefined.
4. Recognisability by an independent judge: programmatic on the organism (colour
   histogram, shape classifier), another VLM asked the paper's two questions, or the
   paper's own protocol over a chat-completions API (judge=openai_compatible: 10 samples
   per image and question, each graded with Appendix E's rubric by a second model). The
   null is the same judge scoring images made for other concepts of the category. The
   judge is built before synthesis, so a missing key stops the job before any work.
5. The apples/oranges check (Appendix A): at every layer, the cosine between two (or
   more) concept vectors and real images of each, matched against mismatched, with a
   permutation test over the image labels.

A positive control that is not in seed 004: with concept_source=image the concept
vector is the mean image representation of the dataset's images of the concept minus
that of all its images. Synthesis towards a direction the model is known to use for
images tells a failure of the method (or of the judge) apart from text and image
representations that do not align. With concept_baseline=concept_set (also not in
seed 004) the text vectors lose the mean over the concepts at hand as well, so that
what every colour word shares cannot carry the cosine.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pandas as pd
import torch
from PIL import Image

from xmodal.data.concepts import ConceptDataset, without_partners_outside
from xmodal.errors import ConfigError, DatasetError
from xmodal.experiments.base import Experiment, RunContext
from xmodal.experiments.das import api_judge, judges
from xmodal.experiments.das.alignment import apples_oranges
from xmodal.experiments.das.concept_vectors import WORD_POSITIONS, baseline_words, concept_vectors, word_dataset
from xmodal.experiments.das.config import ConceptBaseline, ConceptSource, DASConfig, JudgeKind, JudgeScoring
from xmodal.experiments.das.synthesis import DASSettings, ImageReader, cosine_matrix, square_image_tokens, synthesise, to_pil
from xmodal.metrics.statistics import pvalue, summarise_null
from xmodal.reporting import figures

log = logging.getLogger(__name__)


def finite_mean(values: np.ndarray) -> float:
    """Mean of the finite values (a score is NaN where no grade parsed); NaN when there are none."""
    finite = np.asarray(values, dtype=float)[np.isfinite(values)]
    return float(finite.mean()) if finite.size else float("nan")


@dataclass
class Target:
    name: str  # the dataset concept's name, or the word itself
    word: str  # what the concept vector reads
    category: str
    synonyms: tuple[str, ...] = ()  # the dataset's other answers that name it, for the VLM judge's rubric


class DASynthesis(Experiment):
    name: ClassVar[str] = "das"
    needs_images: ClassVar[bool] = False
    config: DASConfig

    # ------------------------------------------------------------ choices --
    def targets(self, dataset: ConceptDataset) -> list[Target]:
        """Dataset concepts by name or text; any other string is taken as a bare word. No concepts: all the dataset's."""
        if not self.config.concepts:
            out = [Target(c.name, c.text, c.category, c.synonyms) for c in dataset.concepts]
        else:
            by_key = {key: c for c in dataset.concepts for key in (c.name, c.text)}
            out = []
            for entry in self.config.concepts:
                if not str(entry).strip():
                    raise DatasetError(f"experiment.concepts has an empty concept {entry!r}; give every concept a word")
                concept = by_key.get(entry)
                out.append(Target(concept.name, concept.text, concept.category, concept.synonyms) if concept else Target(entry, entry, ""))
        stray = sorted(set(self.config.judge_synonyms) - {t.name for t in out})
        if stray:  # a typo would otherwise widen no rubric, silently
            raise ConfigError(f"experiment.judge_synonyms names {stray}, which are not among the concepts {[t.name for t in out][:12]}; key it by concept name")
        return out

    def preset(self, layer: int, num_layers: int) -> tuple[float, float]:
        """(lr, temperature): set values, else Appendix E's for the 4B layer at the same relative depth."""

        def nearest(table: dict[int, float], what: str) -> float:
            if not table:
                raise ConfigError(f"experiment.{what} is unset and experiment.layer_{what} has no presets")
            depth = layer / max(1, num_layers - 1) * (self.config.preset_num_layers - 1)
            return float(table[min(table, key=lambda k: (abs(int(k) - depth), int(k)))])

        c = self.config
        lr = c.lr if c.lr is not None else nearest(c.layer_lr, "lr")
        temperature = c.temperature if c.temperature is not None else nearest(c.layer_temperature, "temperature")
        return lr, temperature

    # ---------------------------------------------------------------- run --
    def run(self, ctx: RunContext) -> dict[str, float]:
        targets = self.targets(ctx.dataset)
        alignment_data = self.alignment_dataset(ctx.dataset) if self.config.alignment_concepts else None  # fail before synthesising
        judge = self.make_judge(ctx, targets) if self.config.judge != JudgeKind.none else None  # a missing key fails here, before synthesis
        vectors = self.target_vectors(ctx, targets)
        lr, temperature = self.preset(ctx.layer, ctx.model.num_layers)
        settings = self.config.settings(lr, temperature)
        reader = ImageReader(ctx.model, ctx.layer, settings.prompt)
        log.info(
            "DAS at layer %d: %d concepts (%s vectors, baseline %s), %d steps x batch %d, lr %g, temperature %g",
            ctx.layer,
            len(targets),
            self.config.concept_source,
            self.config.concept_baseline,
            settings.steps,
            settings.batch_size,
            lr,
            temperature,
        )
        images, grey_mean, step_seconds = self.synthesis(ctx, reader, targets, vectors, settings)
        cosines = cosine_matrix(reader, images, vectors, grey_mean, settings)
        metrics = self.cosine_metrics(cosines, ctx.seed)
        # one optimisation step of every concept (several passes when concepts_per_pass < concepts)
        metrics |= {"lr": lr, "temperature": temperature, "steps": settings.steps, "seconds_per_step": step_seconds}
        ctx.table(
            "final_cosines",
            pd.DataFrame(cosines, index=[t.name for t in targets], columns=[t.name for t in targets])
            .rename_axis("image")
            .reset_index()
            .melt(id_vars="image", var_name="concept", value_name="cosine"),
        )
        pil_images = [to_pil(img) for img in images]
        for target, image in zip(targets, pil_images):
            ctx.image("das_" + re.sub(r"[^\w-]+", "_", target.name), image)  # a bare word may hold spaces
        ctx.figure("images", figures.das_sheet(pil_images, [t.name for t in targets], ctx.layer))
        if judge is not None:
            with ctx.timed("judge"):
                metrics |= self.recognition(ctx, judge, targets, pil_images)
        if alignment_data is not None:
            with ctx.timed("alignment"):
                metrics |= self.alignment(ctx, alignment_data)
        log.info(
            "layer %d: final cosine %.3f (other concepts' images %.3f, p=%.3g)",
            ctx.layer,
            metrics["final_cosine"],
            metrics["final_cosine_null_mean"],
            metrics["final_cosine_p"],
        )
        return metrics

    # 1. concept vectors ------------------------------------------------------------------
    def target_vectors(self, ctx: RunContext, targets: list[Target]) -> torch.Tensor:
        """(n_concepts, d_model) at this layer: from text (seed 004) or, as a positive control, from images."""
        if self.config.concept_source == ConceptSource.text:
            return self.text_vectors(ctx, [t.word for t in targets], [ctx.layer])[ctx.layer]
        return self.image_vectors(ctx, targets)

    # 2. synthesis --------------------------------------------------------------------------
    def synthesis(
        self, ctx: RunContext, reader: ImageReader, targets: list[Target], vectors: torch.Tensor, settings: DASSettings
    ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(images (n, 3, S, S), the grey image's mean patch, seconds per step of all concepts), `concepts_per_pass` at a time.

        Writes the trajectory table and figure.
        """
        images, trajectories, step_seconds = [], [], []
        per_pass = self.config.concepts_per_pass
        with ctx.timed("synthesis"):
            for start in range(0, len(targets), per_pass):
                result = synthesise(reader, vectors[start : start + per_pass], settings, ctx.seed + start, ctx.progress)
                images.append(result.images)
                trajectories.append(result.trajectory.assign(concept_index=result.trajectory["concept_index"] + start))
                step_seconds.append(result.seconds_per_step)
        images_t = torch.cat(images)
        trajectory = pd.concat(trajectories, ignore_index=True)
        trajectory["concept"] = [targets[i].name for i in trajectory["concept_index"]]
        ctx.table("trajectory", trajectory)
        ctx.figure("trajectory", figures.das_trajectory(trajectory, ctx.layer))
        return images_t, result.grey_mean, float(np.sum(step_seconds))

    def text_vectors(self, ctx: RunContext, concept_words: list[str], layers: list[int]) -> dict[int, torch.Tensor]:
        """Seed 004's concept vectors per layer: each word in the chat template minus the baseline words' mean.

        With concept_baseline=concept_set (not in seed 004) the mean over `concept_words` is taken off as
        well, so that what all the concepts share (being a colour word, say) cannot carry the cosine.
        """
        words = word_dataset(concept_words + list(baseline_words()))
        acts = ctx.activations(layers, positions=WORD_POSITIONS, dataset=words, modalities=("text",))
        vectors = {layer: concept_vectors(acts[layer], words, concept_words, baseline_words())[0] for layer in layers}
        if self.config.concept_baseline == ConceptBaseline.concept_set:
            vectors = {layer: v - v.mean(dim=0) for layer, v in vectors.items()}
        return vectors

    def image_vectors(self, ctx: RunContext, targets: list[Target]) -> torch.Tensor:
        """The positive control: mean image representation of each concept's images minus that of all images."""
        have = {img.concept for img in ctx.dataset.images}
        missing = [t.name for t in targets if t.name not in have]
        if missing:
            raise DatasetError(f"experiment.concept_source=image needs images of every concept; dataset {ctx.dataset.name!r} has none of {missing}")
        acts = ctx.activations(modalities=("image",))[ctx.layer]
        per_image = acts.image_token_mean()  # the unweighted image representation
        image_concepts = np.array(acts.image_concepts)
        baseline = per_image.mean(dim=0)
        return torch.stack([per_image[torch.from_numpy(image_concepts == t.name)].mean(dim=0) for t in targets]) - baseline

    # 3. final cosines against the other concepts' images -----------------------------------
    def cosine_metrics(self, cosines: np.ndarray, seed: int) -> dict[str, float]:
        """Own-concept cosine against images made for other concepts (permuting the images)."""
        n = len(cosines)
        matched = float(np.mean(np.diag(cosines)))
        mismatched = cosines[~np.eye(n, dtype=bool)]
        rng = np.random.default_rng(seed)
        null = np.array([np.mean(cosines[rng.permutation(n), np.arange(n)]) for _ in range(self.config.n_permutations)])
        summary = summarise_null(matched, null)
        return {
            "final_cosine": matched,
            "final_cosine_null_mean": float(mismatched.mean()),
            "final_cosine_null_q025": summary.null_q025,
            "final_cosine_null_q975": summary.null_q975,
            "final_cosine_p": summary.p_value,
        }

    # 4. recognition by an independent judge ------------------------------------------------
    def make_judge(self, ctx: RunContext, targets: list[Target]) -> judges.Judge:
        c = self.config
        if c.judge == JudgeKind.organism:
            return judges.programmatic_judge(c.programmatic_judge, ctx.seed)
        if c.judge == JudgeKind.openai_compatible:
            asker, grader = api_judge.from_environment(c.judge_api)
            return api_judge.APIJudge(asker, grader, c.judge_samples)
        synonyms = {t.name: [*t.synonyms, *c.judge_synonyms.get(t.name, [])] for t in targets}
        accepted = judges.rubric({t.name: t.word for t in targets}, synonyms, c.judge_word_forms)
        ctx.table("rubric", judges.rubric_table(accepted))
        log.info("judge rubric (answers that name each concept): %s", "; ".join(f"{k}: {', '.join(v)}" for k, v in accepted.items()))
        grader = str(c.grader_model) if c.scoring == JudgeScoring.rubric else None
        return judges.vlm_judge(str(c.judge_model), c.judge_samples, ctx.seed, accepted, grader)

    def recognition(self, ctx: RunContext, judge: judges.Judge, targets: list[Target], images: list[Image.Image]) -> dict[str, float]:
        """Recognition rate per category and protocol, with the other-concepts null and a permutation p.

        A score may be NaN (a rubric grader whose replies gave no verdict): rates are means over the
        scores there are, and `<key>_unparseable` counts the grades without a verdict.
        """
        table = judge.judge(images, [t.name for t in targets], [t.category for t in targets])
        metrics: dict[str, float] = {f"judge_ceiling_{k}": v for k, v in getattr(judge, "ceiling", {}).items()}
        rows = []
        rng = np.random.default_rng(ctx.seed)
        for (category, protocol), group in table.groupby(["category", "protocol"]):
            answers, names, questions = group["answer"].tolist(), group["concept"].tolist(), group["question"].tolist()
            scores = np.array([[judge.score(a, c, q) for c in names] for a, q in zip(answers, questions)])  # (image, concept)
            n = len(names)
            observed = finite_mean(np.diag(scores))
            null_mean = finite_mean(scores[~np.eye(n, dtype=bool)]) if n > 1 else float("nan")
            null = np.array([finite_mean(scores[np.arange(n), rng.permutation(n)]) for _ in range(self.config.n_permutations)])
            key = f"recognition_{category or 'all'}" + ("" if protocol in ("programmatic", "category_hint") else f"_{protocol}")
            p_value = pvalue(observed, null)
            metrics |= {key: observed, f"{key}_null_mean": null_mean, f"{key}_p": p_value}
            row = {"category": category, "protocol": protocol, "n_concepts": n, "recognition_rate": observed, "null_rate": null_mean, "p": p_value}
            if "n_unparseable" in group:
                metrics[f"{key}_unparseable"] = int(group["n_unparseable"].sum())
                row["n_unparseable"] = int(group["n_unparseable"].sum())
            rows.append(row)
        if table.empty:
            log.warning("the %s judge judges none of these concepts' categories", self.config.judge)
        if isinstance(judge, api_judge.APIJudge):
            metrics["judge_requests"] = judge.requests
        ctx.table("judgements", table)
        ctx.table("recognition", pd.DataFrame(rows))
        return metrics

    # 5. the apples/oranges check ----------------------------------------------------------
    def alignment_dataset(self, dataset: ConceptDataset) -> ConceptDataset:
        """The alignment concepts and their real images, checked before any synthesis."""
        names = list(self.config.alignment_concepts)
        unknown = [n for n in names if n not in {c.name for c in dataset.concepts}]
        if unknown:
            raise DatasetError(
                f"experiment.alignment_concepts has {unknown}, not concepts of dataset {dataset.name!r}; pick from {[c.name for c in dataset.concepts]}"
            )
        images = [img for img in dataset.images if img.concept in names]
        if {img.concept for img in images} != set(names):
            raise DatasetError(f"experiment.alignment_concepts={names} need images of each in dataset {dataset.name!r}")
        return ConceptDataset(f"{dataset.name}_alignment", without_partners_outside(dataset.concept(n) for n in names), images)

    def white_noise_tokens(self, ctx: RunContext, layers: list[int]) -> dict[int, torch.Tensor] | None:
        """Image-token residuals of `alignment_noise_images` uniform-noise images (seeded), per layer."""
        n = self.config.alignment_noise_images
        if n == 0:
            return None
        rng = np.random.default_rng(ctx.seed)
        side = ctx.model.synthesis_side()
        noise = [Image.fromarray(rng.integers(0, 256, size=(side, side, 3), dtype=np.uint8)) for _ in range(n)]
        return square_image_tokens(ctx.model, noise, ctx.positions.image_prompt, ctx.positions.use_chat_template, layers)

    def alignment(self, ctx: RunContext, subset: ConceptDataset) -> dict[str, float]:
        """Appendix A at every layer up to the model's last, for the alignment concepts (two or more)."""
        names = tuple(self.config.alignment_concepts)
        layers = list(range(ctx.model.num_layers))
        image_acts = ctx.activations(layers, dataset=subset, modalities=("image",))
        vectors = self.text_vectors(ctx, [c.text for c in subset.concepts], layers)
        grey = Image.new("RGB", (ctx.model.synthesis_side(),) * 2, (128, 128, 128))
        grey_tokens = square_image_tokens(ctx.model, [grey], ctx.positions.image_prompt, ctx.positions.use_chat_template, layers)
        grey_means = {layer: tokens[0].mean(dim=0) for layer, tokens in grey_tokens.items()}
        noise_tokens = self.white_noise_tokens(ctx, layers)
        labels = np.array([names.index(c) for c in image_acts[layers[0]].image_concepts])
        pairs, summary = apples_oranges(
            vectors,
            {layer: image_acts[layer].image_tokens.dense() for layer in layers},
            grey_means,
            labels,
            names,
            self.config.n_permutations,
            ctx.seed,
            noise_tokens,
        )
        ctx.table("alignment_pairs", pairs)
        ctx.table("alignment", summary)
        ctx.figure("alignment", figures.apples_oranges(pairs, summary, names, ctx.layer))
        here = summary.set_index("layer").loc[ctx.layer]
        noise_keys = [k for k in ("matched_minus_noise", "matched_minus_noise_null_mean", "matched_minus_noise_p") if k in here]
        return {f"alignment_{k}": float(here[k]) for k in ("gap", "gap_null_mean", "gap_null_q025", "gap_null_q975", "gap_p", *noise_keys)} | {
            "alignment_layers_significant": int((summary["gap_p"] < 0.05).sum())
        }
