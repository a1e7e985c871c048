"""positions.max_concept_tokens: each concept text cut to its first N tokens of the model's tokenizer
(seed 001's 64-token captions), and dataset=sentences, the text-only set that needs no photos."""

from __future__ import annotations

import json

SENTENCE = "A small red bicycle leans against a white fence beside the old harbour at dawn."


def test_a_concept_is_cut_to_its_first_tokens(tiny):
    whole = tiny.text_prompt("Describe: {concept}", SENTENCE, True)
    cut = tiny.text_prompt("Describe: {concept}", SENTENCE, True, max_concept_tokens=4)
    assert len(cut.concept_positions) == 4 < len(whole.concept_positions)
    assert (
        cut.input_ids[cut.concept_positions[0] : cut.concept_positions[-1] + 1] == whole.input_ids[whole.concept_positions[0] : whole.concept_positions[0] + 4]
    )
    assert tiny.text_prompt("{concept}", SENTENCE, True, max_concept_tokens=500).input_ids == tiny.text_prompt("{concept}", SENTENCE, True).input_ids


def test_shift_on_sentences_needs_no_photos_and_the_cut_changes_the_readout(tmp_path):
    from tests.conftest import run_in_process

    common = ["experiment=shift", "model=tiny", "dataset=sentences", "experiment.n_permutations=20", f"paths.activation_cache={tmp_path / 'cache'}"]
    assert run_in_process(*common, run_dir=tmp_path / "whole") == 0
    assert run_in_process(*common, "positions.max_concept_tokens=3", run_dir=tmp_path / "cut") == 0
    whole, cut = (json.loads((tmp_path / name / "result.json").read_text()) for name in ("whole", "cut"))
    assert whole["dataset"].startswith("sentences:") and whole["metrics"]["n_prompts"] == cut["metrics"]["n_prompts"] == 24
    assert whole["metrics"] != cut["metrics"]  # three tokens of each sentence are not the whole sentence
