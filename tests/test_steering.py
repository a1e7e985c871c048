"""Steering: the hook changes resid_post exactly as specified, only where asked, and goes away after."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import run_cli
from tests.test_sae import save_jumprelu_sae
from xmodal.activations.capture import resid_post_hooks
from xmodal.activations.steering import Steering, steer, steering_mask

LAYER = 2


def image_batch(tiny, synthetic):
    images = [synthetic.images[0].load(), synthetic.images[5].load()]
    tiny.tokenizer.padding_side = "left"
    return tiny.image_inputs(images, "", use_chat_template=True)


def resid_at(tiny, inputs, steering=None):
    layers = tiny.decoder_layers()
    image_mask = tiny.image_token_mask(inputs["input_ids"])
    with torch.inference_mode():
        if steering is None:
            with resid_post_hooks(layers, [LAYER], stop_after_deepest=False) as captured:
                logits = tiny.model(**inputs).logits
        else:
            with steer(layers[LAYER], steering, image_mask):  # registered first: the capture sees the steered output
                with resid_post_hooks(layers, [LAYER], stop_after_deepest=False) as captured:
                    logits = tiny.model(**inputs).logits
    return captured[LAYER], logits


@pytest.mark.parametrize("where", ["image", "text", "both"])
def test_add_steering_changes_resid_post_exactly_at_the_chosen_positions(tiny, synthetic, where):
    inputs = image_batch(tiny, synthetic)
    hooks_before = len(tiny.decoder_layers()[LAYER]._forward_hooks)
    direction = torch.randn(tiny.hidden_size, generator=torch.Generator().manual_seed(0))
    clean, clean_logits = resid_at(tiny, inputs)
    steered, steered_logits = resid_at(tiny, inputs, Steering(direction, 3.0, "add", where))

    is_image = tiny.image_token_mask(inputs["input_ids"])
    expected_mask = {"image": is_image, "text": ~is_image, "both": torch.ones_like(is_image)}[where]
    manual = clean + 3.0 * expected_mask[..., None] * direction
    assert torch.allclose(steered, manual, atol=1e-5)
    assert not torch.allclose(steered_logits, clean_logits)
    # The hook is gone: the same forward gives the clean numbers again.
    assert len(tiny.decoder_layers()[LAYER]._forward_hooks) == hooks_before  # transformers keeps its own hooks there
    assert torch.equal(resid_at(tiny, inputs)[0], clean)


def test_clamp_steering_sets_the_feature_through_its_decoder_direction(tiny, synthetic, tmp_path):
    sae = save_jumprelu_sae(tmp_path / "sae", d_in=tiny.hidden_size, layer=LAYER)
    inputs = image_batch(tiny, synthetic)
    feature, value = 7, 5.0

    def activation(hidden):
        return sae.encode(hidden)[..., feature]

    clean, _ = resid_at(tiny, inputs)
    steered, _ = resid_at(tiny, inputs, Steering(sae.W_dec[feature].detach(), value, "clamp", "image", activation))
    is_image = tiny.image_token_mask(inputs["input_ids"])
    with torch.no_grad():
        manual = clean + is_image[..., None] * (value - activation(clean))[..., None] * sae.W_dec[feature]
    assert torch.allclose(steered, manual, atol=1e-5)


def test_generated_tokens_count_as_text_positions():
    image_mask = torch.tensor([[False, True, True, False]])
    assert steering_mask("image", image_mask, 4).tolist() == [[False, True, True, False]]
    assert steering_mask("image", image_mask, 1).tolist() == [[False]]  # a generated token is never an image token
    assert steering_mask("text", image_mask, 1).tolist() == [[True]]
    assert steering_mask("both", image_mask, 4).all()


def test_steering_experiment_writes_dose_response_and_controls(tmp_path):
    save_jumprelu_sae(tmp_path / "sae", d_in=64, layer=3)
    proc = run_cli(
        "experiment=steering",
        "experiment.concept=red_circle",
        "experiment.images=[blue_circle,green_square]",
        "experiment.n_images=4",
        "experiment.strengths=[0,4]",
        "experiment.where=both",
        "experiment.max_new_tokens=4",
        "experiment.n_bootstrap=200",
        "layer=3",
        "sae=local",
        f"sae.path={tmp_path / 'sae'}",
        f"paths.activation_cache={tmp_path / 'cache'}",
        "hydra.run.dir=outputs/steer",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "outputs" / "steer"
    result = json.loads((run / "result.json").read_text())
    assert result["metrics"]["control_layer"] != 3
    import pandas as pd

    summary = pd.read_parquet(run / "tables" / "dose_response.parquet")
    assert set(summary["condition"]) == {"feature", "random_feature", "feature_other_layer"}
    assert set(summary["strength"]) == {0.0, 4.0}
    assert (summary[summary["strength"] == 0]["kl"].abs() < 1e-6).all()  # strength 0 is the unsteered run
    assert (summary[summary["strength"] == 4]["kl"] > 0).all()
    assert (run / "figures" / "dose_response.png").stat().st_size > 10_000
    descriptions = pd.read_parquet(run / "tables" / "descriptions.parquet")
    assert len(descriptions) == 3 * 2 * 4
    assert set(descriptions["image"].str.split("/").str[0]) <= {"synthetic:blue_circle", "synthetic:green_square"}  # the chosen scenes
    assert set(descriptions["mode"]) == {"clamp"}  # clamp by default, the other-layer control too


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["experiment.concept=red_circle", "experiment.feature=5000"], "experiment.feature=5000 is outside the SAE, which has features 0..127"),
        (["experiment.concept=unicorn"], "experiment.concept='unicorn' is not in dataset"),
        (["experiment.concept=red_circle", "+experiment.concept_words.red_circle=[' ']"], "concept words [' '] of 'red_circle' give no tokens"),
        (["experiment.concept=red_circle", "experiment.feature_source=pixels"], "Invalid value 'pixels', expected one of [text, image]"),
        (["experiment.concept=red_circle", "experiment.images=[ocean]"], "experiment.images names ['ocean'], not concepts of dataset 'synthetic'"),
        (["experiment.concept=red_circle", "experiment.images=[red_circle]"], "includes the steered concept 'red_circle'"),
    ],
)
def test_steering_bad_input_is_one_clear_error(tmp_path, overrides, message):
    save_jumprelu_sae(tmp_path / "sae", d_in=64, layer=3)
    proc = run_cli(
        "experiment=steering", "layer=3", "sae=local", f"sae.path={tmp_path / 'sae'}", *overrides, f"paths.activation_cache={tmp_path / 'cache'}", cwd=tmp_path
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0 and sum(message in line for line in output.splitlines()) == 1, output[-2000:]
    assert not list(tmp_path.rglob("result.json"))


def test_a_mention_is_a_whole_word():
    from xmodal.metrics.mentions import mentions

    assert mentions("a Red ball.", ["red"]) and mentions("red.</h3>", ["red"]) and mentions("it is ice cream", ["ice cream"])
    assert not mentions("redrawing the map", ["red"]) and not mentions("tired", ["red"]) and not mentions("anything", [" "])
