"""Gemma Scope 2 in full through sae-lens's directory (nothing downloaded), and sae.site."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir

from xmodal import config as schema
from xmodal.conf_dir import CONF_DIR
from xmodal.errors import SAEError
from xmodal.experiments import register_experiment_configs
from xmodal.saes import gemma_scope_2 as G
from xmodal.saes.loading import local_sae

schema.register_configs()
register_experiment_configs()


def gemma_scope_2_releases() -> dict[str, list[str]]:
    return {r: list(e.saes_map) for r, e in G.directory().items() if r.startswith("gemma-scope-2-")}


def choices_for(release: str, sae_id: str) -> dict | None:
    """The sae=gemma_scope_2 choices that should name `sae_id` of `release`, read back from the names."""
    match = G._BASE.match(release)
    kind = release[len(match.group(1)) + 1 :]
    parsed = G._ID.search(sae_id)
    if parsed is None:
        return None
    all_layers, kind = kind.endswith("-all"), kind.removesuffix("-all")
    site = {"res": "resid_post", "mlp": "mlp_out", "att": "attn_out", "transcoders": "mlp_out"}[kind]
    tuning = match.group(1).rsplit("-", 1)[1]
    return dict(
        model_release=f"{match.group(1)[:-2]}{'it' if tuning == 'pt' else 'pt'}-res",
        layer=int(parsed.group(1)),
        site=site,
        width=parsed.group(2),
        l0=parsed.group(3),
        all_layers=all_layers,
        transcoder=kind == "transcoders",
        affine=bool(parsed.group(4)),
        tuning=tuning,
    )


def test_every_gemma_scope_2_id_in_the_directory_is_one_xmodal_builds():
    """Both ways: each id of each Gemma Scope 2 release (every size, pt and it) is what its choices
    resolve to (from the other tuning's model release, so sae.tuning is exercised too); the few
    left are extra seeds (l0 medium_seed_1), not a choice xmodal offers."""
    releases = gemma_scope_2_releases()
    assert {r.split("-")[3] for r in releases} >= {"270m", "1b", "4b", "12b", "27b"}
    built, skipped = 0, []
    for release, ids in releases.items():
        for sae_id in ids:
            choices = choices_for(release, sae_id)
            if choices is None:
                skipped.append(sae_id)
                continue
            assert G.gemma_scope_2_id(**choices) == (release, sae_id)
            built += 1
    assert built > 5000 and all("seed" in s for s in skipped), skipped[:5]


@pytest.mark.parametrize("tuning", ["it", "pt"])
def test_acceptance_mlp_out_262k_small_and_the_transcoders_resolve_for_gemma3_4b(tuning):
    release = f"gemma-scope-2-4b-{tuning}-res"
    assert G.gemma_scope_2_id(release, 9, "mlp_out", "262k", "small") == (f"gemma-scope-2-4b-{tuning}-mlp", "layer_9_width_262k_l0_small")
    assert G.gemma_scope_2_id(release, 17, "mlp_out", "65k", "medium", transcoder=True) == (
        f"gemma-scope-2-4b-{tuning}-transcoders",
        "transcoder/layer_17_width_65k_l0_medium",
    )
    assert G.gemma_scope_2_id(release, 5, "mlp_out", "16k", "big", all_layers=True, transcoder=True, affine=True) == (
        f"gemma-scope-2-4b-{tuning}-transcoders-all",
        "layer_5_width_16k_l0_big_affine",
    )
    assert G.gemma_scope_2_id(release, 30, "attn_out", "262k", "small", all_layers=True)[0] == f"gemma-scope-2-4b-{tuning}-att-all"


def test_the_shipped_config_composes_the_acceptance_choice():
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(
            config_name="config", overrides=["model=gemma3_4b", "sae=gemma_scope_2", "sae.site=mlp_out", "sae.width=262k", "sae.l0=small", "layer=preset:0"]
        )
    schema.validate(cfg)
    assert G.gemma_scope_2_id(cfg.sae.release, 9, cfg.sae.site, cfg.sae.width, cfg.sae.l0) == ("gemma-scope-2-4b-it-mlp", "layer_9_width_262k_l0_small")


@pytest.mark.parametrize(
    "choices, message",
    [
        (dict(layer=10), "no SAE 'layer_10_width_16k_l0_medium' (layer=10, width=16k, l0=medium); the nearest that exist: layer_9_width_16k_l0_medium"),
        (dict(layer=9, width="1m", site="mlp_out"), "the nearest that exist: layer_9_width_16k_l0_medium, layer_9_width_262k_l0_medium"),
        (dict(layer=9, all_layers=True), "no SAE 'layer_9_width_16k_l0_medium'"),  # -all releases have no medium
        (dict(layer=9, transcoder=True), "a transcoder stands for an MLP; set sae.site=mlp_out"),
        (dict(layer=9, affine=True), "sae.affine=true applies to transcoders only"),
    ],
)
def test_an_id_that_does_not_exist_names_the_nearest_that_do(choices, message):
    with pytest.raises(SAEError) as info:
        G.gemma_scope_2_id("gemma-scope-2-4b-it-res", **choices)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_non_gemma_scope_2_model_release_is_one_clear_line():
    with pytest.raises(SAEError, match="needs a Gemma 3 model's Gemma Scope 2 release"):
        G.gemma_scope_2_id("gemma-2b-res-jb", 9)


def save_transcoder(path, d_in: int = 64, layer: int = 3):
    from sae_lens import JumpReLUTranscoder, JumpReLUTranscoderConfig
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(0)
    config = JumpReLUTranscoderConfig(
        d_in=d_in, d_sae=96, d_out=d_in, apply_b_dec_to_input=False, metadata=SAEMetadata(hook_name=f"blocks.{layer}.hook_mlp_in")
    )
    transcoder = JumpReLUTranscoder(config)
    with torch.no_grad():
        transcoder.W_enc.normal_(0, 0.3)
    transcoder.save_model(path)
    return transcoder


def test_a_transcoder_loads_at_mlp_out_and_encodes_the_mlp_input(tmp_path):
    transcoder = save_transcoder(tmp_path / "tc")
    features = local_sae("tc", str(tmp_path / "tc"), 3, device="cpu", site="mlp_out")
    x = torch.randn(10, 64, generator=torch.Generator().manual_seed(0))
    codes = features.encode(x)
    assert codes.shape == (10, 96) and (codes > 0).any()
    assert torch.allclose(codes, transcoder.encode(x), atol=1e-6)
    assert features.decode(codes).shape == (10, 64)  # what it writes: the MLP's output
    with pytest.raises(SAEError, match=r"trained on mlp_in \(blocks.3.hook_mlp_in\), not sae.site=resid_post; set sae.site=mlp_out"):
        local_sae("tc", str(tmp_path / "tc"), 3, device="cpu")


@pytest.mark.slow
def test_a_site_the_sae_was_not_trained_on_is_one_line(tmp_path):
    from tests.test_sae import save_jumprelu_sae

    save_jumprelu_sae(tmp_path / "sae", d_in=64, layer=3)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "xmodal.run",
            "--config-name=config_tiny",
            "experiment=sae_eval",
            "layer=3",
            "sae=local",
            f"sae.path={tmp_path / 'sae'}",
            "sae.site=mlp_out",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"},
    )
    output = proc.stdout + proc.stderr
    errors = [line for line in output.splitlines() if "ERROR" in line]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in output, output[-2000:]
    assert "was trained on resid_post (blocks.3.hook_resid_post), not sae.site=mlp_out" in errors[0]
    assert not list(tmp_path.rglob("result.json"))
