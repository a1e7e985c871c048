"""Seed 000's steering as the plan wrote it: mode=ablate (clamp to 0) and the reverse direction (text-only prompts)."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from tests.conftest import run_in_process
from tests.test_sae import save_jumprelu_sae
from xmodal.errors import ConfigError
from xmodal.experiments.steering.config import SteeringConfig


def steering_overrides(tmp_path, *extra: str) -> list[str]:
    save_jumprelu_sae(tmp_path / "sae", d_in=64, layer=3)
    return [
        "experiment=steering",
        "experiment.concept=red_circle",
        "experiment.n_images=4",
        "experiment.max_new_tokens=3",
        "experiment.n_bootstrap=100",
        "layer=3",
        "sae=local",
        f"sae.path={tmp_path / 'sae'}",
        f"paths.activation_cache={tmp_path / 'cache'}",
        *extra,
    ]


def test_ablate_clamps_the_feature_to_zero_in_the_concepts_own_images(tmp_path):
    run = tmp_path / "ablate"
    assert run_in_process(*steering_overrides(tmp_path, "experiment.mode=ablate", "experiment.images=[]", "experiment.where=both"), run_dir=run) == 0
    result = json.loads((run / "result.json").read_text())
    descriptions = pd.read_parquet(run / "tables" / "descriptions.parquet")
    assert set(descriptions["image"].str.split("/").str[0]) == {"synthetic:red_circle"}  # the concept's own images
    assert set(descriptions["strength"]) == {0.0, 1.0} and set(descriptions["mode"]) == {"ablate"}
    summary = pd.read_parquet(run / "tables" / "dose_response.parquet").set_index(["condition", "strength"])
    assert summary.loc[("feature", 0.0), "kl"] == pytest.approx(0, abs=1e-6) and summary.loc[("feature", 1.0), "kl"] > 0
    metrics = result["metrics"]
    assert 0 < metrics["steering_effect_p"] <= 1 and "steering_effect_null_mean" in metrics
    verdict = result["verdicts"]["steering_beyond_random"]
    assert verdict["passed"] == (metrics["steering_effect_p"] < 0.05) and "random" in verdict["bar"]


def test_ablate_takes_no_strengths_and_texts_need_prompts_and_text_positions():
    with pytest.raises(ConfigError, match=r"experiment.mode=ablate clamps the feature to 0, so experiment.strengths=\[0.0, 3.0\] cannot apply"):
        SteeringConfig(mode="ablate", strengths=[0.0, 3.0]).validate()
    with pytest.raises(ConfigError, match="experiment.inputs=texts needs experiment.text_prompts"):
        SteeringConfig(inputs="texts", where="text").validate()
    with pytest.raises(ConfigError, match="experiment.inputs=texts has no image tokens to steer at experiment.where=image"):
        SteeringConfig(inputs="texts", text_prompts=["Describe the sea."]).validate()
    SteeringConfig(mode="ablate", images=["snow"], concept="snow").validate()  # ablate may describe the concept's own images
    assert SteeringConfig(mode="ablate").strengths_with_zero() == [0.0, 1.0]


def test_an_image_feature_steers_text_only_prompts(tmp_path):
    run = tmp_path / "reverse"
    prompts = ["Describe a circle.", "What colour is the sea?", "Name a shape."]
    overrides = steering_overrides(
        tmp_path, "experiment.inputs=texts", "experiment.feature_source=image", "experiment.where=text", f"experiment.text_prompts={json.dumps(prompts)}"
    )
    assert run_in_process(*overrides, "experiment.strengths=[0,4]", run_dir=run) == 0
    descriptions = pd.read_parquet(run / "tables" / "descriptions.parquet")
    assert list(descriptions["image"].unique()) == prompts  # each prompt is one input, no image
    summary = pd.read_parquet(run / "tables" / "dose_response.parquet").set_index(["condition", "strength"])
    assert summary.loc[("feature", 4.0), "kl"] > 0 and summary.loc[("feature", 0.0), "n_images"] == 3
