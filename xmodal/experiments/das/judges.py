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

from typing import Mapping, Protocol, Sequence

import numpy as np
import pandas as pd
from hydra.utils import get_class
from PIL import Image

from xmodal.metrics.mentions import mentions, word_forms
from xmodal.models.base import ModelAdapter
from xmodal.models.generation import describe_images
from xmodal.models.named import load_named_model

QUESTION = "What is in the image if you had to guess? One word."
QUESTION_WITH_CATEGORY = "What {category} is in the image if you had to guess? One word."
JUDGEMENT_COLUMNS = ["concept", "category", "protocol", "question", "answer", "recognised"]


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
    ) -> None:
        self.adapter, self.n_samples, self.seed, self.max_new_tokens = adapter, n_samples, seed, max_new_tokens
        self.accepted = dict(accepted or {})

    def score(self, answer: str, concept: str, question: str = "") -> float:
        """Fraction of the sampled answers (joined by ' | ') that name the concept (the question plays no part)."""
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


def vlm_judge(model_name: str, n_samples: int, seed: int, accepted: Mapping[str, Sequence[str]]) -> VLMJudge:
    """A VLMJudge from conf/model/<model_name>.yaml, loaded through the adapters."""
    return VLMJudge(load_named_model(model_name, key="experiment.judge_model"), n_samples=n_samples, seed=seed, accepted=accepted)


def programmatic_judge(class_path: str, seed: int) -> Judge:
    """The programmatic judge named by its import path (a class taking `seed`)."""
    return get_class(class_path)(seed=seed)
