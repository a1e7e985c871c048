"""The activation store and SAE training from it: resumable, bounded, refusing what is not its own."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import subprocess
import sys

import pandas as pd
import pytest
import torch

from xmodal.activations import shards as store_module  # the store writes through the shared shard protocol
from xmodal.activations.batch_size import largest_fitting_batch
from xmodal.activations.store import ActivationStore, build_store
from xmodal.config import PositionsConfig
from xmodal.data.concepts import ConceptDataset
from xmodal.errors import ConfigError, StoreError

LAYERS = [1, 3]


@pytest.fixture(scope="module")
def captioned():
    from xmodal.data.synthetic import synthetic_shapes

    shapes = synthetic_shapes(images_per_concept=3, seed=0)
    images = [dataclasses.replace(img, caption=f"a picture of a {img.concept.replace('_', ' ')}") for img in shapes.images]
    return ConceptDataset("captioned", shapes.concepts, images)


def rows_by_item(store: ActivationStore, layer: int) -> dict[tuple[int, int], torch.Tensor]:
    """(modality, item) -> that item's rows, sorted: the store's content, whatever the shard layout."""
    out: dict[tuple[int, int], list[torch.Tensor]] = {}
    for index in range(store.n_shards):
        rows, modality = store.shard(index, layer)
        for row, m, item in zip(rows, modality.tolist(), store.items(index).tolist()):
            out.setdefault((m, item), []).append(row)
    return {key: torch.stack(sorted(v, key=lambda r: r.sum().item())) for key, v in out.items()}


def build(tiny, dataset, directory, **kwargs):
    args = dict(texts="captions", seed=0, shard_tokens=60, progress=False) | kwargs
    return build_store(tiny, dataset, directory, LAYERS, PositionsConfig(batch_size=2), **args)


@pytest.fixture(scope="module")
def whole(tiny, captioned, tmp_path_factory):
    return build(tiny, captioned, tmp_path_factory.mktemp("whole") / "store")


@pytest.mark.slow  # trains, or runs a whole study on the organism: a minute or more on 2 cores
def test_a_store_holds_every_image_and_text_token_once_with_its_modality(tiny, captioned, whole):
    n_images, n_texts = len(captioned.images), len(captioned.images)
    image_tokens = n_images * 16  # the tiny model's soft tokens per image
    counts = [(s["image_rows"], s["text_rows"]) for s in whole.progress.shards]
    assert sum(c[0] for c in counts) == image_tokens
    content = rows_by_item(whole, 3)
    assert {m for m, _ in content} == {0, 1} and len([k for k in content if k[0] == 1]) == n_images
    assert len([k for k in content if k[0] == 0]) == n_texts
    assert whole.n_shards >= 5 and all(0 < s["rows"] for s in whole.progress.shards)
    # Shards are a random mix: images and texts together, not one modality per shard.
    assert sum(1 for i, t in counts if i and t) >= whole.n_shards // 2


@pytest.mark.slow  # trains, or runs a whole study on the organism: a minute or more on 2 cores
def test_a_killed_store_resumes_without_duplicating_or_losing_tokens(tiny, captioned, whole, tmp_path, monkeypatch):
    """Kill points: inside a shard's write (a .tmp left behind), and after the rename but before
    progress.json names the shard. Either way the resumed store equals an uninterrupted one."""
    real_save, real_replace = store_module.save_file, os.replace
    for kill_at in ("during_write", "after_rename"):
        directory = tmp_path / kill_at
        calls = {"shards": 0}

        def dying_save(tensors, path, metadata=None):
            calls["shards"] += 1
            if kill_at == "during_write" and calls["shards"] == 3:
                path.write_bytes(b"half a shard")
                raise KeyboardInterrupt  # the process dies here
            real_save(tensors, path, metadata=metadata)

        def dying_replace(src, dst):
            real_replace(src, dst)
            if kill_at == "after_rename" and str(dst).endswith("shard_00002.safetensors"):
                raise KeyboardInterrupt

        monkeypatch.setattr(store_module, "save_file", dying_save)
        monkeypatch.setattr(store_module.os, "replace", dying_replace)
        with pytest.raises(KeyboardInterrupt):
            build(tiny, captioned, directory)
        monkeypatch.setattr(store_module, "save_file", real_save)
        monkeypatch.setattr(store_module.os, "replace", real_replace)
        with pytest.raises(StoreError, match="unfinished"):
            ActivationStore(directory)  # a reader never takes it as whole
        resumed = build(tiny, captioned, directory)
        assert not list(directory.glob("*.tmp"))
        assert resumed.n_rows == whole.n_rows and resumed.n_shards == whole.n_shards
        for layer in LAYERS:
            got, want = rows_by_item(resumed, layer), rows_by_item(whole, layer)
            assert got.keys() == want.keys()
            assert all(torch.allclose(got[k], want[k], atol=1e-5) for k in want)


@pytest.mark.slow  # trains, or runs a whole study on the organism: a minute or more on 2 cores
def test_memory_stays_bounded_over_ten_times_the_buffer(tiny, captioned, tmp_path):
    shard_tokens = 40
    store = build(tiny, captioned, tmp_path / "store", shard_tokens=shard_tokens)
    largest_batch = 2 * 16  # two images' soft tokens
    assert store.n_rows >= 10 * shard_tokens
    assert store.progress.peak_buffer_rows < shard_tokens + largest_batch
    # Training reads `buffer_shards` shards at a time and yields every row once per epoch.
    batches = store.batches(3, batch_size=8, seed=0, shards=list(range(store.n_shards)), buffer_shards=2)
    epoch_rows = sum(len(next(batches)) for _ in range(store.n_rows // 8))
    assert epoch_rows == store.n_rows - store.n_rows % 8


def test_a_store_from_another_model_or_layer_is_refused_naming_both(tiny, captioned, whole):
    with pytest.raises(StoreError) as err:
        build_store(tiny, captioned, whole.directory, [2], PositionsConfig(batch_size=2), texts="captions", shard_tokens=60, progress=False)
    assert "layers [1, 3]" in str(err.value) and "layers [2]" in str(err.value)
    from xmodal.models.tiny import tiny_gemma3

    other = tiny_gemma3(device="cpu", init_seed=1)
    with pytest.raises(StoreError, match="the model's weights"):
        build(other, captioned, whole.directory)


def test_a_full_disk_leaves_no_shard_that_reads_as_whole(tiny, captioned, tmp_path, monkeypatch):
    real_save = store_module.save_file
    calls = {"n": 0}

    def filling_save(tensors, path, metadata=None):
        calls["n"] += 1
        if calls["n"] == 2:
            path.write_bytes(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(store_module, "save_file", filling_save)
    with pytest.raises(StoreError, match="No space left on device.*resumes after shard 1"):
        build(tiny, captioned, tmp_path / "store")
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == ["progress.json", "shard_00000.safetensors", "store.json"]
    assert len(json.loads((tmp_path / "store" / "progress.json").read_text())["shards"]) == 1


def test_auto_batch_size_finds_the_largest_batch_that_fits():
    tried = []

    def try_batch(n: int) -> None:
        tried.append(n)
        if n > 37:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    assert largest_fitting_batch(try_batch, upper=1000) == 37 and len(tried) <= 14
    assert largest_fitting_batch(lambda n: None, upper=20) == 20
    with pytest.raises(ConfigError, match="not even a batch of 1"):
        largest_fitting_batch(lambda n: (_ for _ in ()).throw(torch.cuda.OutOfMemoryError("oom")), upper=8)


@pytest.mark.slow  # trains, or runs a whole study on the organism: a minute or more on 2 cores
def test_hooks_read_the_same_residuals_from_a_model_split_across_devices(tiny, synthetic, tmp_path):
    """accelerate's device_map: half the decoder layers offloaded (their weights stream in from
    disk at their forward pass, as a layer on another device would), the rest on the CPU."""
    from xmodal.activations.extract import extract_activations
    from xmodal.models.gemma3 import Gemma3Adapter

    tiny.model.save_pretrained(tmp_path / "tiny")
    tiny.processor.save_pretrained(tmp_path / "tiny")
    device_map = {
        "model.vision_tower": "cpu",
        "model.multi_modal_projector": "cpu",
        "model.language_model.embed_tokens": "cpu",
        "model.language_model.rotary_emb": "cpu",
        "model.language_model.norm": "cpu",
        "lm_head": "cpu",
    }
    device_map |= {f"model.language_model.layers.{i}": ("disk" if i % 2 else "cpu") for i in range(tiny.num_layers)}
    split = Gemma3Adapter.from_pretrained(
        "tiny-split", str(tmp_path / "tiny"), dtype="float32", device="cpu", device_map=device_map, offload_folder=str(tmp_path / "offload")
    )
    assert any(hasattr(layer, "_hf_hook") for layer in split.decoder_layers())  # accelerate dispatched it
    positions = PositionsConfig(batch_size=4)
    want = extract_activations(tiny, synthetic, [1, 4], positions, progress=False)
    got = extract_activations(split, synthetic, [1, 4], positions, progress=False)
    for layer in (1, 4):
        assert torch.allclose(got[layer].image_tokens, want[layer].image_tokens, atol=1e-5)
        assert torch.allclose(got[layer].text_tokens, want[layer].text_tokens, atol=1e-5)


def test_device_map_auto_places_whole_gemma3_27b_layers_across_gpus():
    """A meta-device check (no weights, no GPU): the 27B config (about 55 GB in bf16) under four 16 GiB GPUs."""
    from accelerate import infer_auto_device_map, init_empty_weights
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    config = Gemma3Config(
        text_config=dict(
            hidden_size=5376, intermediate_size=21504, num_hidden_layers=62, num_attention_heads=32, num_key_value_heads=16, head_dim=128, vocab_size=262208
        )
    )
    with init_empty_weights():
        model = Gemma3ForConditionalGeneration(config)
    device_map = infer_auto_device_map(
        model, max_memory={i: "16GiB" for i in range(4)} | {"cpu": "1GiB"}, dtype=torch.bfloat16, no_split_module_classes=model._no_split_modules
    )
    layer_devices = {name: d for name, d in device_map.items() if ".layers." in name}
    assert {d for d in layer_devices.values()} == {0, 1, 2, 3}
    assert all(name.count(".") == 3 for name in layer_devices)  # whole decoder layers, never split


def test_bad_batch_size_is_one_line_and_no_result(tmp_path):
    for module, extra in (("xmodal.run", ["--config-name=config_tiny"]), ("xmodal.sae_train", ["model=tiny", "dataset=synthetic"])):
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                module,
                *extra,
                "positions.batch_size=0",
                f"hydra.run.dir={tmp_path / module}",
                f"out_dir={tmp_path / 'sae'}" if module == "xmodal.sae_train" else "seed=0",
            ],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        output = proc.stdout + proc.stderr
        assert proc.returncode == 2, output[-2000:]
        errors = [line for line in output.splitlines() if "ERROR" in line]
        assert len(errors) == 1 and "positions.batch_size=0" in errors[0] and "Traceback" not in output, output[-2000:]
    assert not list(tmp_path.rglob("result.json")) and not list(tmp_path.rglob("done.json"))


def test_sae_train_writes_saes_that_overlap_loads(tmp_path):
    """The whole app on the tiny model: store, train (TopK, then JumpReLU from the same store), evaluate, save; then sae=local."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    base = [
        sys.executable,
        "-m",
        "xmodal.sae_train",
        "model=tiny",
        "dataset=synthetic",
        "dataset.images_per_concept=4",
        "layers=[2]",
        "store.texts=concepts",
        "store.shard_tokens=200",
        "positions.batch_size=2",
        "store.eval_fraction=0.3",
        f"store.dir={tmp_path / 'store'}",
        "training.d_sae=64",
        "training.k=8",
        "training.training_tokens=20000",
        "training.batch_size=128",
    ]
    for architecture in ("topk", "jumprelu"):
        out = tmp_path / architecture
        proc = subprocess.run([*base, f"training.architecture={architecture}", f"out_dir={out}"], cwd=tmp_path, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
        assert (out / "done.json").exists() and (out / "layer_2" / "cfg.json").exists()
        quality = pd.read_csv(out / "quality.csv")
        assert set(quality["tokens"]) == {"image", "text"} and quality["n_tokens"].min() > 0
        image = quality.set_index("tokens").loc["image"]  # the tiny model's few text tokens teach little
        assert image["fve"] > image["fve_null_shuffled_dims"] + 0.1
    assert "reusing it" in proc.stdout + proc.stderr  # the second run read the first run's store
    from tests.conftest import run_cli

    proc = run_cli(
        "experiment=overlap",
        "layer=2",
        "sae=local",
        f'sae.path="{tmp_path / "topk"}/layer_{{layer}}"',
        "experiment.n_permutations=50",
        f"paths.activation_cache={tmp_path / 'cache'}",
        f"hydra.run.dir={tmp_path / 'overlap'}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "overlap" / "result.json").read_text())
    assert result["sae"] == "local" and result["sae_width"] == 64  # the SAE trained above, at its width


def test_on_the_fly_mode_trains_without_writing_a_store_and_slurm_is_a_launcher_away(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    args = [
        sys.executable,
        "-m",
        "xmodal.sae_train",
        "model=tiny",
        "dataset=synthetic",
        "layers=[2]",
        "store.texts=concepts",
        "store.mode=on_the_fly",
        "store.eval_fraction=0.3",
        "positions.batch_size=2",
        f"store.dir={tmp_path / 'store'}",
        "training.d_sae=64",
        "training.k=8",
        "training.training_tokens=5000",
        "training.batch_size=128",
        f"out_dir={tmp_path / 'sae'}",
    ]
    proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert not (tmp_path / "store").exists() and (tmp_path / "sae" / "layer_2" / "cfg.json").exists()
    assert set(pd.read_csv(tmp_path / "sae" / "quality.csv")["tokens"]) == {"image", "text"}
    hydra_cfg = subprocess.run([*args, "cluster=slurm", "--cfg", "hydra"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher" in hydra_cfg.stdout, hydra_cfg.stderr[-2000:]


def test_saes_trained_through_the_store_explain_both_modalities_of_the_organism(tmp_path):
    """Issue 18's bar, on a third of the default data and budget: FVE at least 0.8 on held-out
    image tokens and on held-out text tokens, far above the shuffled-dimensions null."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    out = tmp_path / "sae"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "xmodal.sae_train",
            "dataset.images_per_concept=20",
            "store.shard_tokens=4096",
            "training.training_tokens=300000",
            f"store.dir={tmp_path / 'store'}",
            f"out_dir={out}",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    quality = pd.read_csv(out / "quality.csv").set_index("tokens")
    assert quality.loc["image", "fve"] >= 0.8 and quality.loc["text", "fve"] >= 0.8, quality.to_string()
    assert (quality["fve_null_shuffled_dims"] < 0.3).all() and (quality["l0"] == 32).all()
    assert (out / "layer_9" / "cfg.json").exists() and (out / "done.json").exists()


def test_images_prepared_by_dataloader_workers_give_the_same_activations(tiny, synthetic):
    from xmodal.activations.extract import extract_activations

    alone = extract_activations(tiny, synthetic, [2], PositionsConfig(batch_size=4), progress=False)[2]
    workers = extract_activations(tiny, synthetic, [2], PositionsConfig(batch_size=4, num_workers=2), progress=False)[2]
    assert torch.equal(alone.image_tokens, workers.image_tokens) and alone.image_sources == workers.image_sources


def test_sae_train_default_folders_name_model_architecture_and_width():
    from hydra import compose, initialize_config_dir

    import xmodal.sae_train  # noqa: F401  (stores the schema)
    from xmodal.conf_dir import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="sae_train", overrides=["training.architecture=batchtopk", "training.d_sae=1024"])
    assert cfg.out_dir == "outputs/sae_train/organism_batchtopk_1024"
    assert cfg.store.dir == "outputs/activation_store/organism_organism_concepts_seed0"


def test_mixed_batches_wait_for_a_whole_batch_when_chunks_are_smaller_than_one():
    """Shards smaller than a training batch: rows carry over until a batch is whole, never an empty batch."""
    from xmodal.activations.store import mixed_batches

    chunks = iter([torch.arange(i * 10, i * 10 + 10).float().view(-1, 1) for i in range(7)])  # 70 rows in chunks of 10
    batches = list(mixed_batches(chunks, 1, 32, torch.Generator().manual_seed(0)))
    assert [len(b) for b in batches] == [32, 32]  # the 6 rows left over wait for more
    assert len(torch.cat(batches).unique()) == 64
