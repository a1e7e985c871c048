"""Independent judges of whether a synthesised image shows its concept.

- A programmatic judge (offline): where the images' world is known, a program reads
  them. The organism ships one (`xmodal.organism.judge.OrganismJudge`); the DAS config
  names its class in `programmatic_judge`, so this module never imports the organism.
- `VLMJudge` (real models): another VLM, loaded through the adapters, asked seed
  004's two questions (without and with the category) and scored against a rubric: the
  answers that name each concept (its word, the word's forms, and synonyms from the
  dataset or the config), each matched as a whole word. Seed 004 scores with GPT-5-mini
  and a binary rubric instead; this one is offline, deterministic and written to a table.

- `APIJudge` (`api_judge.py`, judge=openai_compatible): seed 004's own protocol over a
  chat-completions API, graded with Appendix E's rubric by a second model.

Every judge has `judge(images, concepts, categories)`, returning one row per (image,
protocol) with `recognised` in [0, 1] (NaN where no grade parsed), and
`score(answer, concept, question)`.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Protocol, Sequence

import numpy as np
import pandas as pd
import torch
from hydra.utils import get_class
from PIL import Image

from xmodal.metrics.mentions import mentions, word_forms
from xmodal.models.base import ModelAdapter
from xmodal.models.generation import describe_images
from xmodal.models.named import load_named_model

QUESTION = "What is in the image if you had to guess? One word."
QUESTION_WITH_CATEGORY = "What {category} is in the image if you had to guess? One word."
JUDGEMENT_COLUMNS = ["concept", "category", "protocol", "question", "answer", "recognised"]
# Appendix E's rubric, as printed (the extracted text's line-number markers removed).
RUBRIC = (
    "Please carefully read the following user request (denoted as 'REQUEST') and response (denoted as 'RESPONSE'). "
    "<BEGIN REQUEST> {request} <END REQUEST> <BEGIN RESPONSE> {response} <END RESPONSE> "
    "You are evaluating a model that answered a question (REQUEST) about an image. Analyze the RESPONSE, then score it according to the following rubric: "
    "0: In the span of the answer, the model doesn't mention it sees '{concept}' in the image. E.g. it mentions other concepts, but not '{concept}'. "
    "1: In the span of the answer, the model does mention it sees '{concept}' in the image. Either it does so explicitly, or it is clear from the "
    "context of the REQUEST and the content of the RESPONSE. It is okay if it mentions other things in addition to '{concept}'. "
    'End your answer with "Result: 0" or "Result: 1", depending on the score.'
)
RESULT = re.compile(r"Result\s*:\s*\**\s*([01])\b")


def parse_grade(reply: str) -> int | None:
    """The rubric's verdict: the last "Result: 0/1" in the reply, or None when there is none (unparseable)."""
    found = RESULT.findall(reply or "")
    return int(found[-1]) if found else None


class Chat(Protocol):
    def complete(self, content: Any, cache_key: str) -> str: ...


def rubric_grades(grader: Chat, answer: str, concept: str, question: str) -> list[int | None]:
    """Appendix E's rubric grade of each sampled answer (joined by ' | '); None where the reply has no verdict."""
    grades = []
    for response in answer.split(" | "):
        prompt = RUBRIC.format(request=question, response=response, concept=concept)
        grades.append(parse_grade(grader.complete(prompt, prompt)))
    return grades


def parseable_mean(grades: Sequence[int | None]) -> float:
    """Fraction of the parseable grades that are 1; NaN when none parses (never taken as 0 or 1)."""
    parsed = [g for g in grades if g is not None]
    return float(np.mean(parsed)) if parsed else float("nan")


class LocalGrader:
    """A local model (text in, text out, greedy) answering the rubric; replies kept in memory by prompt."""

    def __init__(self, adapter: ModelAdapter, max_new_tokens: int = 64) -> None:
        self.adapter, self.max_new_tokens, self.replies = adapter, max_new_tokens, {}

    def complete(self, content: Any, cache_key: str) -> str:
        if cache_key not in self.replies:
            self.replies[cache_key] = self.generate(str(content))
        return self.replies[cache_key]

    @torch.inference_mode()
    def generate(self, prompt: str) -> str:
        adapter = self.adapter
        rendered = adapter.render_prompt(prompt, False, True)
        bos = getattr(adapter.tokenizer, "bos_token", None)
        inputs = adapter.tokenizer([rendered], return_tensors="pt", add_special_tokens=not (bos and rendered.startswith(bos))).to(adapter.device)
        out = adapter.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        return adapter.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


class Judge(Protocol):
    def judge(self, images: Sequence[Image.Image], concepts: Sequence[str], categories: Sequence[str]) -> pd.DataFrame: ...

    def score(self, answer: str, concept: str, question: str = "") -> float: ...


def rubric(words: Mapping[str, str], synonyms: Mapping[str, Sequence[str]], with_forms: bool = True) -> dict[str, list[str]]:
    """Concept name -> the answers that name it: its word and synonyms, with their forms if `with_forms`."""
    out = {}
    for name, word in words.items():
        accepted = [word, *synonyms.get(name, ())]
        out[name] = sorted({form for a in accepted for form in (word_forms(a) if with_forms else [" ".join(a.lower().split())])})
    return out


def rubric_table(accepted: Mapping[str, Sequence[str]]) -> pd.DataFrame:
    return pd.DataFrame({"concept": list(accepted), "accepted": [" | ".join(a) for a in accepted.values()]})


class VLMJudge:
    """Another VLM asked seed 004's questions, `n_samples` seeded samples each, scored against a rubric.

    `accepted` maps a concept name to the answers that name it (`rubric()`); a concept it lacks
    is named only by its own name.
    """

    def __init__(
        self,
        adapter: ModelAdapter,
        n_samples: int = 10,
        seed: int = 0,
        max_new_tokens: int = 8,
        accepted: Mapping[str, Sequence[str]] | None = None,
        grader: Chat | None = None,
    ) -> None:
        self.adapter, self.n_samples, self.seed, self.max_new_tokens = adapter, n_samples, seed, max_new_tokens
        self.accepted = dict(accepted or {})
        self.grader = grader  # None: scoring=match (word match); else scoring=rubric (Appendix E's rubric, this model grading)

    def score(self, answer: str, concept: str, question: str = "") -> float:
        """scoring=match: fraction of the sampled answers (joined by ' | ') that name the concept (the question plays no part).
        scoring=rubric: fraction of the parseable rubric grades that are 1 (NaN when none parses)."""
        if self.grader is not None:
            return parseable_mean(rubric_grades(self.grader, answer, concept, question))
        words = self.accepted.get(concept, [concept])
        return float(np.mean([mentions(a, words) for a in answer.split(" | ")]))

    def judge(self, images: Sequence[Image.Image], concepts: Sequence[str], categories: Sequence[str]) -> pd.DataFrame:
        rows = []
        for image, concept, category in zip(images, concepts, categories):
            protocols = {"no_hint": QUESTION}
            if category:
                protocols["category_hint"] = QUESTION_WITH_CATEGORY.format(category=category)
            for protocol, question in protocols.items():
                answer = " | ".join(a.replace("|", "/") for a in self._answers(image, question))
                rows.append(
                    {
                        "concept": concept,
                        "category": category,
                        "protocol": protocol,
                        "question": question,
                        "answer": answer,
                        "recognised": self.score(answer, concept),
                    }
                )
        return pd.DataFrame(rows, columns=JUDGEMENT_COLUMNS)

    def _answers(self, image: Image.Image, question: str) -> list[str]:
        """`n_samples` sampled answers in one batch: rows sample independently from one seeded generator."""
        return describe_images(self.adapter, [image] * self.n_samples, question, True, self.max_new_tokens, self.n_samples, do_sample=True, seed=self.seed)


def vlm_judge(model_name: str, n_samples: int, seed: int, accepted: Mapping[str, Sequence[str]], grader_model: str | None = None) -> VLMJudge:
    """A VLMJudge from conf/model/<model_name>.yaml, loaded through the adapters; with `grader_model`, graded by that
    model with Appendix E's rubric (the judge's own adapter when it names the same model)."""
    adapter = load_named_model(model_name, key="experiment.judge_model")
    grader = None
    if grader_model is not None:
        grader = LocalGrader(adapter if grader_model == model_name else load_named_model(grader_model, key="experiment.grader_model"))
    return VLMJudge(adapter, n_samples=n_samples, seed=seed, accepted=accepted, grader=grader)


def programmatic_judge(class_path: str, seed: int) -> Judge:
    """The programmatic judge named by its import path (a class taking `seed`)."""
    return get_class(class_path)(seed=seed)
