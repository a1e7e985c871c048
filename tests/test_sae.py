"""SAEs load through sae-lens, map onto decoder layers, and encode exactly as sae-lens does."""

from __future__ import annotations

import pytest
import torch

from xmodal.errors import SAEError
from xmodal.saes.loading import hook_layer, instantiate_sae, local_sae, no_sae, pretrained_sae


def save_jumprelu_sae(path, d_in: int = 64, d_sae: int = 128, hook_name: str = "blocks.{layer}.hook_resid_post", layer: int = 1, seed: int = 0):
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(seed)
    sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=d_in, d_sae=d_sae, metadata=SAEMetadata(hook_name=hook_name.format(layer=layer))))
    with torch.no_grad():
        sae.threshold.fill_(0.05)  # a real threshold, so JumpReLU gating is exercised
        sae.b_enc.normal_(0, 0.1)
    sae.save_model(path)
    return sae


@pytest.mark.parametrize(
    "name, layer",
    [("blocks.5.hook_resid_post", 5), ("model.layers.12.output", 12), ("model.layers.3", 3), ("model.language_model.layers.7", 7)],
)
def test_hook_names_map_to_decoder_layers(name, layer):
    assert hook_layer(name) == layer


@pytest.mark.parametrize(
    "name, layer",
    [("blocks.5.hook_mlp_out", 5), ("model.layers.4.post_feedforward_layernorm.output", 4), ("blocks.6.attn.hook_z", 6), ("blocks.2.hook_mlp_in", 2)],
)
def test_hook_names_at_other_sites_map_to_their_layers(name, layer):
    assert hook_layer(name) == layer


@pytest.mark.parametrize("name", ["blocks.5.hook_resid_pre", "blocks.5.hook_resid_mid", "blocks.5.ln1.hook_normalized"])
def test_hooks_at_no_site_are_refused(name):
    with pytest.raises(SAEError, match="none of the sites xmodal reads"):
        hook_layer(name)


def test_local_sae_encodes_exactly_like_sae_lens(tmp_path):
    reference = save_jumprelu_sae(tmp_path / "layer_1")
    space = local_sae("mine", str(tmp_path / "layer_{layer}"), layer=1, device="cpu")
    space.check_model("tiny", hidden_size=64, layer=1)
    resid = torch.randn(300, 64) * 2
    expected = reference.encode(resid)
    got = space.encode(resid, batch_size=128)  # several chunks
    assert torch.equal(got, expected)
    assert (got > 0).any() and (got == 0).any(), "the test SAE should be sparse but not dead"
    assert space.d_sae == 128


def test_sae_with_wrong_width_is_refused(tmp_path):
    save_jumprelu_sae(tmp_path / "sae", d_in=32)
    space = local_sae("narrow", str(tmp_path / "sae"), layer=1, device="cpu")
    with pytest.raises(SAEError, match="d_in=32 but model 'tiny' has hidden size 64"):
        space.check_model("tiny", hidden_size=64, layer=1)


def test_sae_of_another_layer_is_refused(tmp_path):
    save_jumprelu_sae(tmp_path / "sae", layer=3)
    space = local_sae("l3", str(tmp_path / "sae"), layer=1, device="cpu")
    with pytest.raises(SAEError, match="trained on layer 3"):
        space.check_model("tiny", hidden_size=64, layer=1)


def test_sae_without_hook_name_needs_sae_layer(tmp_path):
    save_jumprelu_sae(tmp_path / "sae", hook_name="")
    target = {"_target_": "xmodal.saes.loading.local_sae", "name": "hookless", "path": str(tmp_path / "sae"), "device": "cpu"}
    with pytest.raises(SAEError, match="records no hook_name.*set sae.layer"):
        instantiate_sae(target, layer=1).check_model("tiny", hidden_size=64, layer=1)
    with pytest.raises(SAEError, match="trained on layer 3 \\(sae.layer\\) but layer=1"):
        instantiate_sae({**target, "layer": 3}, layer=1).check_model("tiny", hidden_size=64, layer=1)
    declared = instantiate_sae({**target, "layer": 1}, layer=1)
    declared.check_model("tiny", hidden_size=64, layer=1)
    assert (declared.layer, declared.trained_layer) == (1, 1)


def test_missing_local_sae_directory(tmp_path):
    with pytest.raises(SAEError, match="no sae-lens SAE at"):
        local_sae("gone", str(tmp_path / "nothing"), layer=1)


def test_unknown_pretrained_id_lists_what_exists_without_downloading():
    template = "layer_{layer}_width_{width}_l0_{l0}"
    with pytest.raises(SAEError, match=r"no SAE at layer 5; its layers are \[.*17.*\]"):
        pretrained_sae("gs2", "gemma-scope-2-4b-it-res", template, layer=5)
    with pytest.raises(SAEError, match="ids for layer 17: .*layer_17_width_16k_l0_medium"):
        pretrained_sae("gs2", "gemma-scope-2-4b-it-res", template, layer=17, l0="huge")


def test_seed_003s_jb_saes_are_named_at_its_layers_without_downloading(tmp_path, monkeypatch):
    """conf/sae/gemma_2b_res_jb.yaml: sae-lens knows an SAE at layers 0, 6, 10, 12, 17 and none at 7."""
    from pathlib import Path

    from omegaconf import OmegaConf

    from xmodal.conf_dir import CONF_DIR

    sae = OmegaConf.load(Path(CONF_DIR) / "sae" / "gemma_2b_res_jb.yaml")
    assert (sae.release, sae.id_template) == ("gemma-2b-res-jb", "blocks.{layer}.hook_resid_post")
    with pytest.raises(SAEError, match=r"release 'gemma-2b-res-jb' has no SAE 'blocks.7.hook_resid_post'.*its layers are \[0, 6, 10, 12, 17\]"):
        pretrained_sae("jb", sae.release, sae.id_template, layer=7)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache: the known id gets as far as the download
    with pytest.raises(SAEError, match="could not load SAE gemma-2b-res-jb/blocks.6.hook_resid_post offline or from the hub"):
        pretrained_sae("jb", sae.release, sae.id_template, layer=6, device="cpu")


def test_no_sae_passes_residuals_through():
    space = no_sae()
    space.check_model("tiny", hidden_size=64, layer=1)
    resid = torch.randn(5, 64)
    assert torch.equal(space.encode(resid), resid) and space.d_sae == 64
