"""judge=openai_compatible: seed 004's judge protocol over a chat-completions API.

The paper asked GPT-5 two questions about every synthesised image (without and with the
category hint), took 10 samples per image and question, and graded each answer with
GPT-5-mini against the binary rubric printed in its Appendix E (`RUBRIC`), which ends in
"Result: 0" or "Result: 1". Here both models are reached through the `openai` client at
any OpenAI-compatible endpoint (OpenAI itself, vLLM, a local test server); the model names,
the base URL and the key come from the environment (`JudgeAPIConfig` names the variables),
and the key is never written to a config, a table or a log.

A grade that cannot be parsed is counted as unparseable: it is neither 0 nor 1, a score is
the mean over the parseable grades (NaN when there are none), and the tables and metrics
report how many there were.

The client retries 429s, 5xx replies, timeouts and refused connections with exponential
backoff, stops at a request budget, and caches every response on disk, keyed by the model,
the image's hash, the prompt and the sample index, so a rerun costs no requests.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import os
import time
from pathlib import Path
from typing import Callable, Sequence

import openai
import pandas as pd
from PIL import Image

from xmodal.errors import XmodalError
from xmodal.experiments.das.config import JudgeAPIConfig
from xmodal.experiments.das.judges import JUDGEMENT_COLUMNS, QUESTION, QUESTION_WITH_CATEGORY, parseable_mean, rubric_grades

log = logging.getLogger(__name__)

RETRIED = (openai.RateLimitError, openai.InternalServerError, openai.APIConnectionError)  # APITimeoutError is an APIConnectionError


class JudgeAPIError(XmodalError):
    """The judge's API could not answer: unreachable, refused, or out of budget."""


def image_hash(image: Image.Image) -> str:
    """Hash of the pixels, mode and size (not of an encoding, which may differ across Pillow versions)."""
    digest = hashlib.sha256(f"{image.mode}:{image.size}".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


class ChatClient:
    """One model at one chat-completions endpoint, with retries, a request budget (shared through `counter`) and a disk cache."""

    def __init__(
        self, model: str, client: openai.OpenAI, settings: JudgeAPIConfig, counter: dict[str, int], sleep: Callable[[float], None] = time.sleep
    ) -> None:
        self.model, self.client, self.settings, self.counter, self.sleep = model, client, settings, counter, sleep
        self.cache_dir = Path(settings.cache_dir)

    def complete(self, content: list[dict] | str, cache_key: str) -> str:
        """The reply to one user message, from the cache when this model answered the same key before."""
        digest = hashlib.sha256(json.dumps([self.model, cache_key]).encode()).hexdigest()
        path = self.cache_dir / digest[:2] / f"{digest}.json"
        if path.exists():
            return json.loads(path.read_text())["reply"]
        reply = self.request(content)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"model": self.model, "key": cache_key, "reply": reply}))
        os.replace(tmp, path)
        return reply

    def request(self, content: list[dict] | str) -> str:
        """One chat completion; retried with exponential backoff on 429, 5xx, timeouts and refused connections."""
        s = self.settings
        for attempt in range(s.max_retries + 1):
            if self.counter["requests"] >= s.request_budget:
                raise JudgeAPIError(
                    f"the judge's request budget is spent (experiment.judge_api.request_budget={s.request_budget}); raise it, or rerun to continue from the cache"
                )
            self.counter["requests"] += 1
            try:
                response = self.client.chat.completions.create(model=self.model, messages=[{"role": "user", "content": content}])
                return response.choices[0].message.content or ""
            except RETRIED as err:
                if attempt == s.max_retries:
                    raise JudgeAPIError(
                        f"the judge at {self.client.base_url} gave no answer after {attempt + 1} tries ({describe(err)}); "
                        f"check ${s.base_url_env} and that the server is up"
                    ) from None
                wait = s.backoff_s * 2**attempt
                log.warning("judge request failed (%s); retry %d of %d in %.1f s", describe(err), attempt + 1, s.max_retries, wait)
                self.sleep(wait)
            except openai.APIStatusError as err:  # 400, 401, 404 ...: retrying cannot help
                raise JudgeAPIError(
                    f"the judge at {self.client.base_url} refused model {self.model!r}: {describe(err)}; check ${s.model_env}, ${s.grader_model_env} and ${s.key_env}"
                ) from None
        raise AssertionError("unreachable: the loop returns or raises")


def describe(err: openai.OpenAIError) -> str:
    """The error's kind and HTTP status, without its body (which may echo the key)."""
    status = getattr(err, "status_code", None)
    return f"{type(err).__name__}" + (f", HTTP {status}" if status is not None else "")


def from_environment(settings: JudgeAPIConfig) -> tuple[ChatClient, ChatClient]:
    """(asker, grader) from the variables `settings` names; one line naming every one unset."""
    names = [settings.model_env, settings.grader_model_env, settings.base_url_env, settings.key_env]
    missing = [n for n in names if not os.environ.get(n, "").strip()]
    if missing:
        raise JudgeAPIError(
            f"experiment.judge=openai_compatible needs the environment variable(s) {', '.join(missing)}; set them (the key is read from ${settings.key_env})"
        )
    client = openai.OpenAI(api_key=os.environ[settings.key_env], base_url=os.environ[settings.base_url_env], max_retries=0, timeout=settings.timeout_s)
    counter = {"requests": 0}
    asker = ChatClient(os.environ[settings.model_env], client, settings, counter)
    grader = ChatClient(os.environ[settings.grader_model_env], client, settings, counter)
    for name in ("httpx", "httpx2"):  # one INFO line per request otherwise
        logging.getLogger(name).setLevel(logging.WARNING)
    log.info("judge: %s asks, %s grades, at %s (key from $%s)", asker.model, grader.model, client.base_url, settings.key_env)
    return asker, grader


class APIJudge:
    """Seed 004's protocol: `n_samples` answers per image and question from `asker`, each graded by `grader` with Appendix E's rubric."""

    def __init__(self, asker: ChatClient, grader: ChatClient, n_samples: int = 10) -> None:
        self.asker, self.grader, self.n_samples = asker, grader, n_samples

    @property
    def requests(self) -> int:
        return self.asker.counter["requests"]

    def answers(self, image: Image.Image, question: str) -> list[str]:
        content = [{"type": "text", "text": question}, {"type": "image_url", "image_url": {"url": data_url(image)}}]
        key = image_hash(image)
        return [self.asker.complete(content, f"{key}|{question}|{i}") for i in range(self.n_samples)]

    def grades(self, answer: str, concept: str, question: str) -> list[int | None]:
        """One rubric grade per sampled answer (joined by ' | '); None where the grader's reply has no verdict."""
        return rubric_grades(self.grader, answer, concept, question)

    def score(self, answer: str, concept: str, question: str = "") -> float:
        """Fraction of the parseable grades that are 1; NaN when none parses."""
        return parseable_mean(self.grades(answer, concept, question))

    def judge(self, images: Sequence[Image.Image], concepts: Sequence[str], categories: Sequence[str]) -> pd.DataFrame:
        rows = []
        for image, concept, category in zip(images, concepts, categories):
            protocols = {"no_hint": QUESTION}
            if category:
                protocols["category_hint"] = QUESTION_WITH_CATEGORY.format(category=category)
            for protocol, question in protocols.items():
                answer = " | ".join(a.replace("|", "/").strip() for a in self.answers(image, question))
                grades = self.grades(answer, concept, question)
                rows.append(
                    {
                        "concept": concept,
                        "category": category,
                        "protocol": protocol,
                        "question": question,
                        "answer": answer,
                        "recognised": parseable_mean(grades),
                        "n_unparseable": sum(g is None for g in grades),
                    }
                )
        return pd.DataFrame(rows, columns=[*JUDGEMENT_COLUMNS, "n_unparseable"])
