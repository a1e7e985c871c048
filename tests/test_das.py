"""DASynthesis: valid pixels, a loss that goes down, concept vectors as the paper defines them."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from tests.conftest import run_cli
from xmodal.activations.extract import extract_activations
from xmodal.errors import ConfigError, DatasetError
from xmodal.experiments.base import RunContext
from xmodal.experiments.das.alignment import apples_oranges, pair_gap
from xmodal.experiments.das.concept_vectors import WORD_POSITIONS, baseline_words, concept_vectors, word_dataset
from xmodal.experiments.das.config import DASConfig
from xmodal.experiments.das.experiment import DASynthesis
from xmodal.experiments.das.synthesis import DASSettings, ImageReader, MultiResolutionImage, aggregate, augment, cosine_matrix, synthesise

LAYER = 2


def test_baseline_words_are_appendix_c():
    words = baseline_words()
    assert len(words) == 100 and words[:3] == ("desk", "jacket", "gondola") and words[-1] == "enigma"
    assert words.count("marble") == 2 and words.count("butterfly") == 2  # as the paper lists them


def test_parameterisation_always_gives_valid_pixels():
    image = MultiResolutionImage(3, 32, [1, 2, 4, 8, 32])
    assert torch.equal(image(), torch.full((3, 3, 32, 32), 0.5))  # starts at neutral grey
    generator = torch.Generator().manual_seed(0)
    for scale in (0.1, 10.0, 1e4):
        with torch.no_grad():
            for component in image.components:
                component.copy_(scale * torch.randn(component.shape, generator=generator))
        pixels = image()
        assert pixels.min() >= 0.0 and pixels.max() <= 1.0
    assert pixels.std() > 0.3  # large components saturate towards 0 and 1, never beyond


def test_augment_shifts_and_adds_noise_per_copy():
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    views = augment(images, 4, shift=2, noise_std=0.0, generator=torch.Generator().manual_seed(0))
    assert views.shape == (8, 3, 16, 16)
    assert not torch.allclose(views[0], views[1]) or not torch.allclose(views[1], views[2])  # copies differ
    plain = augment(images, 2, shift=0, noise_std=0.0, generator=torch.Generator())
    assert torch.equal(plain[0], images[0]) and torch.equal(plain[3], images[1])


def test_weighted_aggregation_follows_semantics_and_prior():
    concept = torch.tensor([[1.0, 0.0]])
    centred = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0]]])  # 2x2 grid; patch 0 matches
    sharp = aggregate(centred, concept, temperature=0.01, sigma=100.0)
    assert torch.allclose(sharp, torch.tensor([[1.0, 0.0]]), atol=1e-4)
    assert torch.allclose(aggregate(centred, concept, 0.01, 1.0, "mean"), centred.mean(dim=1))


def test_the_prior_sits_inside_or_outside_the_temperature():
    """Section 2.2's ambiguity: with no semantic preference, the weights are the prior (outside) or the prior sharpened by 1/T (inside)."""
    centred = torch.eye(10)[:9].unsqueeze(0)  # a 3x3 grid; patch i reads weight i back out
    concept = torch.eye(10)[9:]  # orthogonal to every patch: cos 0 everywhere
    coords = torch.tensor([[r, c] for r in (1 / 6, 1 / 2, 5 / 6) for c in (1 / 6, 1 / 2, 5 / 6)])
    prior = torch.exp(-((coords - 0.5) ** 2).sum(dim=-1) / (2 * 0.3**2))
    outside = aggregate(centred, concept, 0.1, 0.3, prior_placement="outside")[0, :9]
    inside = aggregate(centred, concept, 0.1, 0.3, prior_placement="inside")[0, :9]
    assert torch.allclose(outside, prior / prior.sum(), atol=1e-6)
    assert torch.allclose(inside, prior**10 / (prior**10).sum(), atol=1e-6)
    assert torch.allclose(aggregate(centred, concept, 1.0, 0.3, prior_placement="inside"), aggregate(centred, concept, 1.0, 0.3, prior_placement="outside"))
    with pytest.raises(ConfigError, match="experiment.prior_placement='before'; use inside or outside"):
        DASSettings(prior_placement="before")


def manual_word_activation(tiny, word: str, layer: int) -> torch.Tensor:
    """resid_post at the word's tokens in the chat template, from output_hidden_states."""
    tokenizer = tiny.tokenizer
    ids = tokenizer.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": word}]}], add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    word_ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    start = next(i for i in range(len(ids)) if ids[i : i + len(word_ids)] == word_ids)
    with torch.no_grad():
        hidden = tiny.model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[layer + 1]
    return hidden[0, start : start + len(word_ids)].mean(dim=0)


def test_concept_vector_equals_manual_computation(tiny):
    words = word_dataset(["zebra", "red"] + list(baseline_words()))
    acts = extract_activations(tiny, words, [LAYER], WORD_POSITIONS, progress=False, modalities=("text",))[LAYER]
    vectors, baseline = concept_vectors(acts, words, ["zebra", "red"], baseline_words())
    manual_baseline = torch.stack([manual_word_activation(tiny, w, LAYER) for w in baseline_words()]).mean(dim=0)
    assert torch.allclose(baseline, manual_baseline, atol=1e-4)
    assert torch.allclose(vectors[0], manual_word_activation(tiny, "zebra", LAYER) - manual_baseline, atol=1e-4)


def test_concept_set_baseline_takes_off_the_mean_of_the_concepts(tiny, synthetic, positions):
    """concept_baseline=concept_set: each word's activation minus the mean over the concept words."""
    ctx = RunContext(model=tiny, features=None, dataset=synthetic, layer=LAYER, seed=0, positions=positions, cache=None, writer=None, progress=False)
    words = ["zebra", "red", "snow"]
    vectors = DASynthesis(DASConfig(concepts=words, concept_baseline="concept_set")).text_vectors(ctx, words, [LAYER])[LAYER]
    manual = torch.stack([manual_word_activation(tiny, w, LAYER) for w in words])
    assert torch.allclose(vectors, manual - manual.mean(dim=0), atol=1e-4)
    with pytest.raises(ConfigError, match="experiment.concept_baseline='words'; use appendix_c"):
        DASynthesis(DASConfig(concept_baseline="words"))


def test_image_concept_vectors_are_each_concepts_mean_image_minus_all_images(tiny, synthetic, positions):
    """The positive control's vectors (concept_source=image), against output_hidden_states image by image."""
    ctx = RunContext(model=tiny, features=None, dataset=synthetic, layer=LAYER, seed=0, positions=positions, cache=None, writer=None, progress=False)
    das = DASynthesis(DASConfig(concepts=["red_circle", "blue_square"], concept_source="image"))
    vectors = das.image_vectors(ctx, das.targets(synthetic))
    means = {}
    for image in synthetic.images:
        inputs = tiny.image_inputs([image.load()], positions.image_prompt, positions.use_chat_template)
        with torch.no_grad():
            hidden = tiny.model(**inputs, output_hidden_states=True).hidden_states[LAYER + 1]
        means.setdefault(image.concept, []).append(hidden[0, tiny.image_token_mask(inputs["input_ids"])[0]].mean(dim=0))
    everything = torch.stack([m for ms in means.values() for m in ms]).mean(dim=0)
    for vector, name in zip(vectors, ["red_circle", "blue_square"]):
        assert torch.allclose(vector, torch.stack(means[name]).mean(dim=0) - everything, atol=1e-4)


def test_apples_oranges_finds_planted_alignment_among_several_concepts():
    """Three concepts, images whose centred representation leans towards their own vector at layer 1 only."""
    rng = np.random.default_rng(0)
    d, per_concept = 32, 6
    vectors = torch.from_numpy(rng.normal(size=(3, d))).float()
    labels = np.repeat(np.arange(3), per_concept)
    noise = torch.from_numpy(rng.normal(size=(len(labels), 4, d))).float()
    images = {0: noise, 1: noise + 2 * vectors[labels].unsqueeze(1)}
    grey = {layer: torch.zeros(d) for layer in images}
    pairs, summary = apples_oranges({0: vectors, 1: vectors}, images, grey, labels, ("a", "b", "c"), 200, seed=0)
    summary = summary.set_index("layer")
    assert summary.loc[1, "gap"] > 0.3 and summary.loc[1, "gap_p"] < 0.01
    assert abs(summary.loc[0, "gap"]) < 0.1 and summary.loc[0, "gap_p"] > 0.01
    assert len(pairs) == 2 * 3 * len(labels) and pairs["matched"].sum() == 2 * len(labels)
    with pytest.raises(ConfigError, match=r"alignment_concepts=\['red'\] must name two or more"):
        DASynthesis(DASConfig(alignment_concepts=["red"]))
    # two concepts: matched = each vector with its own images, as Appendix A has it
    two = np.array([[0.5, 0.4, 0.1], [0.0, 0.2, 0.3]])
    assert pair_gap(two, np.array([0, 0, 1])) == pytest.approx(np.mean([0.5, 0.4, 0.3]) - np.mean([0.1, 0.0, 0.2]))


def test_the_white_noise_control_separates_matched_images_from_noise_only_where_they_align():
    """Appendix A/D: at layer 1 the images lean towards their vectors and noise does not; at layer 0 neither does."""
    rng = np.random.default_rng(0)
    d, per_concept = 32, 6
    vectors = torch.from_numpy(rng.normal(size=(2, d))).float()
    labels = np.repeat(np.arange(2), per_concept)
    base = torch.from_numpy(rng.normal(size=(len(labels), 4, d))).float()
    images = {0: base, 1: base + 2 * vectors[labels].unsqueeze(1)}
    noise = torch.from_numpy(rng.normal(size=(10, 4, d))).float()
    grey = {layer: torch.zeros(d) for layer in images}
    pairs, summary = apples_oranges({0: vectors, 1: vectors}, images, grey, labels, ("a", "b"), 200, seed=0, noise_tokens={0: noise, 1: noise})
    summary = summary.set_index("layer")
    assert summary.loc[1, "matched_minus_noise"] > 0.3 and summary.loc[1, "matched_minus_noise_p"] < 0.01
    assert summary.loc[0, "matched_minus_noise_p"] > 0.01
    assert (pairs["image_concept"] == "white noise").sum() == 2 * 2 * 10 and not pairs.loc[pairs["image_concept"] == "white noise", "matched"].any()


def test_alignment_concepts_are_checked_against_the_dataset(synthetic):
    """Checked by run() before any synthesis, so a typo does not cost a whole DAS run."""
    subset = DASynthesis(DASConfig(alignment_concepts=["red_circle", "blue_square"])).alignment_dataset(synthetic)
    assert [c.name for c in subset.concepts] == ["red_circle", "blue_square"]
    assert {img.concept for img in subset.images} == {"red_circle", "blue_square"}
    with pytest.raises(DatasetError, match=r"has \['zebra'\], not concepts of dataset 'synthetic'; pick from"):
        DASynthesis(DASConfig(alignment_concepts=["red_circle", "zebra"])).alignment_dataset(synthetic)


def test_normalised_pixels_match_the_processor(tiny):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    expected = tiny.image_inputs([image], "", True)["pixel_values"]
    unit = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    assert tiny.image_side() == 64
    assert torch.allclose(tiny.normalise_pixels(unit), expected, atol=1e-5)


def test_a_few_das_steps_raise_the_cosine(tiny):
    reader = ImageReader(tiny, LAYER)
    concepts = torch.randn(2, tiny.hidden_size, generator=torch.Generator().manual_seed(3))
    settings = DASSettings(steps=12, batch_size=2, lr=0.5, temperature=0.1, shift=2, noise_std=0.02)
    result = synthesise(reader, concepts, settings, seed=0, progress=False)
    by_step = result.trajectory.groupby("step")["cosine"].mean()
    assert by_step.iloc[-3:].mean() > by_step.iloc[:3].mean() + 0.05, by_step.tolist()
    final = cosine_matrix(reader, result.images, concepts, result.grey_mean, settings)
    assert final.shape == (2, 2) and np.all(np.diag(final) > 0.1)  # grey starts at exactly 0
    assert result.images.min() >= 0 and result.images.max() <= 1


def test_das_is_deterministic_given_the_seed(tiny):
    reader = ImageReader(tiny, 1)
    concepts = torch.randn(1, tiny.hidden_size, generator=torch.Generator().manual_seed(4))
    settings = DASSettings(steps=3, batch_size=2, lr=0.3)
    first = synthesise(reader, concepts, settings, seed=5, progress=False)
    again = synthesise(reader, concepts, settings, seed=5, progress=False)
    assert torch.equal(first.images, again.images)


@pytest.mark.parametrize("prompt", ["", "What is shown?"])
def test_reusing_the_text_prefix_reads_the_same_patches_and_gradients(tiny, prompt):
    """The speed-up (prefix keys and values once, nothing after the image) changes no number beyond rounding."""
    full, reused = ImageReader(tiny, LAYER, prompt, reuse_prefix=False), ImageReader(tiny, LAYER, prompt)
    assert reused.reuse_prefix and not full.reuse_prefix
    pixels = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    grads = []
    for reader in (full, reused):
        x = pixels.clone().requires_grad_(True)
        patches = reader.patches(x)
        (patches * torch.linspace(-1, 1, patches.shape[-1])).sum().backward()
        grads.append((patches.detach(), x.grad))
    assert grads[0][0].shape == grads[1][0].shape
    assert torch.allclose(grads[0][0], grads[1][0], atol=1e-4, rtol=1e-4)
    assert torch.allclose(grads[0][1], grads[1][1], atol=1e-4, rtol=1e-3)
    concepts = torch.randn(2, tiny.hidden_size, generator=torch.Generator().manual_seed(3))
    settings = DASSettings(steps=5, batch_size=2, lr=0.5)
    cosines = [synthesise(r, concepts, settings, seed=1, progress=False).trajectory["cosine"] for r in (full, reused)]
    assert (cosines[0] - cosines[1]).abs().max() < 1e-4


def test_das_sweep_writes_images_tables_and_a_contact_sheet(tmp_path):
    sweep = tmp_path / "das_sweep"
    proc = run_cli(
        "-m",
        "experiment=das",
        "layer=1,3",
        "experiment.concepts=[red_circle,blue_square,green_star]",
        "experiment.steps=4",
        "experiment.batch_size=2",
        "experiment.alignment_concepts=[red_circle,blue_square,green_circle]",
        "experiment.n_permutations=200",
        f"paths.activation_cache={tmp_path / 'cache'}",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = sorted(sweep.rglob("result.json"))
    assert len(results) == 2
    for path in results:
        result = json.loads(path.read_text())
        assert len(result["images"]) == 3 and all((path.parent / i).stat().st_size > 100 for i in result["images"])
        metrics = result["metrics"]
        assert "grey_cosine" not in metrics and 0 < metrics["final_cosine_p"] <= 1
        assert {"alignment_gap", "alignment_gap_p", "alignment_matched_minus_noise_p", "seconds_per_step"} <= set(metrics)
        trajectory = pd.read_parquet(path.parent / "tables" / "trajectory.parquet")
        assert len(trajectory) == 4 * 3
        alignment = pd.read_parquet(path.parent / "tables" / "alignment.parquet")
        assert list(alignment["layer"]) == list(range(6))  # every layer of tiny
    assert (sweep / "figures" / "das__contact_sheet__tiny.png").stat().st_size > 5_000
    summary = pd.read_parquet(sweep / "summary.parquet")
    assert (summary["status"] == "ok").all() and sorted(summary["layer"]) == [1, 3]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["experiment.concepts=[red_circle,'']"], "experiment.concepts has an empty concept ''"),
        (["experiment.concepts=[red_circle,' ']"], "experiment.concepts has an empty concept ' '"),
        (["layer=6"], "layer=6 is out of range for model 'tiny'"),
        (["experiment.judge=vlm"], "experiment.judge=vlm needs experiment.judge_model"),
        (["experiment.concept_source=pixels"], "Invalid value 'pixels', expected one of [text, image]"),
        (["experiment.concept_source=image", "experiment.concepts=[red_circle,zebra]"], "has none of ['zebra']"),
    ],
)
def test_das_bad_input_is_one_clear_error(tmp_path, overrides, message):
    proc = run_cli(
        "experiment=das", "experiment.steps=2", "experiment.alignment_concepts=[]", *overrides, f"paths.activation_cache={tmp_path / 'cache'}", cwd=tmp_path
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0 and sum(message in line for line in output.splitlines()) == 1, output[-2000:]
    assert "Traceback" not in output
    assert not list(tmp_path.rglob("result.json"))


def test_appendix_e_concepts_are_the_papers_list():
    from xmodal.data.appendix_e import appendix_e_concepts

    dataset = appendix_e_concepts()
    counts = pd.Series([c.category for c in dataset.concepts]).value_counts().to_dict()
    assert counts == {
        "animal": 10,
        "season": 4,
        "celebration": 6,
        "school subject": 10,
        "sensation": 5,
        "famous person": 10,
        "city": 5,
        "sport": 10,
        "nationality": 10,
        "activity": 10,
        "emotion": 5,
        "emotion adjective": 5,
        "LLM task": 5,
        "physical object": 10,
    }
    assert dataset.text_only and not dataset.images and len(dataset.concepts) == 105
    autumn = dataset.concept("autumn")
    assert autumn.synonyms == ("fall",) and autumn.category == "season"
    seasons = appendix_e_concepts(categories=["season"])
    assert [c.text for c in seasons.concepts] == ["spring", "summer", "autumn", "winter"]
    targets = DASynthesis(DASConfig(concepts=[])).targets(seasons)  # [] is every concept of the dataset
    assert [(t.name, t.category) for t in targets][:2] == [("spring", "season"), ("summer", "season")]
    with pytest.raises(ConfigError, match=r"experiment.judge_synonyms names \['wintr'\], which are not among the concepts"):
        DASynthesis(DASConfig(concepts=[], judge_synonyms={"wintr": ["snow"]})).targets(seasons)
    with pytest.raises(DatasetError, match=r"unknown categories \['animals'\]; Appendix E's list has"):
        appendix_e_concepts(categories=["animals"])


def test_das_on_appendix_e_asks_the_category_hint_and_logs_the_rubric(tmp_path):
    """The category-hint protocol end to end: a VLM judge (the tiny model) asked 'What season ...'."""
    out = tmp_path / "run"
    proc = run_cli(
        "experiment=das",
        "dataset=das_appendix_e",
        "dataset.categories=[season]",
        "experiment.concepts=[]",
        "experiment.steps=2",
        "experiment.batch_size=2",
        "experiment.alignment_concepts=[]",
        "experiment.judge=vlm",
        "experiment.judge_model=tiny",
        "experiment.judge_samples=2",
        "experiment.n_permutations=50",
        "+experiment.judge_synonyms.winter=[snow]",
        f"paths.activation_cache={tmp_path / 'cache'}",
        f"hydra.run.dir={out}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    judgements = pd.read_parquet(out / "tables" / "judgements.parquet")
    assert sorted(judgements["protocol"].unique()) == ["category_hint", "no_hint"] and set(judgements["category"]) == {"season"}
    assert len(judgements) == 2 * 4
    rubric = pd.read_parquet(out / "tables" / "rubric.parquet").set_index("concept")["accepted"]
    assert "fall" in rubric["autumn"].split(" | ") and "snow" in rubric["winter"].split(" | ")
    metrics = json.loads((out / "result.json").read_text())["metrics"]
    assert {"recognition_season", "recognition_season_p", "recognition_season_no_hint"} <= set(metrics)


def test_benchmark_times_whole_steps(tiny):
    from omegaconf import OmegaConf

    from xmodal.experiments.das import benchmark

    cfg = OmegaConf.create(
        {
            "model": {"_target_": "xmodal.models.tiny.tiny_gemma3", "name": "tiny", "device": "cpu"},
            "layers": [1, 3],
            "batch_size": 2,
            "n_concepts": 1,
            "steps": 2,
            "seed": 0,
            "baseline": True,
        }
    )
    table = benchmark.benchmark(cfg)
    assert list(table["layer"]) == [1, 3] and (table["seconds_per_step"] > 0).all()
    assert table["image_side"].iloc[0] == 64
    assert table["reuses_prefix"].all() and (table["baseline_seconds_per_step"] > 0).all()
    assert (table["max_cosine_difference"] < 1e-4).all()  # the same run, as fast as it gets


def test_the_judge_rubric_accepts_forms_and_synonyms_and_nothing_else(tiny):
    from xmodal.experiments.das.judges import VLMJudge, rubric

    accepted = rubric({"autumn": "autumn", "swimming": "swimming", "t_rex": "T-rex"}, {"autumn": ["fall"]})
    assert {"autumn", "fall", "falls"} <= set(accepted["autumn"]) and {"swim", "swam", "swims"} <= set(accepted["swimming"])
    assert {"t-rex", "t rex"} <= set(accepted["t_rex"])
    judge = VLMJudge(tiny, accepted=accepted)
    assert judge.score("Fall | leaves | autumn.", "autumn") == pytest.approx(2 / 3)
    assert judge.score("they swam | a pool | T rex", "swimming") == pytest.approx(1 / 3)
    assert judge.score("a T rex!", "t_rex") == 1.0 and judge.score("rex", "t_rex") == 0.0
    assert judge.score("red | blue | a red ball", "red") == pytest.approx(2 / 3)  # outside the rubric: the name itself
    whole_words = VLMJudge(tiny, accepted=rubric({"swimming": "swimming"}, {}, with_forms=False))
    assert whole_words.score("they swam", "swimming") == 0.0 and whole_words.score("swimming!", "swimming") == 1.0


def test_vlm_judge_asks_both_questions_and_scores_by_word_match(tiny):
    from xmodal.experiments.das.judges import VLMJudge

    judge = VLMJudge(tiny, n_samples=3, seed=0, max_new_tokens=2)
    images = [Image.new("RGB", (64, 64), (200, 30, 30)), Image.new("RGB", (64, 64), (30, 30, 200))]
    table = judge.judge(images, ["red", "blue"], ["colour", ""])
    assert list(table["protocol"]) == ["no_hint", "category_hint", "no_hint"]  # the hint needs a category
    assert table["recognised"].between(0, 1).all() and (table["answer"].str.count(r" \| ") == 2).all()


def test_organism_judge_reads_rendered_world_images():
    from dataclasses import replace

    from xmodal.organism import world
    from xmodal.organism.judge import OrganismJudge

    judge = OrganismJudge(seed=0, n_train=400)
    assert judge.ceiling["colour"] >= 0.9 and judge.ceiling["shape"] >= 0.5  # far above 1/9 and 1/6
    scene = replace(world.random_scene(np.random.default_rng(3), word_fraction=0.0), count=1, background="plain", colour="blue")
    image = world.render(scene, np.random.default_rng(0))
    table = judge.judge([image, image], ["blue", "red"], ["colour", "colour"])
    assert list(table["recognised"]) == [1.0, 0.0]


def test_organism_judge_names_the_colour_an_image_is_filled_with():
    """A DAS image may be its colour throughout: the dominant colour is the answer, not the backdrop."""
    from xmodal.organism import world
    from xmodal.organism.judge import OrganismJudge

    judge = OrganismJudge(seed=0, n_train=200)
    rng = np.random.default_rng(0)
    for name, rgb in world.COLOURS.items():
        filled = np.clip(np.array(rgb) / 255 + rng.normal(0, 0.05, (64, 64, 3)), 0, 1)
        filled[:20] = 1.0  # a white band, and a grey one: neither votes
        filled[20:30] = 0.5
        assert judge.predict_colour(Image.fromarray((filled * 255).astype(np.uint8))) == name
    assert judge.predict_colour(Image.new("RGB", (64, 64), (128, 128, 128))) == "none"
