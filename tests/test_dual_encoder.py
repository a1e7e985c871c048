"""Dual encoders (CLIP, SigLIP): one embedding per text and per image, read by the studies that need no decoder."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import run_cli
from xmodal.config import PositionsConfig
from xmodal.data.synthetic import synthetic_shapes
from xmodal.errors import ConfigError


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    from xmodal.models.dual_encoder import tiny_clip

    return tiny_clip(cache_dir=str(tmp_path_factory.mktemp("models")), device="cpu")


def test_tiny_clip_is_written_to_disk_and_loads_back_as_a_checkpoint(clip, tmp_path):
    from xmodal.models.dual_encoder import CLIPAdapter

    folder = clip.identity["name_or_path"]
    again = CLIPAdapter.from_pretrained("again", folder, dtype="float32", device="cpu")  # the real local-directory path
    texts = ["red", "a photo of a blue square"]
    assert clip.embed_texts(texts).shape == (2, clip.hidden_size) == (2, 32)
    assert torch.allclose(clip.embed_texts(texts), again.embed_texts(texts))
    assert not torch.allclose(clip.embed_texts(["red"]), clip.embed_texts(["blue"]))
    assert (clip.num_layers, clip.has_decoder) == (3, False)  # the embedding, then two blocks per tower
    clip.check_layer(2)
    with pytest.raises(ConfigError, match="layer=3 is out of range for model 'clip_tiny', a dual encoder: layer=0 is the shared embedding"):
        clip.check_layer(3)


def test_embeddings_take_the_place_of_tokens_one_per_text_and_image(clip):
    from xmodal.activations.extract import extract_activations

    dataset = synthetic_shapes(images_per_concept=2, seed=0)
    acts = extract_activations(clip, dataset, [0], PositionsConfig(text_prompt="a photo of {concept}"), progress=False)[0]
    n_concepts, n_images = len(dataset.concepts), len(dataset.images)
    assert acts.text_tokens.shape == (n_concepts, 32) and acts.image_tokens.shape == (n_images, 1, 32)
    assert torch.allclose(acts.text_tokens_of(1)[0], clip.embed_texts([f"a photo of {dataset.concepts[1].text}"])[0], atol=1e-5)
    assert torch.allclose(acts.image_tokens[3, 0], clip.embed_images([dataset.images[3].load()])[0], atol=1e-5)

    # layer 1: the towers' hidden states after one block, text at its end-of-text token, images averaged over tokens
    tower = extract_activations(clip, dataset, [1], PositionsConfig(text_prompt="{concept}"), progress=False)[1]
    ids = clip.processor.tokenizer([dataset.concepts[0].text], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        text_states = clip.model.text_model(input_ids=ids, output_hidden_states=True).hidden_states[1]
        pixels = clip.processor.image_processor([dataset.images[0].load()], return_tensors="pt")["pixel_values"]
        image_states = clip.model.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states[1]
    assert torch.allclose(tower.text_tokens[0], text_states[0, -1], atol=1e-5)  # the last token is end-of-text
    assert torch.allclose(tower.image_tokens[0, 0], image_states[0].mean(dim=0), atol=1e-5)


def test_mds_probe_and_overlap_run_on_clip_and_decoder_studies_refuse_it(tmp_path):
    cache = [f"paths.activation_cache={tmp_path / 'cache'}", f"paths.model_cache={tmp_path / 'models'}"]
    for study, extra in (
        ("mds", ["experiment.n_null=20", "experiment.n_random_masks=3"]),
        ("probe", ["experiment.n_permutations=20"]),
        ("overlap", ["experiment.n_permutations=50"]),
    ):
        out = tmp_path / study
        proc = run_cli("model=clip_tiny", "layer=0", f"experiment={study}", *extra, *cache, f"hydra.run.dir={out}", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        result = json.loads((out / "result.json").read_text())
        assert (result["model"], result["layer"], result["sae"]) == ("clip_tiny", 0, "none")
    proc = run_cli(
        "model=clip_tiny", "experiment=probe", "layer=2", "experiment.n_permutations=20", *cache, f"hydra.run.dir={tmp_path / 'probe2'}", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "probe2" / "result.json").read_text())["layer"] == 2  # the towers after both blocks
    proc = run_cli("model=clip_tiny", "experiment=probe", "layer=5", *cache, f"hydra.run.dir={tmp_path / 'probe5'}", cwd=tmp_path)
    assert proc.returncode != 0 and "layer=5 is out of range for model 'clip_tiny'" in proc.stdout + proc.stderr
    proc = run_cli("model=clip_tiny", "experiment=steering", *cache, f"hydra.run.dir={tmp_path / 'steer'}", cwd=tmp_path)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Traceback" not in output
    assert sum("experiment=steering needs a decoder's residual stream, and model 'clip_tiny' is a dual encoder" in line for line in output.splitlines()) == 1, (
        output[-2000:]
    )
    assert not (tmp_path / "steer" / "result.json").exists()


def test_siglip_pads_texts_to_max_length_so_a_text_embeds_the_same_in_any_batch(tmp_path):
    """SigLIP pools the last position: with max-length padding (its adapter's choice) that is batch-independent."""
    import types

    from PIL import Image
    from transformers import CLIPTokenizer, SiglipConfig, SiglipModel
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    from xmodal.models.dual_encoder import SiglipAdapter, byte_level_clip_tokenizer_files

    byte_level_clip_tokenizer_files(tmp_path)  # any tokenizer will do for the mechanics
    tokenizer = CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"), model_max_length=16)
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    config = SiglipConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            max_position_embeddings=16,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **common,
        ),
        vision_config=dict(image_size=32, patch_size=8, **common),
    )
    torch.manual_seed(0)
    model = SiglipModel(config).eval()
    processor = types.SimpleNamespace(tokenizer=tokenizer, image_processor=SiglipImageProcessorPil(size={"height": 32, "width": 32}))
    siglip = SiglipAdapter("siglip_tiny", config, lambda: model, lambda: processor, {"family": "siglip"}, torch.device("cpu"))
    alone, in_batch = siglip.embed_texts(["red"])[0], siglip.embed_texts(["red", "a much longer blue square"])[0]
    assert siglip.hidden_size == 32 and torch.allclose(alone, in_batch, atol=1e-5)
    assert siglip.embed_images([Image.new("RGB", (40, 40), (255, 0, 0))]).shape == (1, 32)
