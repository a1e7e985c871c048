"""judge=openai_compatible against a real chat-completions server on 127.0.0.1 (tests/chat_server.py)."""

from __future__ import annotations

import json
import re
import socket

import numpy as np
import openai
import pandas as pd
import pytest
from PIL import Image

from tests.chat_server import ChatServer
from tests.conftest import run_in_process
from xmodal.errors import ConfigError
from xmodal.experiments.das.api_judge import APIJudge, ChatClient, JudgeAPIError
from xmodal.experiments.das.config import JudgeAPIConfig
from xmodal.experiments.das.judges import QUESTION, QUESTION_WITH_CATEGORY, parse_grade

KEY = "sk-test-never-logged"


def clients(server: ChatServer, tmp_path, **settings) -> tuple[ChatClient, ChatClient, list[float]]:
    config = JudgeAPIConfig(cache_dir=str(tmp_path / "judge_cache"), backoff_s=0.5, **settings)
    client = openai.OpenAI(api_key=KEY, base_url=server.base_url, max_retries=0, timeout=10)
    counter, slept = {"requests": 0}, []
    return ChatClient("asker-model", client, config, counter, slept.append), ChatClient("grader-model", client, config, counter, slept.append), slept


def grade_by_word(body: dict) -> tuple[int, str]:
    """Asker: 'dog' for the red image, 'cat' otherwise; grader: 1 when the response is the concept."""
    content = body["messages"][0]["content"]
    if body["model"] == "asker-model":
        url = content[1]["image_url"]["url"]
        return 200, "dog" if url == RED_URL[0] else "cat"
    response = re.search(r"<BEGIN RESPONSE> (.*) <END RESPONSE>", content).group(1)
    concept = re.search(r"sees '([^']*)' in the image", content).group(1)
    return 200, f"The answer names it.\nResult: {int(response == concept)}"


RED_URL: list[str] = []


def test_the_api_judge_asks_both_questions_ten_times_grades_each_answer_and_caches(tmp_path):
    from xmodal.experiments.das.api_judge import data_url

    red, blue = Image.new("RGB", (32, 32), (200, 0, 0)), Image.new("RGB", (32, 32), (0, 0, 200))
    RED_URL[:] = [data_url(red)]
    with ChatServer(grade_by_word) as server:
        asker, grader, _ = clients(server, tmp_path)
        judge = APIJudge(asker, grader, n_samples=10)
        table = judge.judge([red, blue], ["dog", "cat"], ["animal", "animal"])
        asked = [r for r in server.requests if r["model"] == "asker-model"]
        graded = [r for r in server.requests if r["model"] == "grader-model"]
        assert len(asked) == 2 * 2 * 10  # two images, two questions, ten samples each
        assert set(server.paths) == {"/v1/chat/completions"} and set(server.auth) == {f"Bearer {KEY}"}
        first = asked[0]["messages"]
        assert len(first) == 1 and first[0]["role"] == "user"
        text, image = first[0]["content"]
        assert text == {"type": "text", "text": QUESTION} and image["image_url"]["url"].startswith("data:image/png;base64,")
        questions = [r["messages"][0]["content"][0]["text"] for r in asked]
        assert questions.count(QUESTION) == 20 and questions.count(QUESTION_WITH_CATEGORY.format(category="animal")) == 20
        assert "What animal is in the image if you had to guess? One word." in questions
        # the rubric: Appendix E's text with the request, the response and the concept filled in
        prompt = graded[0]["messages"][0]["content"]
        assert prompt.startswith("Please carefully read the following user request") and f"<BEGIN REQUEST> {QUESTION} <END REQUEST>" in prompt
        assert prompt.endswith('End your answer with "Result: 0" or "Result: 1", depending on the score.')
        assert list(table["protocol"]) == ["no_hint", "category_hint"] * 2 and list(table["recognised"]) == [1.0, 1.0, 1.0, 1.0]
        assert (table["answer"].str.count(r" \| ") == 9).all() and (table["n_unparseable"] == 0).all()
        assert judge.score(table["answer"][0], "cat", QUESTION) == 0.0  # the dog image's answers against "cat"
        before = len(server.requests)
        again = APIJudge(*clients(server, tmp_path)[:2], n_samples=10).judge([red, blue], ["dog", "cat"], ["animal", "animal"])
        assert len(server.requests) == before  # every answer and grade from the disk cache
        pd.testing.assert_frame_equal(again, table)


@pytest.mark.parametrize(
    "reply, grade",
    [
        ("Result: 1", 1),
        ("It shows a dog.\nResult: 0", 0),
        ("**Result:** 1", 1),
        ("Result: 0 or Result: 1? ... Result: 1", 1),
        ("I cannot tell.", None),
        ("", None),
    ],
)
def test_rubric_replies_parse_to_0_1_or_unparseable(reply, grade):
    assert parse_grade(reply) == grade


def test_an_unparseable_grade_is_neither_0_nor_1(tmp_path):
    replies = iter(["Result: 1", "no verdict here", "Result: 0"])
    with ChatServer(lambda body: (200, next(replies))) as server:
        _, grader, _ = clients(server, tmp_path)
        judge = APIJudge(grader, grader)
        assert judge.grades("a | b | c", "dog", QUESTION) == [1, None, 0]
        assert judge.score("a | b | c", "dog", QUESTION) == 0.5  # one of the two parseable grades
    with ChatServer(lambda body: (200, "hmm")) as server:
        _, grader, _ = clients(server, tmp_path / "other")
        assert np.isnan(APIJudge(grader, grader).score("a", "dog", QUESTION))


def test_the_client_retries_after_429_and_500_with_backoff_and_keeps_to_its_budget(tmp_path):
    statuses = iter([(429, "slow down"), (500, "oops"), (200, "Result: 1")])
    with ChatServer(lambda body: next(statuses)) as server:
        asker, _, slept = clients(server, tmp_path)
        assert asker.complete("hello", "k") == "Result: 1"
        assert len(server.requests) == 3 and slept == [0.5, 1.0]
    with ChatServer(lambda body: (500, "down")) as server:
        asker, _, _ = clients(server, tmp_path / "budget", request_budget=3, max_retries=10)
        with pytest.raises(JudgeAPIError, match=r"request budget is spent \(experiment.judge_api.request_budget=3\)"):
            asker.complete("hello", "k")
        assert len(server.requests) == 3
    with ChatServer(lambda body: (401, f"Incorrect API key provided: {KEY}")) as server:
        asker, _, _ = clients(server, tmp_path / "refused")
        with pytest.raises(JudgeAPIError, match="AuthenticationError, HTTP 401") as err:
            asker.complete("hello", "k")
        assert KEY not in str(err.value) and len(server.requests) == 1  # no retry, and the key is not echoed


# Seasons in dataset order; the server answers image i's s-th sample "img<i>-s<s>" and grades it 1 for concept i when s < K.
SEASONS = ["spring", "summer", "autumn", "winter"]
K = {"no_hint": [2, 0, 5, 1], "category_hint": [6, 3, 10, 4]}
UNPARSEABLE = ("winter", "category_hint", 9)  # this grade's reply has no verdict


def scripted(body: dict, seen: dict) -> tuple[int, str]:
    content = body["messages"][0]["content"]
    if body["model"] == "asker":
        question, url = content[0]["text"], content[1]["image_url"]["url"]
        index = seen["images"].setdefault(url, len(seen["images"]))
        sample = seen["asked"].get((url, question), 0)
        seen["asked"][(url, question)] = sample + 1
        return 200, f"img{index}-s{sample % 10}"
    request = re.search(r"<BEGIN REQUEST> (.*) <END REQUEST>", content).group(1)
    image, sample = map(int, re.search(r"<BEGIN RESPONSE> img(\d+)-s(\d+) <END RESPONSE>", content).groups())
    concept = re.search(r"sees '([^']*)' in the image", content).group(1)
    protocol = "category_hint" if "season" in request else "no_hint"
    if (concept, protocol, sample) == UNPARSEABLE and image == SEASONS.index(concept):
        return 200, "I would rather not say."
    return 200, f"Result: {int(image == SEASONS.index(concept) and sample < K[protocol][SEASONS.index(concept)])}"


def das_overrides(tmp_path, *extra: str) -> list[str]:
    return [
        "experiment=das",
        "judge=openai_compatible",
        "dataset=das_appendix_e",
        "dataset.categories=[season]",
        "experiment.concepts=[]",
        "experiment.steps=2",
        "experiment.batch_size=2",
        "experiment.alignment_concepts=[]",
        "experiment.n_permutations=50",
        "experiment.judge_api.backoff_s=0",
        f"experiment.judge_api.cache_dir={tmp_path / 'judge_cache'}",
        f"paths.activation_cache={tmp_path / 'cache'}",
        *extra,
    ]


def judge_env(monkeypatch, base_url: str, key: str | None = KEY) -> None:
    monkeypatch.setenv("XMODAL_JUDGE_MODEL", "asker")
    monkeypatch.setenv("XMODAL_GRADER_MODEL", "grader")
    monkeypatch.setenv("XMODAL_JUDGE_BASE_URL", base_url)
    if key is None:
        monkeypatch.delenv("XMODAL_JUDGE_API_KEY", raising=False)
    else:
        monkeypatch.setenv("XMODAL_JUDGE_API_KEY", key)


def test_das_with_the_api_judge_reports_the_servers_scripted_recognition_rates(tmp_path, monkeypatch):
    seen: dict = {"images": {}, "asked": {}}
    with ChatServer(lambda body: scripted(body, seen)) as server:
        judge_env(monkeypatch, server.base_url)
        assert run_in_process(*das_overrides(tmp_path), run_dir=tmp_path / "run") == 0
        result = json.loads((tmp_path / "run" / "result.json").read_text())
        metrics = result["metrics"]
        hint = [k / 10 for k in K["category_hint"]]
        hint[3] = K["category_hint"][3] / 9  # winter: one of its ten grades did not parse
        assert metrics["recognition_season_no_hint"] == pytest.approx(np.mean(K["no_hint"]) / 10)
        assert metrics["recognition_season"] == pytest.approx(np.mean(hint))
        assert metrics["recognition_season_unparseable"] == 1 and metrics["recognition_season_no_hint_unparseable"] == 0
        assert metrics["recognition_season_null_mean"] == 0.0 and 0 < metrics["recognition_season_p"] <= 1
        assert len(seen["images"]) == 4 and sum(r["model"] == "asker" for r in server.requests) == 4 * 2 * 10  # four different images
        judgements = pd.read_parquet(tmp_path / "run" / "tables" / "judgements.parquet")
        assert list(judgements["concept"].unique()) == SEASONS and len(judgements) == 8
        assert KEY not in (tmp_path / "run" / ".hydra" / "config.yaml").read_text()
        assert not any(KEY in p.read_text(errors="ignore") for p in (tmp_path / "run").rglob("*") if p.is_file() and p.suffix in (".log", ".json", ".yaml"))
        before = len(server.requests)
        assert run_in_process(*das_overrides(tmp_path), run_dir=tmp_path / "rerun") == 0
        assert len(server.requests) == before  # the rerun costs zero requests
        rerun = json.loads((tmp_path / "rerun" / "result.json").read_text())["metrics"]
        assert rerun["recognition_season"] == metrics["recognition_season"] and rerun["judge_requests"] == 0


def test_a_missing_key_names_its_variable_and_an_unreachable_judge_leaves_no_result(tmp_path, monkeypatch):
    judge_env(monkeypatch, "http://127.0.0.1:9/v1", key=None)
    assert run_in_process(*das_overrides(tmp_path), run_dir=tmp_path / "nokey") == 2
    failure = json.loads((tmp_path / "nokey" / "failure.json").read_text())
    assert "XMODAL_JUDGE_API_KEY" in failure["error"] and "\n" not in failure["error"]
    assert not (tmp_path / "nokey" / "result.json").exists() and not (tmp_path / "nokey" / "tables").exists()  # failed before synthesis

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    judge_env(monkeypatch, f"http://127.0.0.1:{port}/v1")
    assert run_in_process(*das_overrides(tmp_path, "experiment.judge_api.max_retries=1"), run_dir=tmp_path / "down") == 2
    failure = json.loads((tmp_path / "down" / "failure.json").read_text())
    assert failure["error"].startswith(f"the judge at http://127.0.0.1:{port}/v1/ gave no answer after 2 tries (APIConnectionError)")
    assert not (tmp_path / "down" / "result.json").exists()
    assert not (tmp_path / "down" / "tables" / "recognition.parquet").exists() and not (tmp_path / "down" / "tables" / "judgements.parquet").exists()


class ScriptedGrader:
    """A Chat that answers the rubric from a list, recording each prompt."""

    def __init__(self, replies: list[str]) -> None:
        self.replies, self.prompts = iter(replies), []

    def complete(self, content, cache_key: str) -> str:
        self.prompts.append(content)
        return next(self.replies)


def test_scoring_rubric_grades_the_vlm_judges_answers_and_match_keeps_word_matching(tiny):
    from xmodal.experiments.das.config import DASConfig
    from xmodal.experiments.das.judges import LocalGrader, VLMJudge

    grader = ScriptedGrader(["Result: 1", "unsure", "Result: 0"])
    judge = VLMJudge(tiny, grader=grader)
    assert judge.score("dog | ? | cat", "dog", QUESTION) == 0.5 and len(grader.prompts) == 3
    assert "<BEGIN RESPONSE> cat <END RESPONSE>" in grader.prompts[2] and "sees 'dog' in the image" in grader.prompts[2]
    assert VLMJudge(tiny).score("a dog | a cat", "dog") == 0.5  # scoring=match: whole-word matching, no grader
    local = LocalGrader(tiny, max_new_tokens=3)
    reply = local.complete("Result?", "k")
    assert isinstance(reply, str) and local.complete("other", "k") == reply  # kept by key: one generation
    with pytest.raises(ConfigError, match="experiment.scoring=rubric needs experiment.grader_model"):
        DASConfig(judge="vlm", judge_model="tiny", scoring="rubric").validate()
    DASConfig(judge="vlm", judge_model="tiny", scoring="match").validate()


def test_the_apples_oranges_preset_runs_on_an_image_folder(tmp_path):
    """experiment=das_apples_oranges_gemma3_4b on the tiny model (the tests' config picks synthetic shapes, so dataset= is named again)."""
    for concept, colour in (("apple", (200, 20, 20)), ("orange", (250, 150, 0))):
        (tmp_path / "photos" / concept).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (48, 48), tuple(max(0, c - 20 * i) for c in colour)).save(tmp_path / "photos" / concept / f"{i}.png")
    overrides = (
        "experiment=das_apples_oranges_gemma3_4b",
        "model=tiny",
        "dataset=image_folder",
        f"dataset.root={tmp_path / 'photos'}",
        "experiment.n_permutations=20",
        "experiment.alignment_noise_images=2",
    )
    assert run_in_process(*overrides, f"paths.activation_cache={tmp_path / 'cache'}", run_dir=tmp_path / "run") == 0
    alignment = pd.read_parquet(tmp_path / "run" / "tables" / "alignment.parquet")
    assert list(alignment["layer"]) == list(range(6)) and alignment["gap_p"].between(0, 1).all()
    assert "alignment_gap_p" in json.loads((tmp_path / "run" / "result.json").read_text())["metrics"]
