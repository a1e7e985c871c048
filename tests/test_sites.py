"""Sites (sae.site=resid_post|mlp_out|attn_out, and a transcoder's mlp_in): read and steered at the right module.

Each site is checked against the module computed independently: a forward hook on the MLP (its
input, and its output through Gemma's post-MLP norm), and o_proj's input, for text and image tokens.
"""

from __future__ import annotations

import pytest
import torch

from xmodal.activations.cache import ActivationCache, get_activations
from xmodal.activations.extract import image_batch_hidden, text_batch_rows
from xmodal.activations.steering import Steering, steer
from xmodal.errors import ConfigError, SAEError
from xmodal.models.base import HookSide
from xmodal.saes.loading import local_sae

LAYER = 2


def independent_sites(tiny, inputs: dict, layer: int) -> dict[str, torch.Tensor]:
    """The layer's MLP input and output and o_proj's input, from plain forward hooks on those modules."""
    block = tiny.decoder_layers()[layer]
    seen: dict[str, torch.Tensor] = {}
    handles = [
        block.mlp.register_forward_hook(lambda m, args, out: seen.update(mlp_in=args[0].detach(), mlp=out.detach())),
        block.self_attn.o_proj.register_forward_hook(lambda m, args, out: seen.update(attn_out=args[0].detach())),
    ]
    try:
        with torch.inference_mode():
            tiny.model(**inputs, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    with torch.inference_mode():
        seen["mlp_out"] = block.post_feedforward_layernorm(seen.pop("mlp"))  # what Gemma 3 adds to the residual stream
    return seen


def text_inputs(tiny, text: str) -> tuple[dict, list[int]]:
    prompt = tiny.text_prompt("{concept}", text, True)
    ids = torch.tensor([prompt.input_ids])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, prompt


def test_gemma3_sites_are_gemma_scope_2s_hook_points(tiny):
    assert tiny.site_module("mlp_out") == ("post_feedforward_layernorm", HookSide.output)
    assert tiny.site_module("attn_out") == ("self_attn.o_proj", HookSide.input)
    assert tiny.site_module("mlp_in") == ("mlp", HookSide.input)
    # sae-lens's hf_hook_name for Gemma Scope 2 (mlp_out) and the name check_site reads back
    assert tiny.hook_name(9, "mlp_out") == "model.layers.9.post_feedforward_layernorm.output"
    assert tiny.hook_name(9, "attn_out") == "model.layers.9.self_attn.o_proj.input"
    assert tiny.hook_name(9) == "model.layers.9"
    with pytest.raises(ConfigError, match="site 'mlp_mid' is not one of resid_post, mlp_out, attn_out, mlp_in"):
        tiny.site_module("mlp_mid")


@pytest.mark.parametrize("site", ["mlp_out", "attn_out", "mlp_in"])
def test_captured_site_equals_the_module_computed_independently(tiny, synthetic, site):
    # text tokens: the concept's positions of a prompt
    inputs, prompt = text_inputs(tiny, "a red circle")
    rows = text_batch_rows(tiny, [prompt], [LAYER], site)[LAYER][0]
    reference = independent_sites(tiny, inputs, LAYER)[site][0, prompt.concept_positions]
    torch.testing.assert_close(rows, reference.float(), rtol=0, atol=1e-6)
    # image tokens: every soft token of two images
    inputs = dict(tiny.image_inputs([img.load() for img in synthetic.images[:2]], "", True))
    tokens, eoi = image_batch_hidden(tiny, inputs, [LAYER], site)
    reference = independent_sites(tiny, inputs, LAYER)[site]
    mask = tiny.image_token_mask(inputs["input_ids"])
    torch.testing.assert_close(tokens[LAYER], reference[mask].view(2, -1, reference.shape[-1]), rtol=0, atol=1e-6)
    assert not torch.allclose(tokens[LAYER], image_batch_hidden(tiny, inputs, [LAYER])[0][LAYER])  # not resid_post


@pytest.mark.parametrize("site", ["mlp_out", "attn_out"])
def test_steering_a_site_with_zero_changes_nothing_and_a_vector_changes_the_logits(tiny, synthetic, site):
    inputs = dict(tiny.image_inputs([synthetic.images[0].load()], "What is this?", True))
    image_mask = tiny.image_token_mask(inputs["input_ids"])
    width = tiny.site_width(site)

    def logits(steering: Steering | None) -> torch.Tensor:
        with torch.inference_mode():
            if steering is None:
                return tiny.model(**inputs, use_cache=False).logits
            with steer(tiny.hook_point(LAYER, site), steering, image_mask):
                return tiny.model(**inputs, use_cache=False).logits

    clean = logits(None)
    torch.testing.assert_close(logits(Steering(torch.zeros(width), 5.0)), clean, rtol=0, atol=0)
    steered = logits(Steering(torch.ones(width), 5.0, where="image"))
    assert not torch.allclose(steered, clean)
    # the vector went in at the site: the MLP's output (after its norm) moved by exactly that much at the image tokens
    moved = {}
    block = tiny.decoder_layers()[LAYER]
    module, at_input = (block.post_feedforward_layernorm, False) if site == "mlp_out" else (block.self_attn.o_proj, True)
    with torch.inference_mode(), steer(tiny.hook_point(LAYER, site), Steering(torch.ones(width), 5.0, where="image"), image_mask):
        # registered after xmodal's hook, so it sees the steered tensor: o_proj's input for attn_out
        if at_input:
            handle = module.register_forward_pre_hook(lambda m, args: moved.update(x=args[0].detach()))
        else:
            handle = module.register_forward_hook(lambda m, args, out: moved.update(x=out.detach()))
        try:
            tiny.model(**inputs, use_cache=False)
        finally:
            handle.remove()
    before = independent_sites(tiny, inputs, LAYER)[site]
    torch.testing.assert_close(moved["x"] - before, 5.0 * image_mask[..., None].float().expand_as(before), rtol=0, atol=1e-5)
    assert len(module._forward_hooks) == 0 and len(module._forward_pre_hooks) == 0  # steering's hook is gone


def test_the_cache_never_returns_one_site_for_another(tiny, synthetic, positions, tmp_path):
    cache = ActivationCache(tmp_path)
    resid = get_activations(tiny, synthetic, [LAYER], positions, cache, progress=False)[LAYER]
    mlp = get_activations(tiny, synthetic, [LAYER], positions, cache, progress=False, site="mlp_out")[LAYER]
    assert cache.hits == 0 and cache.misses == 2  # two folders: the site is part of the key
    assert not torch.allclose(resid.image_token_rows(), mlp.image_token_rows())
    again = get_activations(tiny, synthetic, [LAYER], positions, cache, progress=False, site="mlp_out")[LAYER]
    assert cache.hits == 1
    torch.testing.assert_close(again.image_token_rows(), mlp.image_token_rows())
    inputs = dict(tiny.image_inputs([synthetic.images[0].load()], positions.image_prompt, positions.use_chat_template))
    reference = independent_sites(tiny, inputs, LAYER)["mlp_out"][tiny.image_token_mask(inputs["input_ids"])]
    torch.testing.assert_close(mlp.image_token_rows()[: len(reference)], reference.float(), rtol=0, atol=1e-5)


def save_site_sae(path, d_in: int, hook_name: str):
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=d_in, d_sae=32, metadata=SAEMetadata(hook_name=hook_name)))
    with torch.no_grad():
        sae.W_enc.normal_(0, 0.3, generator=torch.Generator().manual_seed(0))
        sae.W_dec.copy_(sae.W_enc.T)
    sae.save_model(path)
    return sae


def test_an_mlp_out_sae_reads_mlp_out_and_refuses_another_site(tiny, synthetic, positions, tmp_path):
    from xmodal.activations.codes import codes_plan
    from xmodal.activations.readout import stream_readouts

    save_site_sae(tmp_path / "sae", 64, tiny.hook_name(LAYER, "mlp_out"))
    features = local_sae("mlp", str(tmp_path / "sae"), LAYER, device="cpu", site="mlp_out")
    assert (features.site, features.reads, features.writes) == ("mlp_out", "mlp_out", "mlp_out")
    features.check_model(tiny.name, tiny.site_width(features.reads), LAYER)
    with pytest.raises(
        SAEError, match=r"trained on mlp_out \(model.layers.2.post_feedforward_layernorm.output\), not sae.site=resid_post; set sae.site=mlp_out"
    ):
        local_sae("mlp", str(tmp_path / "sae"), LAYER, device="cpu")
    plan = codes_plan(LAYER, features, positions)
    assert plan.site == "mlp_out"
    stream_readouts(tiny, synthetic, [plan], [tmp_path / "readout"], positions, 4, progress=False)
    from xmodal.activations.readout import read_layer

    readout = read_layer(tmp_path / "readout")
    inputs = dict(tiny.image_inputs([synthetic.images[0].load()], positions.image_prompt, positions.use_chat_template))
    reference = independent_sites(tiny, inputs, LAYER)["mlp_out"][tiny.image_token_mask(inputs["input_ids"])]
    torch.testing.assert_close(readout.image_tokens[0], features.encode(reference.float()), rtol=0, atol=1e-5)


def test_a_transcoder_encodes_the_mlp_input_of_tiny(tiny, synthetic, positions, tmp_path):
    from tests.test_gemma_scope_2 import save_transcoder
    from xmodal.activations.codes import codes_plan
    from xmodal.activations.readout import read_layer, stream_readouts

    transcoder = save_transcoder(tmp_path / "tc", d_in=tiny.hidden_size, layer=LAYER)
    features = local_sae("tc", str(tmp_path / "tc"), LAYER, device="cpu", site="mlp_out")
    assert features.transcoder and (features.site, features.reads, features.writes) == ("mlp_out", "mlp_in", "mlp_out")
    features.check_model(tiny.name, tiny.site_width(features.reads), LAYER)
    plan = codes_plan(LAYER, features, positions)
    assert plan.site == "mlp_in"
    stream_readouts(tiny, synthetic, [plan], [tmp_path / "readout"], positions, 4, progress=False)
    readout = read_layer(tmp_path / "readout")
    inputs = dict(tiny.image_inputs([synthetic.images[0].load()], positions.image_prompt, positions.use_chat_template))
    sites = independent_sites(tiny, inputs, LAYER)
    mask = tiny.image_token_mask(inputs["input_ids"])
    with torch.inference_mode():
        expected = transcoder.encode(sites["mlp_in"][mask].float())
    assert (expected > 0).any()
    torch.testing.assert_close(readout.image_tokens[0], expected, rtol=0, atol=1e-5)
    # what it writes is the MLP's output: its decoder's width is mlp_out's
    assert features.decode(expected).shape == sites["mlp_out"][mask].shape


def test_a_transcoder_writes_the_mlp_output_in_its_place(tiny, synthetic, tmp_path):
    from tests.test_gemma_scope_2 import save_transcoder
    from xmodal.activations.capture import transcoded

    inputs = dict(tiny.image_inputs([synthetic.images[0].load()], "What is this?", True))
    block = tiny.decoder_layers()[LAYER]
    read, write = tiny.hook_point(LAYER, "mlp_in"), tiny.hook_point(LAYER, "mlp_out")
    with torch.inference_mode():
        clean = tiny.model(**inputs, use_cache=False).logits
        # the MLP and its norm as the "transcoder" (.forward: past the hooks): the model is unchanged
        with transcoded(read, write, lambda x: block.post_feedforward_layernorm.forward(block.mlp.forward(x))):
            torch.testing.assert_close(tiny.model(**inputs, use_cache=False).logits, clean, rtol=0, atol=1e-5)
    save_transcoder(tmp_path / "tc", d_in=tiny.hidden_size, layer=LAYER)
    features = local_sae("tc", str(tmp_path / "tc"), LAYER, device="cpu", site="mlp_out")
    written = {}
    with torch.inference_mode(), transcoded(read, write, features.output):
        handle = block.post_feedforward_layernorm.register_forward_hook(lambda m, args, out: written.update(x=out.detach()))
        try:
            steered = tiny.model(**inputs, use_cache=False).logits
        finally:
            handle.remove()
    mlp_in = independent_sites(tiny, inputs, LAYER)["mlp_in"]
    torch.testing.assert_close(written["x"], features.output(mlp_in), rtol=0, atol=1e-5)  # what the layer added
    with torch.inference_mode():
        torch.testing.assert_close(features.output(mlp_in), features.sae(mlp_in))  # an affine one adds its skip term there
    assert not torch.allclose(steered, clean)
    assert all(len(m._forward_hooks) == 0 and len(m._forward_pre_hooks) == 0 for m in (block.mlp, block.post_feedforward_layernorm))


def test_a_dual_encoder_has_no_sites_and_a_bad_site_name_is_one_line(tmp_path, tiny):
    from xmodal.models.dual_encoder import tiny_clip

    clip = tiny_clip(cache_dir=str(tmp_path / "models"), device="cpu")
    assert clip.site_width("resid_post") == clip.hidden_size
    with pytest.raises(ConfigError, match="has no decoder layers, so it has no site mlp_out to read; use sae.site=resid_post"):
        clip.site_width("mlp_out")
    with pytest.raises(ConfigError, match="site 'mlp' is not one of resid_post, mlp_out, attn_out, mlp_in"):
        tiny.site_width("mlp")
    assert tiny.site_width("attn_out") == tiny.text_config.num_attention_heads * tiny.text_config.head_dim


def test_an_sae_after_w_o_is_refused_at_attn_out_which_reads_before_it(tmp_path):
    save_site_sae(tmp_path / "sae", 64, "blocks.2.hook_attn_out")
    with pytest.raises(SAEError, match=r"trained on attn_out after W_O \(blocks.2.hook_attn_out\), not sae.site=attn_out; choose an SAE trained at attn_out"):
        local_sae("after", str(tmp_path / "sae"), LAYER, device="cpu", site="attn_out")
    save_site_sae(tmp_path / "z", 64, "blocks.2.attn.hook_z")
    assert local_sae("z", str(tmp_path / "z"), LAYER, device="cpu", site="attn_out").reads == "attn_out"
