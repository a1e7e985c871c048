"""resid_post capture equals transformers' own hidden states; positions are the right tokens."""

from __future__ import annotations

import torch

from xmodal.activations.capture import resid_post_hooks, run_to_layers
from xmodal.activations.extract import extract_activations


def reference_hidden_states(model, inputs) -> tuple[torch.Tensor, ...]:
    with torch.inference_mode():
        return model(**inputs, output_hidden_states=True, use_cache=False).hidden_states


def test_resid_post_equals_output_hidden_states_for_every_layer_below_last(tiny, synthetic):
    image_inputs = tiny.image_inputs([synthetic.images[0].load()], "What is this?", True)
    text_ids = tiny.text_prompt("{concept}", "a red circle", True).input_ids
    text_inputs = {"input_ids": torch.tensor([text_ids]), "attention_mask": torch.ones(1, len(text_ids), dtype=torch.long)}
    layers = list(range(tiny.num_layers - 1))
    for inputs in (text_inputs, dict(image_inputs)):
        captured = run_to_layers(tiny.model, tiny.decoder_layers(), inputs, layers)
        reference = reference_hidden_states(tiny.model, inputs)
        for layer in layers:
            torch.testing.assert_close(captured[layer], reference[layer + 1], rtol=0, atol=1e-5)


def test_forward_stops_after_deepest_requested_layer(tiny, synthetic):
    inputs = dict(tiny.image_inputs([synthetic.images[0].load()], "", True))
    hooks_before = [len(layer._forward_hooks) for layer in tiny.decoder_layers()]  # transformers keeps its own
    fired = []
    later = tiny.decoder_layers()[3].register_forward_hook(lambda *args: fired.append(3))
    try:
        captured = run_to_layers(tiny.model, tiny.decoder_layers(), inputs, [0, 2])
    finally:
        later.remove()
    assert sorted(captured) == [0, 2]
    assert fired == [], "layer 3 ran although layer 2 was the deepest requested"
    # xmodal's hooks are removed afterwards, also when the block exits through an exception.
    try:
        with resid_post_hooks(tiny.decoder_layers(), [1]):
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        pass
    assert [len(layer._forward_hooks) for layer in tiny.decoder_layers()] == hooks_before


def test_image_positions_match_processor_image_token_mask(tiny, synthetic, positions):
    images = synthetic.images[:3]
    inputs = tiny.image_inputs([img.load() for img in images], positions.image_prompt, True)
    mask = inputs["input_ids"] == tiny.processor.tokenizer.convert_tokens_to_ids(tiny.processor.tokenizer.image_token)
    assert torch.equal(tiny.image_token_mask(inputs["input_ids"]), mask)
    assert int(mask[0].sum()) == tiny.hf_config.mm_tokens_per_image

    layer = 2
    reference = reference_hidden_states(tiny.model, dict(inputs))[layer + 1]
    subset = type(synthetic)(synthetic.name, synthetic.concepts, synthetic.images)
    subset.images = images  # same concepts, first three images only
    acts = extract_activations(tiny, subset, [layer], positions, progress=False)[layer]
    for row in range(len(images)):
        torch.testing.assert_close(acts.image_tokens[row], reference[row][mask[row]], rtol=0, atol=1e-5)
        eoi = int(mask[row].nonzero().max()) + 1
        assert int(inputs["input_ids"][row, eoi]) == tiny.hf_config.eoi_token_id
        torch.testing.assert_close(acts.image_eoi[row], reference[row, eoi], rtol=0, atol=1e-5)


def test_text_positions_cover_exactly_the_concept_tokens(tiny):
    prompt = tiny.text_prompt("Think about {concept}.", "the Eiffel Tower", use_chat_template=True)
    tokens = tiny.tokenizer.decode([prompt.input_ids[i] for i in prompt.concept_positions])
    assert tokens.strip() == "the Eiffel Tower"
    rendered = tiny.tokenizer.decode(prompt.input_ids)
    assert rendered.startswith("<bos><start_of_turn>user\n") and rendered.count("<bos>") == 1


def test_batched_text_extraction_equals_one_at_a_time(tiny, synthetic, positions):
    layer = 1
    batched = extract_activations(tiny, synthetic, [layer], positions, progress=False)[layer]
    for i, concept in enumerate(synthetic.concepts[:4]):
        prompt = tiny.text_prompt(positions.text_prompt, concept.text, True)
        inputs = {"input_ids": torch.tensor([prompt.input_ids])}
        single = run_to_layers(tiny.model, tiny.decoder_layers(), inputs, [layer])[layer][0, prompt.concept_positions]
        torch.testing.assert_close(batched.text_tokens_of(i), single, rtol=0, atol=1e-5)


def test_the_logit_lens_on_the_last_layer_is_the_models_own_logits(tiny, synthetic):
    """Final norm, unembedding (and soft-cap) applied to the last layer's resid_post give model(...).logits."""
    inputs = dict(tiny.image_inputs([synthetic.images[0].load()], "What is this?", True))
    last = tiny.num_layers - 1
    captured = run_to_layers(tiny.model, tiny.decoder_layers(), inputs, [last])[last]
    with torch.inference_mode():
        logits = tiny.model(**inputs, use_cache=False).logits
    torch.testing.assert_close(tiny.logit_lens(captured), logits.float(), rtol=1e-4, atol=1e-4)
