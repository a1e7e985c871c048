"""The organism's stage 2: instruction data, LoRA files, and a resumable trainer."""

from __future__ import annotations

from collections import Counter

import pandas as pd
import pytest
import torch

from xmodal.errors import ModelLoadError
from xmodal.organism import world
from xmodal.organism.instructions import (
    COUNT_WORDS,
    POSITION_WORDS,
    QUESTION_TYPES,
    answer_vocabulary,
    description,
    encode_instructions,
    instruction_mix,
)

MODEL_CACHE = "~/.cache/xmodal/models"  # the cache organism() uses by default


@pytest.fixture(scope="module")
def adapter():
    from xmodal.organism.model import organism

    return organism(device="cpu")  # processor and tokenizer; the weights load only where a test needs them


def truth(scene: world.Scene, question_type: str) -> str:
    return {
        "colour": scene.colour,
        "shape": scene.shape,
        "count": COUNT_WORDS.get(scene.count, ""),
        "background": scene.background,
        "position": POSITION_WORDS.get(scene.position, ""),
        "word": scene.word,
    }[question_type]


def test_the_mix_asks_every_question_from_images_and_from_text_with_the_right_answers():
    samples = instruction_mix(seed=3, n=600)
    assert instruction_mix(seed=3, n=600)[5].prompt == samples[5].prompt  # seeded
    kinds = Counter(s.kind for s in samples)
    assert set(kinds) == {"caption", "image_question", "text_question"} and min(kinds.values()) > 120
    for kind in ("image_question", "text_question"):
        asked = {s.question_type for s in samples if s.kind == kind}
        assert asked == set(QUESTION_TYPES), (kind, asked)
    for s in samples:
        if s.kind == "caption":
            assert s.image is not None and s.answer == s.scene.caption and s.prompt == ""
            continue
        assert s.answer == truth(s.scene, s.question_type) and len(s.answer.split()) == 1
        if s.kind == "image_question":
            assert s.image is not None and s.prompt.endswith("?") and s.answer not in s.prompt  # the image alone answers
        else:  # the same question about the scene in words: no image, the description first
            assert s.image is None and s.prompt.startswith(description(s.scene)) and s.prompt.endswith("?")


def test_encoded_targets_are_the_answer_and_end_of_turn(adapter):
    samples = instruction_mix(seed=1, n=16)
    for group in ([s for s in samples if s.image is not None], [s for s in samples if s.image is None]):
        batch = encode_instructions(adapter, group)
        assert ("pixel_values" in batch) == (group[0].image is not None)
        for row, sample in enumerate(group):
            targets = batch["targets"][row]
            assert adapter.tokenizer.decode(targets[targets != -100]) == sample.answer + "<end_of_turn>"
    vocabulary = answer_vocabulary(adapter.tokenizer)
    for sample in samples:
        assert set(adapter.tokenizer(sample.answer, add_special_tokens=False)["input_ids"]) <= vocabulary or sample.kind == "caption"
    with pytest.raises(ValueError, match="all have an image, or all have none"):
        encode_instructions(adapter, samples)


def test_a_lora_file_merges_into_the_decoder_as_the_adapters_computed(tmp_path):
    from xmodal.organism.language_model import load_language_model
    from xmodal.organism.model import add_lora, load_lora, lora_state_dict, merge_lora, save_lora

    decoder = load_language_model(MODEL_CACHE).model
    add_lora(decoder, 4, 8.0, ["q_proj", "down_proj"])
    torch.manual_seed(0)
    for name, tensor in lora_state_dict(decoder).items():
        tensor.data = tensor.data.normal_(0, 0.02).half().float()  # fp16-exact, as the file stores them
    ids = torch.tensor([[2, 105, 2364, 107, 11634, 1944, 106]])
    with torch.no_grad():
        with_adapters = decoder(input_ids=ids).last_hidden_state
    path = tmp_path / "lora.safetensors"
    save_lora(decoder, path, 4, 8.0, ["q_proj", "down_proj"])

    merged = load_language_model(MODEL_CACHE).model
    load_lora(merged, path)
    merge_lora(merged)
    assert type(merged.layers[3].self_attn.q_proj) is torch.nn.Linear  # plain again: hooks and SAEs see a Gemma 3
    assert not lora_state_dict(merged)
    with torch.no_grad():
        after = merged(input_ids=ids).last_hidden_state
    assert torch.allclose(after, with_adapters, rtol=1e-3, atol=1e-2 * with_adapters.abs().max().item() / 100)
    base = load_language_model(MODEL_CACHE).model
    with torch.no_grad():
        assert (base(input_ids=ids).last_hidden_state - after).abs().max() > 1e-3  # the adapters did something


def test_a_missing_or_misshapen_lora_file_is_one_clear_error(tmp_path):
    from safetensors.torch import save_file

    from xmodal.organism.language_model import load_language_model
    from xmodal.organism.model import add_lora, load_lora, save_lora

    decoder = load_language_model(MODEL_CACHE).model
    with pytest.raises(ModelLoadError, match="organism LoRA weights not found at /nope/lora.safetensors"):
        load_lora(decoder, "/nope/lora.safetensors")
    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ModelLoadError, match="is not an organism LoRA file"):
        load_lora(decoder, tmp_path / "plain.safetensors")
    other = torch.nn.Module()
    other.layers = torch.nn.ModuleList([torch.nn.Module()])
    other.layers[0].q_proj = torch.nn.Linear(32, 48, bias=False)  # another model's shape, same module names
    add_lora(other, 4, 8.0, ["q_proj"])
    save_lora(other, tmp_path / "other.safetensors", 4, 8.0, ["q_proj"])
    with pytest.raises(ModelLoadError, match="do not fit the decoder"):
        load_lora(load_language_model(MODEL_CACHE).model, tmp_path / "other.safetensors")


@pytest.mark.slow  # trains stage two in-process
def test_stage_two_resumes_after_a_kill_with_the_same_adapters(tmp_path, monkeypatch):
    """Checkpointed every step; a run killed at step 3 and restarted ends where an uninterrupted one does."""
    from safetensors.torch import load_file

    from xmodal.organism import instruct
    from xmodal.organism.train import Stage, TrainConfig

    def config(out: str) -> TrainConfig:
        return TrainConfig(
            stage=Stage.instruct,
            steps=3,
            batch_size=4,
            log_every=1,
            checkpoint_every=1,
            warmup_steps=1,
            refresh_every=2,
            lora_rank=2,
            lr=1e-3,
            device="cpu",
            out_dir=str(tmp_path / out),
            model_cache=MODEL_CACHE,
        )

    instruct.train_instruct(config("reference"))
    real_mix = instruct.instruction_mix

    def dies_at_step_2(seed, *args):
        if seed == instruct.STEP_SEED_OFFSET + 2:
            raise KeyboardInterrupt
        return real_mix(seed, *args)

    monkeypatch.setattr(instruct, "instruction_mix", dies_at_step_2)
    with pytest.raises(KeyboardInterrupt):
        instruct.train_instruct(config("killed"))
    assert (tmp_path / "killed" / "checkpoint.pt").exists() and not (tmp_path / "killed" / "lora.safetensors").exists()
    drawn = []
    monkeypatch.setattr(instruct, "instruction_mix", lambda seed, *args: drawn.append(seed) or real_mix(seed, *args))
    instruct.train_instruct(config("killed"))
    assert drawn == [instruct.STEP_SEED_OFFSET + 2]  # only the step that had not finished
    reference, resumed = (load_file(str(tmp_path / d / "lora.safetensors")) for d in ("reference", "killed"))
    assert reference.keys() == resumed.keys() and all(torch.equal(reference[k], resumed[k]) for k in reference)
    assert any(v.abs().max() > 0 for k, v in reference.items() if "lora_B" in k)  # trained, not the zero start
    log = pd.read_csv(tmp_path / "killed" / "instruct_log.csv")
    assert log["step"].tolist() == [1, 2, 3] and {"loss_caption", "loss_image_question", "loss_text_question"} <= set(log)


def test_question_accuracy_scores_first_words_with_an_interval_and_a_shuffled_null():
    from xmodal.organism.evaluate import question_accuracy

    samples = [s for s in instruction_mix(seed=5, n=400, kind_weights=(0, 1, 1)) if s.question_type == "colour"]
    answers = [f"{s.answer.capitalize()}." for s in samples]
    answers[0] = "purple" if samples[0].answer != "purple" else "red"
    table = question_accuracy(answers, samples, seed=0).set_index(["kind", "question_type"])
    image = table.loc[("image_question", "colour")]
    assert image["accuracy"] == pytest.approx(1 - 1 / image["n"]) and image["accuracy_ci_low"] < image["accuracy"] <= image["accuracy_ci_high"]
    assert table.loc[("text_question", "colour"), "accuracy"] == 1.0
    assert (table["shuffled_answer_accuracy"] < 0.4).all()  # nine colours: a shuffled sample's answer rarely matches


@pytest.mark.slow  # trains, or runs a whole study on the organism: a minute or more on 2 cores
def test_a_frozen_decoder_has_zero_kl_from_gemma_3_270m():
    from xmodal.organism.evaluate import decoder_kl, english_prompts
    from xmodal.organism.language_model import load_language_model
    from xmodal.organism.model import organism

    prompts = english_prompts()
    assert len(prompts) == 50 and len(set(prompts)) == 50
    table = decoder_kl(organism(device="cpu", variant="frozen"), load_language_model(MODEL_CACHE).eval(), prompts[:4])
    assert (table["kl_base_to_organism"].abs() < 1e-5).all() and (table["base_top"] == table["organism_top"]).all()


def test_an_unshipped_sae_width_names_the_widths_there_are():
    from xmodal.errors import SAEError
    from xmodal.organism.saes import organism_sae, shipped_widths

    assert shipped_widths("frozen") == [256] and shipped_widths("instruct") == [512, 1024] and shipped_widths("planted") == [512]
    instruct = organism_sae("organism", 9, device="cpu", variant="instruct", width=512)
    assert (instruct.d_sae, instruct.sae.cfg.d_in) == (512, 640)
    with pytest.raises(SAEError, match=r"sae.width=1000 is not shipped for the instruct organism \(joint\); the widths are 512, 1024"):
        organism_sae("organism", 9, width=1000)


def wrong_shape_lora(path):
    from xmodal.organism.model import add_lora, save_lora

    other = torch.nn.Module()
    other.layers = torch.nn.ModuleList([torch.nn.Module()])
    other.layers[0].q_proj = torch.nn.Linear(32, 48, bias=False)
    add_lora(other, 4, 8.0, ["q_proj"])
    save_lora(other, path, 4, 8.0, ["q_proj"])
    return path


@pytest.mark.parametrize("case", ["missing", "wrong_shape"])
def test_a_bad_lora_file_through_the_cli_is_one_line_and_no_result(tmp_path, case):
    from tests.conftest import run_cli

    path = tmp_path / "nope.safetensors" if case == "missing" else wrong_shape_lora(tmp_path / "other.safetensors")
    message = "organism weights not found at" if case == "missing" else "do not fit the decoder"
    proc = run_cli(
        "model=organism",
        "sae=organism",
        "dataset=organism_concepts",
        "layer=9",
        f"model.lora_weights={path}",
        "dataset.images_per_concept=1",
        f"paths.activation_cache={tmp_path / 'cache'}",
        cwd=tmp_path,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2 and sum(message in line for line in output.splitlines()) == 1, output[-2000:]
    assert "Traceback" not in output and not list(tmp_path.rglob("result.json"))


@pytest.mark.slow  # trains, or runs a whole study on the organism: a minute or more on 2 cores
def test_the_instruction_tuned_organism_answers_fixed_questions_from_images_and_from_text():
    """The shipped stage-2 weights (model=organism, the default): a plain Gemma 3 whose decoder moved, and answers.

    Held-out accuracy is at least 0.92 for every question type (experiments/organism/README.md); these are pinned.
    """
    from xmodal.models import Gemma3Adapter
    from xmodal.organism.evaluate import answer_questions, first_word
    from xmodal.organism.language_model import load_language_model
    from xmodal.organism.model import organism

    adapter = organism(device="cpu")
    assert type(adapter) is Gemma3Adapter and adapter.identity["lora_weights"] != adapter.identity["vision_weights"]
    decoder = adapter.model.model.language_model
    assert type(decoder.layers[9].mlp.down_proj) is torch.nn.Linear
    base = load_language_model(MODEL_CACHE).model
    assert not torch.equal(decoder.layers[9].mlp.down_proj.weight, base.layers[9].mlp.down_proj.weight)
    samples = [s for s in instruction_mix(seed=2024, n=80, kind_weights=(0, 1, 1)) if s.question_type in ("colour", "shape", "word")][:16]
    assert {s.kind for s in samples} == {"image_question", "text_question"}
    answers = answer_questions(adapter, samples)
    right = [first_word(a) == s.answer for a, s in zip(answers, samples)]
    assert sum(right) >= 14, list(zip(answers, [s.prompt for s in samples]))  # the frozen organism captions instead
