"""The planted positive control: the whole pipeline finds text-image alignment that is really there.

``model=organism_planted`` is the default organism's recipe (stage 2, seed 0, the same steps)
plus one auxiliary loss that pulls the centred mean image-token residual at decoder layer 9
toward the centred residual of the scene's colour word (``align_weight=1``, ``align_layer=9``;
experiments/organism/README.md). These tests run overlap, probe and the DAS apples/oranges check
on it through the CLI, with its shipped SAEs, on the organism's nine colour concepts (the
planted concepts), and require the alignment at layer 9.

Each test runs twice: on the planted organism, which must meet the criteria, and on the default
organism, whose recipe is this one with ``align_weight=0``, which must not (the negative control:
it shows the criteria measure the planted alignment, not something every organism has).

The criteria were written before the planted model was trained.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_cli

PLANTED_LAYER, FAR_LAYERS = 9, (5, 15)
COLOURS = ("sae=organism", "dataset=organism_concepts", "dataset.categories=[colour]")


@pytest.fixture(params=[("organism_planted", True), ("organism", False)], ids=["planted", "default_fails"])
def control(request) -> tuple[str, bool]:
    """(model, whether it must meet the criteria): the planted organism must, the default must not."""
    return request.param


def cli_results(tmp_path: Path, model: str, *overrides: str, sweep: bool = False) -> dict[int, dict]:
    """Run the CLI on `model` (a -m sweep when `sweep`) and read every job's result by layer."""
    proc = run_cli(
        *(["-m"] if sweep else []),
        f"model={model}",
        *COLOURS,
        *overrides,
        f"paths.activation_cache={tmp_path / 'cache'}",
        "hydra.run.dir=outputs/run",
        "hydra.sweep.dir=outputs/sweep",
        cwd=tmp_path,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(p.read_text()) for p in (tmp_path / "outputs").rglob("result.json")]
    assert results and all(r["status"] == "ok" and r["model"] == model for r in results)
    return {r["layer"]: r["metrics"] for r in results}


def test_overlap_finds_the_planted_alignment_at_its_layer_and_less_far_from_it(tmp_path, control):
    model, planted = control
    by_layer = cli_results(tmp_path, model, "experiment=overlap", f"layer={','.join(map(str, (PLANTED_LAYER, *FAR_LAYERS)))}", sweep=True)
    at = by_layer[PLANTED_LAYER]
    met = at["jaccard_topk_p"] < 0.01 and at["jaccard_topk"] > at["jaccard_topk_null_q975"]
    met = met and all(by_layer[far]["jaccard_topk"] < at["jaccard_topk"] for far in FAR_LAYERS)
    assert met == planted, (model, {layer: (m["jaccard_topk"], m["jaccard_topk_p"]) for layer, m in by_layer.items()})


def test_a_probe_trained_on_colour_words_reads_colour_images_at_the_planted_layer(tmp_path, control):
    model, planted = control
    metrics = cli_results(tmp_path, model, "experiment=probe", f"layer={PLANTED_LAYER}", "experiment.attributes=[]")[PLANTED_LAYER]
    met = metrics["text_to_image_p"] <= 0.01 and metrics["text_to_image_accuracy"] > metrics["text_to_image_accuracy_null_q975"]
    assert met == planted, (model, metrics)


def test_the_apples_oranges_check_finds_colour_alignment_at_the_planted_layer(tmp_path, control):
    model, planted = control
    metrics = cli_results(tmp_path, model, "experiment=das_colour_alignment", f"layer={PLANTED_LAYER}")[PLANTED_LAYER]
    met = metrics["alignment_gap_p"] < 0.01 and metrics["alignment_gap"] > metrics["alignment_gap_null_q975"]
    assert met == planted, (model, metrics)


def test_representation_alignment_finds_the_planted_layer_without_an_sae(tmp_path, control):
    """Colour words against colour images, raw residuals: unbiased CKA and mutual k-NN above their
    re-pairing nulls at the planted layer, and unbiased CKA lower far from it."""
    model, planted = control
    layers = ",".join(map(str, (PLANTED_LAYER, *FAR_LAYERS)))
    by_layer = cli_results(tmp_path, model, "experiment=alignment", f"layer={layers}", "dataset.images_per_concept=16", "experiment.k_neighbours=3", sweep=True)
    at = by_layer[PLANTED_LAYER]
    met = all(at[f"{metric}_p"] < 0.01 and at[metric] > at[f"{metric}_null_q975"] for metric in ("cka_unbiased", "mutual_knn"))
    met = met and all(by_layer[far]["cka_unbiased"] < at["cka_unbiased"] for far in FAR_LAYERS)
    assert met == planted, (model, by_layer)


def test_the_lens_finds_colour_images_nearest_their_colour_words_at_the_planted_layer(tmp_path, control):
    """LatentLens read-out: each colour image's nearest colour word, against shuffled image labels."""
    model, planted = control
    metrics = cli_results(tmp_path, model, "experiment=lens", f"layer={PLANTED_LAYER}")[PLANTED_LAYER]
    met = metrics["image_nearest_word_p"] < 0.01 and metrics["image_nearest_word"] > metrics["image_nearest_word_null_q975"]
    assert met == planted, (model, metrics)
