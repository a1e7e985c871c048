"""FeatureCards: patch heat maps against planted truth, and the study's contract through the CLI."""

from __future__ import annotations

import json

import numpy as np
import torch

from tests.conftest import run_cli
from tests.test_sae import save_jumprelu_sae
from xmodal.activations.readout import ReadoutPlan, TokenKeep, TokenRows, encode_and_pool
from xmodal.activations.shards import save_shard
from xmodal.saes.loading import local_sae


def planted_sae(path, d_in: int = 64, d_sae: int = 16):
    """A JumpReLU SAE whose feature 3 reads one unit direction and nothing else fires."""
    sae = save_jumprelu_sae(path, d_in=d_in, d_sae=d_sae)
    direction = torch.zeros(d_in)
    direction[5] = 1.0
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.W_enc[:, 3] = direction
        sae.b_enc.zero_()
        sae.b_dec.zero_()
        sae.threshold.fill_(0.5)
    sae.save_model(path)
    return direction


def test_a_feature_planted_at_known_image_tokens_peaks_there_in_the_heat_map(tmp_path):
    direction = planted_sae(tmp_path / "sae")
    space = local_sae("planted", str(tmp_path / "sae"), layer=1, device="cpu")
    rng = np.random.default_rng(0)
    tokens = torch.tensor(rng.normal(scale=0.05, size=(3, 16, 64)), dtype=torch.float32)  # 3 images, a 4x4 token grid
    planted = {0: [5], 1: [0, 15], 2: [10]}  # image -> tokens that carry the feature
    for image, cells in planted.items():
        tokens[image, cells] += 4.0 * direction
    # Through the streaming pass's reduction and its on-disk sparse token codes, as a study reads them.
    plan = ReadoutPlan(1, space, (("mean", 5),), None, TokenKeep.sparse)
    size = save_shard(tmp_path, "images_00000.safetensors", encode_and_pool(plan, tokens, torch.zeros(3, 64)), {}, RuntimeError)
    rows = TokenRows(tmp_path, [{"file": "images_00000.safetensors", "images": 3, "bytes": size}], TokenKeep.sparse, 16)
    [maps] = rows.feature_maps([3])
    assert torch.allclose(rows[1], space.encode(tokens[1]))  # sparse storage gives back the dense codes
    for image, cells in planted.items():
        grid = maps[image].reshape(4, 4)
        assert set(np.flatnonzero(grid > 0)) == set(cells)
        assert np.unravel_index(grid.argmax(), grid.shape) in [divmod(c, 4) for c in cells]


def test_the_cli_writes_cards_and_a_neuronpedia_batch(tmp_path):
    save_jumprelu_sae(tmp_path / "sae", d_in=64, d_sae=128)
    result = run_cli(
        "experiment=features", "sae=local", f"sae.path={tmp_path / 'sae'}", "experiment.n_features=3", "experiment.n_permutations=50", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-2000:]
    [job] = list((tmp_path / "outputs").rglob("result.json"))
    record = json.loads(job.read_text())
    assert record["metrics"]["n_features"] == 3 and 0 < record["metrics"]["best_crossmodal_r_p"] <= 1
    assert {"tables/features.parquet", "tables/examples.parquet"} <= set(record["tables"])
    assert len([f for f in record["figures"] if f.startswith("figures/feature_")]) == 3
    batch = json.loads((job.parent / "exports" / "neuronpedia.json").read_text())
    assert record["exports"] == ["exports/neuronpedia.json"]
    assert {"model_id", "layer", "sae_set", "features"} <= set(batch) and batch["layer"] == 1 and len(batch["features"]) == 3
    for feature in batch["features"]:
        assert {"feature_index", "pos_str", "pos_values", "neg_str", "frac_nonzero", "activations"} <= set(feature)
        for example in feature["activations"]:
            assert len(example["tokens"]) == len(example["values"]) and max(example["values"]) > 0


def test_a_feature_outside_the_sae_is_one_line_and_no_result(tmp_path):
    save_jumprelu_sae(tmp_path / "sae", d_in=64, d_sae=128)
    result = run_cli("experiment=features", "sae=local", f"sae.path={tmp_path / 'sae'}", "experiment.features=[3,128]", cwd=tmp_path)
    assert result.returncode != 0
    assert "experiment.features holds [128], outside SAE 'local', which has 128 features (0..127)" in result.stdout + result.stderr
    assert not list((tmp_path / "outputs").rglob("result.json"))


def test_feature_cards_need_an_sae(tmp_path):
    result = run_cli("experiment=features", cwd=tmp_path)
    assert result.returncode != 0
    assert "experiment=features describes SAE features, and this job has sae=none" in result.stdout + result.stderr
