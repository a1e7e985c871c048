"""The streaming pass and its cache: the same numbers as in-memory extraction, reused when nothing
changed, missed when any key part changes, resumed after a kill, and bounded in memory."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.test_sae import save_jumprelu_sae
from xmodal.activations import readout as readout_module
from xmodal.activations.cache import ActivationCache, get_activations, get_readouts
from xmodal.activations.codes import codes_from_readout, codes_plan, concept_codes
from xmodal.activations.extract import extract_activations
from xmodal.data.synthetic import synthetic_shapes
from xmodal.models.tiny import tiny_gemma3
from xmodal.saes.loading import local_sae


def unloadable_tiny():
    """Same identity as the session's tiny model, but loading its weights fails the test."""
    adapter = tiny_gemma3(device="cpu")

    def refuse():
        raise AssertionError("weights were loaded although every activation was cached")

    adapter._load_model = refuse
    return adapter


@pytest.fixture(scope="module")
def sae(tmp_path_factory):
    path = tmp_path_factory.mktemp("sae")
    save_jumprelu_sae(path, d_in=64, d_sae=128, layer=2)
    return local_sae("jumprelu", str(path), layer=2, device="cpu")


@pytest.mark.parametrize("image_pooling", ["mean", "max", "topn", "topn_per_token", "eoi"])
def test_streamed_codes_equal_in_memory_extraction_then_encoding(tmp_path, tiny, synthetic, positions, sae, image_pooling):
    positions = dataclasses.replace(positions, image_pooling=image_pooling, text_pooling="max", top_n=3)
    want = concept_codes(extract_activations(tiny, synthetic, [2], positions, progress=False)[2], sae, positions)
    readout = get_readouts(tiny, synthetic, [codes_plan(2, sae, positions)], positions, ActivationCache(tmp_path), progress=False)[2]
    got = codes_from_readout(readout, positions)
    assert got.concepts == want.concepts and got.image_sources == want.image_sources
    torch.testing.assert_close(torch.from_numpy(got.text), torch.from_numpy(want.text), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.from_numpy(got.image), torch.from_numpy(want.image), rtol=1e-5, atol=1e-6)
    # every image token's codes, stored sparse, give back the dense codes
    acts = extract_activations(tiny, synthetic, [2], positions, progress=False)[2]
    for i in (0, len(synthetic.images) - 1):
        torch.testing.assert_close(readout.image_tokens[i], sae.encode(acts.image_tokens[i]), rtol=1e-5, atol=1e-6)


def test_second_run_reads_the_cache_without_loading_the_model(tmp_path, tiny, synthetic, positions):
    cache = ActivationCache(tmp_path)
    first = get_activations(tiny, synthetic, [1, 3], positions, cache, progress=False)
    assert (cache.hits, cache.misses) == (0, 2)
    second = get_activations(unloadable_tiny(), synthetic, [3, 1], positions, cache, progress=False)
    assert cache.hits == 2
    reference = extract_activations(tiny, synthetic, [1, 3], positions, progress=False)
    for layer in (1, 3):
        assert torch.equal(first[layer].text_tokens, second[layer].text_tokens)
        assert torch.equal(second[layer].image_tokens.dense(), reference[layer].image_tokens)
        assert torch.equal(second[layer].image_eoi, reference[layer].image_eoi)
        assert second[layer].image_sources == first[layer].image_sources
    assert not list(tmp_path.rglob("*.tmp")), "temporary files left behind"


def test_preset_layers_ride_along_so_a_layer_sweep_extracts_once(tmp_path, tiny, synthetic, positions):
    cache = ActivationCache(tmp_path)
    first = get_activations(tiny, synthetic, [1], positions, cache, progress=False, also_cache=[1, 2, 3])
    assert list(first) == [1] and (cache.hits, cache.misses) == (0, 1)
    rest = get_activations(unloadable_tiny(), synthetic, [2, 3], positions, cache, progress=False, also_cache=[1, 2, 3])
    assert list(rest) == [2, 3] and cache.hits == 2
    alone = get_activations(tiny, synthetic, [3], positions, None, progress=False)
    assert torch.equal(rest[3].image_tokens.dense(), alone[3].image_tokens.dense())  # the same numbers as layer 3 alone


@pytest.mark.parametrize("change", ["layer", "text_prompt", "image_prompt", "dataset", "model", "pooling"])
def test_any_key_part_change_misses(tmp_path, tiny, synthetic, positions, sae, change):
    cache = ActivationCache(tmp_path)
    space = local_sae("jumprelu", str(sae.identity["path"]), layer=2, device="cpu")
    get_readouts(tiny, synthetic, [codes_plan(2, space, positions)], positions, cache, progress=False)
    adapter, dataset = tiny, synthetic
    if change == "layer":
        space = local_sae("jumprelu", str(sae.identity["path"]), layer=1, device="cpu")
    elif change == "text_prompt":
        positions = dataclasses.replace(positions, text_prompt="A picture of {concept}")
    elif change == "image_prompt":
        positions = dataclasses.replace(positions, image_prompt="Describe the image.")
    elif change == "dataset":
        dataset = synthetic_shapes(images_per_concept=2, seed=1)
    elif change == "model":
        adapter = tiny_gemma3(device="cpu", init_seed=1)
    elif change == "pooling":
        positions = dataclasses.replace(positions, image_pooling="max")
    get_readouts(adapter, dataset, [codes_plan(space.layer, space, positions)], positions, cache, progress=False)
    assert cache.misses == 2 and cache.hits == 0


def test_a_killed_pass_resumes_without_redoing_its_finished_shards(tmp_path, tiny, synthetic, positions, sae, monkeypatch):
    monkeypatch.setattr(readout_module, "SHARD_BYTES", 1)  # a shard per batch of 4 images: 4 shards
    plan = codes_plan(2, sae, positions)
    whole = get_readouts(tiny, synthetic, [plan], positions, ActivationCache(tmp_path / "whole"), progress=False)[2]
    n_batches = -(-len(synthetic.images) // positions.batch_size)
    assert len(whole.image_tokens.shards) == n_batches >= 3

    real_hidden, real_save = readout_module.image_batch_hidden, readout_module.save_shard
    forwards, saved = [], []

    def counting_hidden(adapter, inputs, layers, site="resid_post"):
        forwards.append(len(inputs["input_ids"]))
        return real_hidden(adapter, inputs, layers, site)

    def dying_save(directory, name, tensors, metadata, on_error):
        if name.startswith("images_") and len(saved) == 2:
            raise KeyboardInterrupt  # killed while the third image shard is being written
        if name.startswith("images_"):
            saved.append(name)
        return real_save(directory, name, tensors, metadata, on_error)

    monkeypatch.setattr(readout_module, "image_batch_hidden", counting_hidden)
    monkeypatch.setattr(readout_module, "save_shard", dying_save)
    cache = ActivationCache(tmp_path / "killed")
    with pytest.raises(KeyboardInterrupt):
        get_readouts(tiny, synthetic, [plan], positions, cache, progress=False)
    with pytest.raises(Exception, match="unfinished"):
        readout_module.read_layer(next((tmp_path / "killed").rglob("readout.json")).parent)
    forwards.clear()
    monkeypatch.setattr(readout_module, "save_shard", real_save)
    resumed = get_readouts(tiny, synthetic, [plan], positions, cache, progress=False)[2]
    assert len(forwards) == n_batches - 2, "finished shards were run through the model again"
    assert torch.equal(resumed.image_pooled[plan.image_poolings[0]], whole.image_pooled[plan.image_poolings[0]])
    assert torch.equal(resumed.image_tokens.dense(), whole.image_tokens.dense())
    assert not list((tmp_path / "killed").rglob("*.tmp"))


def test_memory_holds_one_shard_and_one_batch_whatever_the_dataset(tmp_path, tiny, positions, monkeypatch):
    """The pass's buffer stays under the shard budget plus one batch, for 12 or 48 images alike."""
    monkeypatch.setattr(readout_module, "SHARD_BYTES", 40_000)
    for per_concept in (2, 8):
        dataset = synthetic_shapes(images_per_concept=per_concept, seed=0)
        readout = get_activations(tiny, dataset, [1], positions, ActivationCache(tmp_path / str(per_concept)), progress=False)[1]
        assert len(readout.image_tokens) == len(dataset.images)
        per_image = (readout.tokens_per_image + 1) * readout.width * 4 + 4  # dense tokens, end-of-image row, token count
        bound = 40_000 + positions.batch_size * per_image
        assert readout.progress["peak_buffer_bytes"] < bound
        assert len(readout.image_tokens.shards) >= len(dataset.images) * per_image // bound  # written as it went
