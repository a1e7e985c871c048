"""DASynthesis's settings (conf/experiment/das.yaml selects them).

Where seed 004's text lost a number, the default is xmodal's choice (see experiments/das/README.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Optional

from xmodal.config import ExperimentConfig
from xmodal.errors import ConfigError
from xmodal.experiments.das.synthesis import DASSettings


class ConceptSource(StrEnum):
    text = "text"  # seed 004: the concept word's representation
    image = "image"  # a positive control: the concept's images minus all images


class ConceptBaseline(StrEnum):
    appendix_c = "appendix_c"  # seed 004: minus the mean of Appendix C's 100 baseline words
    concept_set = "concept_set"  # also minus the mean of the concepts at hand


class Aggregation(StrEnum):
    weighted = "weighted"  # section 2.2: semantic weights and a Gaussian centre prior
    mean = "mean"  # Appendix G's ablation


class PriorPlacement(StrEnum):
    """Where section 2.2's log centre prior enters the softmax; the extracted text does not say."""

    inside = "inside"  # softmax((cos + log prior) / temperature): the temperature sharpens the prior too
    outside = "outside"  # softmax(cos / temperature + log prior): the prior keeps its width


class Upsample(StrEnum):
    bicubic = "bicubic"
    bilinear = "bilinear"


class JudgeKind(StrEnum):
    organism = "organism"  # the programmatic judge named by programmatic_judge (the organism's world)
    vlm = "vlm"  # another VLM (judge_model) asked seed 004's questions
    openai_compatible = "openai_compatible"  # seed 004's protocol: a chat-completions API asks, a second model grades by Appendix E's rubric
    none = "none"


class JudgeScoring(StrEnum):
    """How judge=vlm scores its answers (judge=openai_compatible always grades with the rubric)."""

    match = "match"  # the answers that name the concept, matched as whole words (offline, deterministic)
    rubric = "rubric"  # seed 004: Appendix E's binary rubric, answered by grader_model ("Result: 0/1")


@dataclass
class JudgeAPIConfig:
    """judge=openai_compatible: where the chat-completions API is. Values come from the environment.

    The config holds only the names of the variables, never the key itself.
    """

    model_env: str = "XMODAL_JUDGE_MODEL"  # the model asked seed 004's questions (the paper: gpt-5)
    grader_model_env: str = "XMODAL_GRADER_MODEL"  # the rubric grader (the paper: gpt-5-mini)
    base_url_env: str = "XMODAL_JUDGE_BASE_URL"  # e.g. https://api.openai.com/v1, or a local vLLM server's /v1
    key_env: str = "XMODAL_JUDGE_API_KEY"
    request_budget: int = 20000  # HTTP requests this job may send (retries count; cached answers do not)
    max_retries: int = 5  # tries after the first on 429, 5xx, timeouts and refused connections
    backoff_s: float = 2.0  # wait before the first retry, doubled before each next one
    timeout_s: float = 120.0  # per request
    cache_dir: str = "${paths.cache_dir}/judge_api"  # responses, keyed by model, image hash, prompt and sample index

    def validate(self) -> None:
        if self.request_budget < 1 or self.max_retries < 0 or self.backoff_s < 0 or self.timeout_s <= 0:
            raise ConfigError(
                f"experiment.judge_api has request_budget={self.request_budget}, max_retries={self.max_retries}, backoff_s={self.backoff_s}, "
                f"timeout_s={self.timeout_s}; the budget must be at least 1, retries and backoff at least 0, the timeout positive"
            )


@dataclass
class DASConfig(ExperimentConfig):
    _target_: str = "xmodal.experiments.das.experiment.DASynthesis"
    name: str = "das"
    concepts: list[str] = field(default_factory=lambda: ["red", "blue"])  # dataset concept names/texts, or bare words; [] = all the dataset's
    concepts_per_pass: int = 8  # concepts optimised together in one forward pass
    steps: int = 600
    batch_size: int = 8  # augmented copies per concept per step
    momentum: float = 0.9
    max_grad_norm: float = 1.0
    lr: Optional[float] = None  # None: layer_lr's preset
    temperature: Optional[float] = None  # None: layer_temperature's preset
    # Appendix E (Gemma 3 4B, 34 layers); other models use the entry at the nearest relative depth.
    layer_lr: dict[int, float] = field(default_factory=dict)
    layer_temperature: dict[int, float] = field(default_factory=dict)
    preset_num_layers: int = 34
    sigma_start: float = 0.2  # centre prior width (image sides), growing linearly ...
    sigma_end: float = 1.0  # ... to this at the last step
    resolutions: Optional[list[int]] = None  # component sides; None: 1, 2, 3, 4, 6, 8, 12 ... up to the image side
    shift: Optional[int] = None  # largest random shift in pixels; None: image side / 16
    noise_std: float = 0.1
    aggregation: Aggregation = Aggregation.weighted
    prior_placement: PriorPlacement = PriorPlacement.inside
    upsample: Upsample = Upsample.bicubic
    prompt: str = ""  # text after the image in the user turn
    judge: JudgeKind = JudgeKind.organism
    programmatic_judge: str = "xmodal.organism.judge.OrganismJudge"  # the class judge=organism builds (import path)
    judge_model: Optional[str] = None  # a conf/model name, for judge=vlm
    scoring: JudgeScoring = JudgeScoring.match  # judge=vlm: word match, or Appendix E's rubric graded by grader_model
    grader_model: Optional[str] = None  # a conf/model name (a text LLM, or the judge itself), for scoring=rubric
    judge_samples: int = 10
    judge_api: JudgeAPIConfig = field(default_factory=JudgeAPIConfig)  # judge=openai_compatible's client
    judge_word_forms: bool = True  # the rubric also accepts the word's forms (swim, swam for swimming)
    judge_synonyms: dict[str, list[str]] = field(default_factory=dict)  # concept name -> more answers that name it
    alignment_concepts: list[str] = field(default_factory=list)  # two or more dataset concepts for the apples/oranges check
    alignment_noise_images: int = 16  # Appendix A/D's white-noise control images for that check (0: none)
    n_permutations: int = 1000
    concept_source: ConceptSource = ConceptSource.text
    concept_baseline: ConceptBaseline = ConceptBaseline.appendix_c

    def validate(self) -> None:
        super().validate()
        if self.judge == JudgeKind.vlm and not self.judge_model:
            raise ConfigError("experiment.judge=vlm needs experiment.judge_model=<a conf/model name>, e.g. gemma3_12b")
        self.judge_api.validate()
        if self.judge == JudgeKind.vlm and self.scoring == JudgeScoring.rubric and not self.grader_model:
            raise ConfigError(
                "experiment.scoring=rubric needs experiment.grader_model=<a conf/model name> to grade with Appendix E's rubric, or use scoring=match"
            )
        if len(self.concepts) == 1:
            raise ConfigError(
                f"experiment.concepts={list(self.concepts)} needs at least two concepts (each is the other's control), or [] for all the dataset's"
            )
        alignment = list(self.alignment_concepts)
        if len(alignment) == 1 or len(set(alignment)) != len(alignment):
            raise ConfigError(f"experiment.alignment_concepts={alignment} must name two or more different concepts (or none)")
        if self.steps < 1 or self.batch_size < 1:
            raise ConfigError(f"experiment.steps={self.steps} and experiment.batch_size={self.batch_size} must be at least 1")
        self.require_at_least_one("concepts_per_pass", "n_permutations")
        if self.alignment_noise_images < 0:
            raise ConfigError(f"experiment.alignment_noise_images={self.alignment_noise_images} must be 0 (no control) or more")

    def settings(self, lr: float, temperature: float) -> DASSettings:
        """The synthesis settings at one layer, given its learning rate and temperature."""
        return DASSettings(
            steps=self.steps,
            batch_size=self.batch_size,
            lr=lr,
            momentum=self.momentum,
            max_grad_norm=self.max_grad_norm,
            temperature=temperature,
            sigma_start=self.sigma_start,
            sigma_end=self.sigma_end,
            resolutions=list(self.resolutions) if self.resolutions is not None else None,
            shift=self.shift,
            noise_std=self.noise_std,
            aggregation=str(self.aggregation),
            prior_placement=str(self.prior_placement),
            upsample=str(self.upsample),
            prompt=self.prompt,
        )
