"""The activation cache is reused when nothing changed and missed when any key part changes."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from xmodal.activations.cache import ActivationCache, get_activations
from xmodal.data.synthetic import synthetic_shapes
from xmodal.models.tiny import tiny_gemma3


def unloadable_tiny():
    """Same identity as the session's tiny model, but loading its weights fails the test."""
    adapter = tiny_gemma3(device="cpu")

    def refuse():
        raise AssertionError("weights were loaded although every activation was cached")

    adapter._load_model = refuse
    return adapter


def test_second_run_reads_the_cache_without_loading_the_model(tmp_path, tiny, synthetic, positions):
    cache = ActivationCache(tmp_path)
    first = get_activations(tiny, synthetic, [1, 3], positions, cache, progress=False)
    assert (cache.hits, cache.misses) == (0, 2)
    second = get_activations(unloadable_tiny(), synthetic, [3, 1], positions, cache, progress=False)
    assert cache.hits == 2
    for layer in (1, 3):
        assert torch.equal(first[layer].text_tokens, second[layer].text_tokens)
        assert torch.equal(first[layer].image_tokens, second[layer].image_tokens)
        assert second[layer].image_sources == first[layer].image_sources
    assert not list(tmp_path.rglob("*.tmp")), "temporary files left behind"


def test_preset_layers_ride_along_so_a_layer_sweep_extracts_once(tmp_path, tiny, synthetic, positions):
    cache = ActivationCache(tmp_path)
    first = get_activations(tiny, synthetic, [1], positions, cache, progress=False, also_cache=[1, 2, 3])
    assert list(first) == [1] and (cache.hits, cache.misses) == (0, 1)
    rest = get_activations(unloadable_tiny(), synthetic, [2, 3], positions, cache, progress=False, also_cache=[1, 2, 3])
    assert list(rest) == [2, 3] and cache.hits == 2
    alone = get_activations(tiny, synthetic, [3], positions, None, progress=False)
    assert torch.equal(rest[3].image_tokens, alone[3].image_tokens)  # the same numbers as extracting layer 3 alone


@pytest.mark.parametrize("change", ["layer", "text_prompt", "image_prompt", "dataset", "model"])
def test_any_key_part_change_misses(tmp_path, tiny, synthetic, positions, change):
    cache = ActivationCache(tmp_path)
    get_activations(tiny, synthetic, [1], positions, cache, progress=False)
    adapter, dataset, layer = tiny, synthetic, 1
    if change == "layer":
        layer = 2
    elif change == "text_prompt":
        positions = dataclasses.replace(positions, text_prompt="A picture of {concept}")
    elif change == "image_prompt":
        positions = dataclasses.replace(positions, image_prompt="Describe the image.")
    elif change == "dataset":
        dataset = synthetic_shapes(images_per_concept=2, seed=1)
    elif change == "model":
        adapter = tiny_gemma3(device="cpu", init_seed=1)
    get_activations(adapter, dataset, [layer], positions, cache, progress=False)
    assert cache.misses == 2 and cache.hits == 0
