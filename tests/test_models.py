"""Adapters: the tokenizer's special tokens, layer checks, and clear loading errors."""

from __future__ import annotations

import pytest

from xmodal.errors import ConfigError, ModelLoadError
from xmodal.models import Gemma3Adapter, TextOnlyAdapter
from xmodal.models.tokenizer import special_token_ids


def test_tiny_special_token_ids_match_the_real_tokenizer(tiny):
    tok = tiny.tokenizer
    ids = special_token_ids()
    assert tok.convert_tokens_to_ids(tok.image_token) == ids["image_token_id"]
    assert tok.convert_tokens_to_ids(tok.boi_token) == ids["boi_token_id"]
    assert tok.convert_tokens_to_ids(tok.eoi_token) == ids["eoi_token_id"]
    assert len(tok("x" + tok.image_token * 3)["input_ids"]) == 5  # <bos>, x, three single image tokens


def test_layer_out_of_range(tiny):
    tiny.check_layer(tiny.num_layers - 1)
    with pytest.raises(ConfigError, match=r"layer=99 is out of range for model 'tiny', which has 6 decoder layers \(0..5\)"):
        tiny.check_layer(99)


def test_unknown_hub_id_offline_says_how_to_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match=r"could not load model config 'google/no-such-vlm'.*offline.*local copy"):
        Gemma3Adapter.from_pretrained("x", "google/no-such-vlm")


def test_missing_local_directory(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        TextOnlyAdapter.from_pretrained("x", str(tmp_path / "gemma-2-2b"))


def test_text_only_model_refuses_images():
    adapter = TextOnlyAdapter("t", hf_config=None, load_model=None, load_processor=None, identity={}, device="cpu")
    with pytest.raises(ConfigError, match="text-only"):
        adapter.image_inputs([], "", True)


def test_hub_reachability_is_asked_once_and_fast(tmp_path, monkeypatch):
    """A folder is there; an uncached hub id offline is not, and the answer comes without from_pretrained's retries."""
    import time

    from huggingface_hub import constants

    from xmodal.models.base import hub_model_reachable

    assert hub_model_reachable(str(tmp_path))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    start = time.perf_counter()
    assert not hub_model_reachable("google/vit-base-patch16-224-in21k")
    assert time.perf_counter() - start < 5


def test_local_weights_are_identified_by_content_not_path(tmp_path):
    from xmodal.models.base import content_digest, local_weights_digest

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"weights v1")
    first = local_weights_digest(folder)
    assert local_weights_digest(folder) == first
    (folder / "model.safetensors").write_bytes(b"weights v2")  # retrained in place: same size, new mtime
    assert local_weights_digest(folder) != first
    (folder / "model.safetensors").write_bytes(b"weights v1")
    assert local_weights_digest(folder) == first, "the same bytes are the same model wherever and whenever written"
    assert local_weights_digest(tmp_path / "not_a_folder") is None
    assert content_digest([folder / "config.json"]) != content_digest([folder / "model.safetensors"])
