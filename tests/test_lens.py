"""LogitLens: the read-outs against planted truth, and the study's contract through the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.conftest import run_cli
from xmodal.activations.extract import LayerActivations
from xmodal.errors import ConfigError
from xmodal.experiments.lens.config import LensConfig
from xmodal.experiments.lens.experiment import LogitLens, among_concepts_hits, vocabulary_hits

MEASURES = ("image_logit_lens_topk", "image_logit_lens_concept", "image_nearest_word", "text_logit_lens_topk", "text_logit_lens_concept")


def planted_activations(image_follows_word: bool, n_concepts: int = 12, images_per_concept: int = 4, seed: int = 0) -> LayerActivations:
    """Word residuals at random; each image's tokens are its own concept's word residual plus noise
    (`image_follows_word`), or another draw that has nothing to do with the words."""
    rng = np.random.default_rng(seed)
    width, tokens = 32, 6
    words = rng.normal(size=(n_concepts, width))
    sources = words if image_follows_word else rng.normal(size=(n_concepts, width))
    owners = np.repeat(np.arange(n_concepts), images_per_concept)
    image_tokens = sources[owners][:, None, :] + 0.3 * rng.normal(size=(len(owners), tokens, width))
    names = [f"c{i}" for i in range(n_concepts)]
    return LayerActivations(
        layer=0,
        concepts=names,
        text_tokens=torch.tensor(words, dtype=torch.float32),
        text_offsets=torch.arange(n_concepts + 1),
        image_concepts=[names[o] for o in owners],
        image_sources=[f"img{i}" for i in range(len(owners))],
        image_tokens=torch.tensor(image_tokens, dtype=torch.float32),
        image_eoi=torch.zeros(len(owners), width),
    )


def nearest_word_rate(acts: LayerActivations) -> tuple[float, float, float]:
    study = LogitLens(LensConfig(n_permutations=200))
    hits = among_concepts_hits(study.nearest_word_similarity(acts), k=1)
    labels = np.array([acts.concepts.index(c) for c in acts.image_concepts])
    row = study.rates_with_null({"image_nearest_word": hits}, {"image_nearest_word": labels}, np.zeros(len(acts.concepts), dtype=int), seed=0).iloc[0]
    return row["rate"], row["null_q975"], row["p"]


def test_images_planted_on_their_words_find_them_as_nearest_words():
    rate, null_q975, p = nearest_word_rate(planted_activations(image_follows_word=True))
    assert rate == 1.0 and p < 0.01 and rate > null_q975


def test_images_unrelated_to_the_words_sit_at_the_null():
    rate, null_q975, p = nearest_word_rate(planted_activations(image_follows_word=False))
    assert p > 0.05 and rate <= null_q975


def test_vocabulary_and_among_concept_hits():
    logprobs = torch.full((2, 50), -10.0)
    logprobs[0, 7] = 0.0  # row 0's top token is concept 1's word
    logprobs[1, 3] = -1.0  # row 1 prefers concept 0 ...
    logprobs[1, 9] = -2.0  # ... then concept 2
    word_ids = [[3], [7, 8], [9]]
    assert vocabulary_hits(logprobs, word_ids, k=1).tolist() == [[False, True, False], [True, False, False]]
    assert vocabulary_hits(logprobs, word_ids, k=2)[1].tolist() == [True, False, True]
    scores = np.array([[0.1, 0.9, 0.5], [0.8, 0.1, 0.2]])
    assert among_concepts_hits(scores, k=2).tolist() == [[False, True, True], [True, False, True]]


def test_a_model_without_an_unembedding_is_one_clear_error(tiny, monkeypatch):
    monkeypatch.setattr(tiny.model, "get_output_embeddings", lambda: None)
    with pytest.raises(ConfigError, match="has no unembedding"):
        tiny.logit_lens(torch.zeros(2, tiny.hidden_size))


def test_the_cli_sweep_writes_the_study_and_its_layer_curves(tmp_path):
    result = run_cli("-m", "experiment=lens", "layer=1,3", "experiment.n_permutations=50", "experiment.concept_top_k=2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    records = [json.loads(p.read_text()) for p in (tmp_path / "outputs").rglob("result.json")]
    assert sorted(r["layer"] for r in records) == [1, 3]
    for record in records:
        assert record["status"] == "ok"
        for name in MEASURES:
            assert 0 <= record["metrics"][name] <= 1 and 0 < record["metrics"][f"{name}_p"] <= 1
        assert {"tables/summary.parquet", "tables/images.parquet", "tables/words.parquet"} <= set(record["tables"])
        assert {"figures/hit_rates.png", "figures/examples.png"} <= set(record["figures"])
    [sweep] = {p.parent for p in (tmp_path / "outputs").rglob("summary.parquet") if (p.parent / "report.md").exists()}
    curves = sorted(f.name for f in (sweep / "figures").glob("lens__*.png"))
    assert curves == sorted(f"lens__{name}.png" for name in MEASURES)


def test_concept_top_k_as_large_as_the_concepts_is_one_line_and_no_result(tmp_path):
    result = run_cli("experiment=lens", "layer=1", "experiment.concept_top_k=500", cwd=tmp_path)
    assert result.returncode != 0
    assert "experiment.concept_top_k=500 must be below the number of concepts" in result.stdout + result.stderr
    assert not list((tmp_path / "outputs").rglob("result.json"))
