"""Every family adapter loads a checkpoint from a local directory and reads the right positions.

Each test saves a tiny random model of the family's real transformers class (with the
real Gemma tokenizer) to disk with save_pretrained, loads it back through the
adapter's from_pretrained, and checks resid_post against output_hidden_states and
the image positions against the processor's image-token mask.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from xmodal.activations.capture import run_to_layers
from xmodal.models import Gemma3Adapter, LlavaAdapter, PaliGemmaAdapter, TextOnlyAdapter
from xmodal.models.tokenizer import IMAGE_SOFT_TOKEN, gemma3_chat_template, gemma3_tokenizer

TINY_TEXT = dict(vocab_size=262144, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1, head_dim=16)


def _tokenizer(tiny):
    # A fresh copy of the cached Gemma 3 tokenizer: some processors (PaliGemma) change the
    # tokenizer they are given, and the session's tiny model must not see that.
    return gemma3_tokenizer("~/.cache/xmodal/models")


def save_gemma3(path, tiny):
    tiny.model.save_pretrained(path)
    tiny.processor.save_pretrained(path)
    return Gemma3Adapter, tiny.hf_config.mm_tokens_per_image


def save_llava(path, tiny):
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tok = _tokenizer(tiny)
    config = LlavaConfig(
        text_config=dict(model_type="gemma", **TINY_TEXT),
        vision_config=dict(
            model_type="clip_vision_model",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
            projection_dim=32,
        ),
        image_token_id=tok.convert_tokens_to_ids(IMAGE_SOFT_TOKEN),
    )
    LlavaForConditionalGeneration(config).save_pretrained(path)
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tok,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=gemma3_chat_template().replace("<start_of_image>", IMAGE_SOFT_TOKEN),
    )
    processor.save_pretrained(path)
    return LlavaAdapter, (32 // 8) ** 2


def save_paligemma(path, tiny):
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration, PaliGemmaProcessor, SiglipImageProcessor

    tok = _tokenizer(tiny)
    config = PaliGemmaConfig(
        text_config=dict(model_type="gemma2", **TINY_TEXT),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8, projection_dim=32),
        image_token_id=tok.convert_tokens_to_ids(IMAGE_SOFT_TOKEN),
        projection_dim=32,
    )
    config.text_config.num_image_tokens = 16
    PaliGemmaForConditionalGeneration(config).save_pretrained(path)
    image_processor = SiglipImageProcessor(size={"height": 32, "width": 32})
    image_processor.image_seq_length = 16
    PaliGemmaProcessor(image_processor=image_processor, tokenizer=tok).save_pretrained(path)
    return PaliGemmaAdapter, 16


def save_gemma2_text(path, tiny):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    Gemma2ForCausalLM(Gemma2Config(**TINY_TEXT)).save_pretrained(path)
    _tokenizer(tiny).save_pretrained(path)
    return TextOnlyAdapter, 0


@pytest.mark.parametrize("family", [save_gemma3, save_llava, save_paligemma, save_gemma2_text], ids=lambda f: f.__name__[5:])
def test_family_loads_from_local_directory_and_reads_right_positions(family, tiny, tmp_path):
    torch.manual_seed(0)
    adapter_class, n_image_tokens = family(tmp_path / "ckpt", tiny)
    adapter = adapter_class.from_pretrained("local", str(tmp_path / "ckpt"), dtype="float32", device="cpu")
    layers = list(range(adapter.num_layers - 1))

    prompt = adapter.text_prompt("{concept}", "a red apple", use_chat_template=True)
    assert adapter.tokenizer.decode([prompt.input_ids[i] for i in prompt.concept_positions]).strip() == "a red apple"
    all_inputs = [{"input_ids": torch.tensor([prompt.input_ids])}]
    if adapter.supports_images:
        image_inputs = adapter.image_inputs([Image.new("RGB", (40, 30), (200, 30, 30))], "What is it?", True)
        assert int(adapter.image_token_mask(image_inputs["input_ids"]).sum()) == n_image_tokens
        all_inputs.append(dict(image_inputs))
    for inputs in all_inputs:
        captured = run_to_layers(adapter.model, adapter.decoder_layers(), inputs, layers)
        with torch.inference_mode():
            reference = adapter.model(**inputs, output_hidden_states=True, use_cache=False).hidden_states
        for layer in layers:
            torch.testing.assert_close(captured[layer], reference[layer + 1], rtol=0, atol=1e-5)


# ------------------------------------------------------------------ the newer families ----
# Tiny random models of each family's real transformers class (xmodal.models.tiny_families),
# with byte-level tokenizers carrying the family's special tokens: dynamic resolution, anyres
# tiles with newlines, tiles plus thumbnail, image splitting.
TINY_FAMILIES = ["qwen2_5_vl", "qwen3_vl", "gemma4", "llava_next", "llava_onevision", "internvl", "idefics3", "smolvlm"]


@pytest.fixture(scope="module")
def tiny_families():
    from xmodal.models.tiny_families import tiny_family

    return {family: tiny_family(family, device="cpu") for family in TINY_FAMILIES}


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_verify_passes_on_each_tiny_family(family, tiny_families):
    from xmodal.verify import format_table, verify_model

    checks = verify_model(tiny_families[family])
    assert all(c.ok for c in checks), format_table(family, checks)
    assert len(checks) == 9


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_ragged_batch_gives_each_image_its_own_tokens(family, tiny_families):
    """A wide and a square image in one padded batch: each is read by its own row of the processor's
    mask, minus the newline tokens its layout marks, and a wide image gets a wide grid."""
    from xmodal.activations.extract import image_batch_ragged

    adapter = tiny_families[family]
    wide, square = Image.new("RGB", (96, 32), (200, 30, 30)), Image.new("RGB", (48, 48), (30, 200, 30))
    inputs = dict(adapter.image_inputs([wide, square], "What is it?", True))
    mask = adapter.processor_image_mask(inputs)
    assert torch.equal(mask, adapter.image_token_mask(inputs["input_ids"]))
    layouts = adapter.image_layouts(inputs)
    tokens, eoi, _ = image_batch_ragged(adapter, inputs, [1])
    for row, layout, rows in zip(mask, layouts, tokens[1]):
        assert len(layout.content) == int(row.sum())
        assert len(rows) == int(layout.content.sum()) == sum(r * c for r, c in layout.grids)
    assert eoi[1].shape == (2, adapter.hidden_size)
    # each image alone gives the same rows as in the padded batch
    for index, image in enumerate([wide, square]):
        alone, _, _ = image_batch_ragged(adapter, dict(adapter.image_inputs([image], "What is it?", True)), [1])
        torch.testing.assert_close(alone[1][0], tokens[1][index], rtol=0, atol=1e-5)
    if family in ("qwen2_5_vl", "qwen3_vl", "gemma4"):  # one grid at the image's own aspect
        (rows_w, cols_w), (rows_s, cols_s) = layouts[0].grids[0], layouts[1].grids[0]
        assert cols_w > rows_w and cols_s == rows_s
        assert int(mask[0].sum()) != int(mask[1].sum())


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_overlap_finishes_on_each_tiny_family(family, tmp_path):
    from tests.conftest import run_in_process

    code = run_in_process(
        "experiment=overlap",
        f"model=tiny_{family}",
        "sae=none",
        "dataset=synthetic",
        "dataset.images_per_concept=2",
        f"paths.activation_cache={tmp_path / 'cache'}",
        run_dir=tmp_path / "run",
    )
    assert code == 0
    assert (tmp_path / "run" / "result.json").exists()


@pytest.mark.slow
def test_a_preset_sweep_runs_on_every_tiny_family(tmp_path):
    """layer=preset:0,preset:1 over every family in one sweep: each job resolves the family's own presets."""
    import pandas as pd

    from tests.conftest import run_in_process

    models = ",".join(f"tiny_{family}" for family in TINY_FAMILIES)
    code = run_in_process(
        "-m",
        "experiment=overlap",
        f"model={models}",
        "layer=preset:0,preset:1",
        "sae=none",
        "dataset=synthetic",
        "dataset.images_per_concept=2",
        "experiment.n_permutations=20",
        f"paths.activation_cache={tmp_path / 'cache'}",
        run_dir=tmp_path / "sweep",
    )
    summary = pd.read_parquet(tmp_path / "sweep" / "summary.parquet")
    assert code == 0, summary[["model", "layer", "status", "error"]]
    assert len(summary) == 2 * len(TINY_FAMILIES) and (summary["status"] == "ok").all()
    assert set(summary["model"]) == {f"tiny_{family}" for family in TINY_FAMILIES}
    assert all(sorted(group["layer"]) == [1, 2] for _, group in summary.groupby("model"))  # tiny_<family>: presets [1, 2]


def test_ragged_readout_keeps_each_image_its_token_count(tiny_families, tmp_path):
    """The streaming readout of a dynamic-resolution model stores each image's own token count."""
    from xmodal.activations.readout import ReadoutPlan, TokenKeep, read_layer, stream_readouts
    from xmodal.config import PositionsConfig
    from xmodal.saes.loading import FeatureSpace

    adapter = tiny_families["qwen2_5_vl"]
    sizes = [(96, 32), (48, 48), (32, 96)]
    dataset = _dataset_of_sizes(sizes)
    plan = ReadoutPlan(1, FeatureSpace("raw", 1, None, adapter.hidden_size, {"kind": "raw"}), image_poolings=(("mean", 5),), tokens=TokenKeep.dense)
    stream_readouts(adapter, dataset, [plan], [tmp_path / "layer1"], PositionsConfig(batch_size=3), batch_size=3, progress=False)
    readout = read_layer(tmp_path / "layer1")
    counts = readout.image_tokens.counts.tolist()
    assert counts == [int(adapter.image_token_mask(adapter.image_inputs([img.load()], "", True)["input_ids"]).sum()) for img in dataset.images]
    assert len(set(counts)) > 1
    for index, tokens in enumerate(readout.image_tokens):
        torch.testing.assert_close(readout.image_pooled[("mean", 5)][index], tokens.mean(dim=0), rtol=0, atol=1e-5)
    # a feature's heat map lies at each image's own aspect: wide, square, tall
    maps = readout.image_tokens.feature_maps_per_image([0])[0]
    shapes = [readout.image_tokens.token_map(i, maps[i]).shape for i in range(3)]
    assert shapes[0][1] > shapes[0][0] and shapes[1][0] == shapes[1][1] and shapes[2][0] > shapes[2][1], shapes


def test_sae_train_on_ragged_images_and_the_sae_loads_as_local(tmp_path):
    """xmodal.sae_train on tiny_qwen2_5_vl over images of three sizes: the store holds each image's own
    token count, and the SAE it writes is read by a study as sae=local."""
    import json
    import os
    import subprocess
    import sys

    import pandas as pd

    from tests.conftest import run_in_process
    from xmodal.models.tiny_families import tiny_family

    sizes = [(96, 32), (48, 48), (32, 96)]
    for concept, colour in (("apple", (200, 30, 30)), ("pear", (40, 190, 60)), ("plum", (90, 40, 160))):
        (tmp_path / "photos" / concept).mkdir(parents=True)
        for index, size in enumerate(sizes):
            Image.new("RGB", size, tuple(min(255, c + 20 * index) for c in colour)).save(tmp_path / "photos" / concept / f"{index}.png")
    # concept texts long enough (bytes are tokens here) that the held-out shard holds text rows too
    texts = {"apple": "a round red apple on a plain table", "pear": "a ripe green pear beside a glass", "plum": "a small purple plum in the shade"}
    (tmp_path / "photos" / "concepts.csv").write_text("concept,text\n" + "".join(f"{c},{t}\n" for c, t in texts.items()))
    dataset = ["dataset=image_folder", f"dataset.root={tmp_path / 'photos'}"]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "xmodal.sae_train",
            "model=tiny_qwen2_5_vl",
            *dataset,
            "layers=[1]",
            "store.texts=concepts",
            "store.shard_tokens=40",
            "positions.batch_size=1",  # one item a batch: the shuffled plan mixes texts into every shard
            "store.eval_fraction=0.4",
            f"store.dir={tmp_path / 'store'}",
            f"out_dir={tmp_path / 'sae'}",
            "training.d_sae=32",
            "training.k=8",
            "training.training_tokens=4000",
            "training.batch_size=64",
        ],
        cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"},
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    adapter = tiny_family("qwen2_5_vl", device="cpu")
    counts = [int(adapter.image_token_mask(adapter.image_inputs([Image.new("RGB", size)], "", True)["input_ids"]).sum()) for size in sizes]
    assert len(set(counts)) > 1  # the three sizes give three token counts
    quality = pd.read_csv(tmp_path / "sae" / "quality.csv").set_index("tokens")
    manifest = json.loads((tmp_path / "store" / "progress.json").read_text())
    assert sum(shard["image_rows"] for shard in manifest["shards"]) == 3 * sum(counts)  # every image its own rows
    assert quality.loc["image", "n_tokens"] > 0 and quality.loc["image", "d_sae"] == 32
    code = run_in_process(
        "experiment=overlap",
        "model=tiny_qwen2_5_vl",
        *dataset,
        "layer=1",
        "sae=local",
        f"sae.path='{tmp_path / 'sae' / 'layer_{layer}'}'",
        "experiment.n_permutations=20",
        f"paths.activation_cache={tmp_path / 'cache'}",
        run_dir=tmp_path / "overlap",
    )
    assert code == 0
    result = json.loads((tmp_path / "overlap" / "result.json").read_text())
    assert result["sae"] == "local" and result["sae_width"] == 32


def test_cross_attention_models_are_refused_in_one_line(tmp_path):
    from transformers import MllamaConfig

    from xmodal.errors import ConfigError

    MllamaConfig().save_pretrained(tmp_path / "mllama")
    with pytest.raises(ConfigError, match="cross-attention") as caught:
        LlavaAdapter.from_pretrained("mllama", str(tmp_path / "mllama"), device="cpu")
    assert "\n" not in str(caught.value)


def test_a_processor_without_an_image_token_fails_in_one_line_without_a_result(tmp_path, monkeypatch, capsys):
    import xmodal.models.tiny_families as tiny_families_module
    from tests.conftest import run_in_process

    monkeypatch.setattr(tiny_families_module, "images_only_processor", lambda processor_class, **kwargs: kwargs["tokenizer"])
    code = run_in_process(
        "experiment=overlap", "model=tiny_qwen2_5_vl", "sae=none", "dataset=synthetic", f"paths.activation_cache={tmp_path / 'cache'}", run_dir=tmp_path / "run"
    )
    output = "".join(capsys.readouterr())
    assert code == 2
    assert "has no image token or image processor" in output
    assert not (tmp_path / "run" / "result.json").exists()


def _dataset_of_sizes(sizes):
    import io

    from xmodal.data.concepts import Concept, ConceptDataset, ConceptImage

    images = []
    for index, size in enumerate(sizes):
        encoded = io.BytesIO()
        Image.new("RGB", size, (40 * index, 200, 90)).save(encoded, format="PNG")
        images.append(ConceptImage(["apple", "pear"][index % 2], f"drawn {size}", encoded.getvalue()))
    return ConceptDataset("sizes", [Concept("apple", "a red apple"), Concept("pear", "a green pear")], images)


@pytest.mark.slow
@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("study", ["features", "lens", "steering"])
def test_sae_studies_finish_on_tiny_families(study, family, tmp_path):
    """features (heat maps at each image's own grid, newlines left out), lens and steering on ragged families."""
    from tests.conftest import run_in_process
    from tests.test_sae import save_jumprelu_sae

    save_jumprelu_sae(tmp_path / "sae" / "layer_1", d_in=64, d_sae=128)
    extra = ["experiment.concept=red_circle", "experiment.images=[blue_square,green_circle]"] if study == "steering" else []
    code = run_in_process(
        f"experiment={study}",
        f"model=tiny_{family}",
        "sae=local",
        f"sae.path='{tmp_path / 'sae' / 'layer_{layer}'}'",
        "dataset=synthetic",
        "dataset.images_per_concept=2",
        *extra,
        f"paths.activation_cache={tmp_path / 'cache'}",
        run_dir=tmp_path / "run",
    )
    assert code == 0, (tmp_path / "run" / "failure.json").read_text() if (tmp_path / "run" / "failure.json").exists() else code
    assert (tmp_path / "run" / "result.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_das_synthesises_square_images_on_each_tiny_family(family, tmp_path):
    """Pixel synthesis through the map probed off each family's processor (tiles, patches, padding),
    with the apples-oranges alignment at every layer; each image is the family's synthesis side."""
    from tests.conftest import run_in_process
    from xmodal.models.tiny_families import tiny_family

    code = run_in_process(
        "experiment=das",
        "experiment.steps=3",
        "experiment.judge=none",
        "experiment.concepts=[red_circle,blue_square]",
        "experiment.alignment_concepts=[red_circle,blue_square,green_circle]",
        f"model=tiny_{family}",
        "dataset=synthetic",
        "dataset.images_per_concept=2",
        f"paths.activation_cache={tmp_path / 'cache'}",
        run_dir=tmp_path / "run",
    )
    assert code == 0, (tmp_path / "run" / "failure.json").read_text() if (tmp_path / "run" / "failure.json").exists() else code
    side = tiny_family(family, device="cpu").synthesis_side()
    for name in ("red_circle", "blue_square"):
        assert Image.open(tmp_path / "run" / "images" / f"das_{name}.png").size == (side, side)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava_next", "idefics3", "gemma4"])
def test_the_probed_pixel_map_is_the_processor_on_any_image(family, tiny_families):
    """The map gives the processor's own pixel tensor for a batch of new images, and gradients reach the pixels."""
    adapter = tiny_families[family]
    side = adapter.synthesis_side()
    to_pixel_values = adapter.synthesis_pixels("What is it?")
    images = torch.rand(2, 3, side, side, generator=torch.Generator().manual_seed(1))
    pil = [Image.fromarray((image.permute(1, 2, 0) * 255).round().byte().numpy()) for image in images]
    expected = adapter.image_inputs(pil, "What is it?", True, **adapter.synthesis_processor_kwargs)["pixel_values"]
    unit = (images * 255).round() / 255
    unit.requires_grad_(True)
    got = to_pixel_values(unit)
    torch.testing.assert_close(got, expected.float(), rtol=0, atol=1e-4)
    got.sum().backward()
    assert unit.grad is not None and bool(unit.grad.abs().sum() > 0)


def test_a_processor_that_resamples_is_refused_in_one_line():
    from xmodal.errors import ConfigError
    from xmodal.models.pixels import PixelMap

    def halves(image):  # a processor that resizes: each output pixel mixes four inputs
        small = image.resize((image.width // 2, image.height // 2), Image.BILINEAR)
        return torch.from_numpy(np.asarray(small, dtype=np.float32) / 255)

    with pytest.raises(ConfigError, match="resamples a 16x16 image") as caught:
        PixelMap.probe(16, halves, "halving")
    assert "\n" not in str(caught.value)


def test_activation_store_rows_take_ragged_images(tiny_families):
    """xmodal.sae_train's store: each image contributes its own number of token rows."""
    from xmodal.activations.store import IMAGE, stream_rows
    from xmodal.config import PositionsConfig

    adapter = tiny_families["qwen2_5_vl"]
    dataset = _dataset_of_sizes([(96, 32), (48, 48), (32, 96), (64, 32)])
    (rows, modality, item), *_ = stream_rows(adapter, dataset, [], [(IMAGE, [0, 1, 2, 3])], [1], PositionsConfig(batch_size=4), progress=False)
    counts = torch.bincount(item, minlength=4).tolist()
    expected = [int(adapter.image_token_mask(adapter.image_inputs([img.load()], "", True)["input_ids"]).sum()) for img in dataset.images]
    assert counts == expected and len(set(counts)) > 1
    assert rows[1].shape == (sum(counts), adapter.hidden_size) and bool((modality == IMAGE).all())


# What the README's table of pretrained SAEs for the new families says: release -> the model it was trained on.
README_SAES = {
    "qwen2.5-7b-instruct-andyrdt": "Qwen/Qwen2.5-7B-Instruct",
    "llama-3.1-8b-instruct-andyrdt": "meta-llama/Llama-3.1-8B-Instruct",
    "goodfire-llama-3.1-8b-instruct": "meta-llama/Llama-3.1-8B-Instruct",
    "qwen-scope-3-1.7b-base-w32k-l50": "Qwen/Qwen3-1.7B-Base",
    "qwen-scope-3-1.7b-base-w32k-l100": "Qwen/Qwen3-1.7B-Base",
    "qwen-scope-3-8b-base-w64k-l50": "Qwen/Qwen3-8B-Base",
    "qwen-scope-3-8b-base-w64k-l100": "Qwen/Qwen3-8B-Base",
    "mwhanna-qwen3-1.7b-transcoders-lowl0": "qwen3-1.7b",
    "mwhanna-qwen3-4b-transcoders": "qwen3-4b",
    "mwhanna-qwen3-8b-transcoders": "qwen3-8b",
}


def test_the_readme_names_the_pretrained_saes_sae_lens_has_for_the_new_families():
    """Each release the README names is in sae-lens's directory for that model; no release there reads one
    of the new families' VLM checkpoints; every Qwen3 base xmodal pairs with Qwen3-VL that has SAEs is named."""
    from pathlib import Path

    from omegaconf import OmegaConf
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    from tests.conftest import REPO

    directory = get_pretrained_saes_directory()
    readme = (REPO / "README.md").read_text()
    for release, model in README_SAES.items():
        assert release in directory and directory[release].model == model, release
        assert f"`{release}`" in readme, release
    families = ("qwen2_5_vl", "qwen3_vl", "gemma4", "llava_next", "llava_onevision", "internvl3", "idefics3", "smolvlm2")
    checkpoints = {
        OmegaConf.load(path).name_or_path.lower()
        for path in Path(REPO / "conf" / "model").glob("*.yaml")
        if path.stem.startswith(families) and "name_or_path" in OmegaConf.load(path)
    }
    assert len(checkpoints) >= 14
    assert not {release for release, entry in directory.items() if entry.model.lower() in checkpoints}
    bases = {OmegaConf.load(REPO / "conf" / "model" / f"{name}.yaml").name_or_path for name in ("qwen3_1_7b_base", "qwen3_8b_base")}
    assert bases <= set(README_SAES.values())
