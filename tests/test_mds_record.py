"""MDS (issue 27, items 5 and 9): mds_std has a p-value, and the image embedder used is on record."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from xmodal import config as schema
from xmodal.conf_dir import CONF_DIR
from xmodal.errors import ModelLoadError
from xmodal.experiments import register_experiment_configs
from xmodal.experiments.mds.config import ImageEmbedderKind, MDSConfig
from xmodal.experiments.mds.experiment import MDSClassifier
from xmodal.metrics.modality import dominance_groups, modality_dominance

schema.register_configs()
register_experiment_configs()


def mds_config(*overrides: str) -> MDSConfig:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["experiment=mds", *overrides])
    return OmegaConf.to_object(cfg).experiment


@pytest.mark.parametrize(
    ("model", "fallback"),
    [("organism", ImageEmbedderKind.vision_tower), ("tiny", ImageEmbedderKind.vision_tower), ("gemma3_4b", None), ("clip_vit_b32", None)],
)
def test_only_mechanics_models_fall_back_to_their_own_vision_tower_by_default(model, fallback):
    assert mds_config(f"model={model}").image_embedder_fallback == fallback
    assert mds_config(f"model={model}", "experiment.image_embedder_fallback=vision_tower").image_embedder_fallback == ImageEmbedderKind.vision_tower


def test_without_a_fallback_an_unloadable_embedder_stops_with_one_line(tmp_path):
    study = MDSClassifier(MDSConfig(image_embedder_path=str(tmp_path / "no_embedder"), image_embedder_fallback=None))
    with pytest.raises(ModelLoadError) as err:
        study.image_embedder(SimpleNamespace(model=SimpleNamespace(name="gemma3_4b")))
    line = str(err.value)
    assert "\n" not in line and "cannot be loaded" in line and "model 'gemma3_4b' allows no fallback" in line
    assert "experiment.image_embedder_fallback=vision_tower" in line


def test_the_fallback_is_flagged_as_such(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr("xmodal.experiments.mds.experiment.hub_model_reachable", lambda name: False)  # offline
    study = MDSClassifier(MDSConfig(image_embedder_path=str(tmp_path / "no_embedder"), image_embedder_fallback=ImageEmbedderKind.vision_tower))
    _, name, is_fallback = study.image_embedder(SimpleNamespace(model=tiny))
    assert is_fallback and name.endswith("fallback, " + str(tmp_path / "no_embedder") + " not loadable")


def test_mds_spread_gets_a_p_value_against_swapped_modalities():
    rng = np.random.default_rng(0)
    study = MDSClassifier(MDSConfig(n_null=200))
    text = rng.random((60, 40))
    # half the features fire mostly on images, half mostly on text: MDS spreads far beyond the null's
    leaning = np.where(np.arange(40) < 20, 3.0, 1 / 3)
    for image, signal in ((text * leaning, True), (rng.random((60, 40)), False)):
        _, _, sigma = dominance_groups(modality_dominance(image, text)[0])
        _, null_mds = study.swapped_null(image, text, seed=0)
        spread = study.spread_against_null(sigma, null_mds)
        assert spread["mds_std"] == sigma and spread["mds_std_null_q025"] <= spread["mds_std_null_mean"] <= spread["mds_std_null_q975"]
        assert (spread["mds_std_p"] < 0.01) == signal, spread


@pytest.mark.slow  # trains, or runs a whole study on the organism: a minute or more on 2 cores
def test_result_json_names_the_embedders_mds_used(tmp_path, monkeypatch):
    import json

    from tests.conftest import run_in_process

    monkeypatch.setattr("xmodal.experiments.mds.experiment.hub_model_reachable", lambda name: False)  # offline: the fallback
    code = run_in_process(
        "experiment=mds",
        f"experiment.image_embedder_path={tmp_path / 'no_embedder'}",
        "experiment.n_null=20",
        f"paths.activation_cache={tmp_path / 'cache'}",
        run_dir=tmp_path / "run",
    )
    assert code == 0
    record = json.loads((tmp_path / "run" / "result.json").read_text())
    assert record["metrics"]["image_embedder_is_fallback"] == 1
    assert "fallback" in record["image_embedder"] and record["text_embedder"]
