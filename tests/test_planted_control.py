"""The planted positive control: the whole pipeline finds text-image alignment that is really there.

``model=organism_planted`` is the default organism's recipe (stage 2, seed 0, the same steps)
plus one auxiliary loss that pulls the centred mean image-token residual at decoder layer 9
toward the centred residual of the scene's colour word (``align_weight=1``, ``align_layer=9``;
experiments/organism/README.md). These tests run overlap, probe and the DAS apples/oranges check
on it through the CLI, with its shipped SAEs, on the organism's nine colour concepts (the
planted concepts), and require the alignment at layer 9.

The same tests on the default organism, whose recipe is this one with ``align_weight=0``, are
expected to fail; that is how the control shows it measures something:

    XMODAL_CONTROL_MODEL=organism python -m pytest tests/test_planted_control.py -m slow

The criteria were written before the planted model was trained.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.conftest import run_cli

CONTROL_MODEL = os.environ.get("XMODAL_CONTROL_MODEL", "organism_planted")
PLANTED_LAYER, FAR_LAYERS = 9, (5, 15)
COLOURS = ("model=" + CONTROL_MODEL, "sae=organism", "dataset=organism_concepts", "dataset.categories=[colour]")

pytestmark = pytest.mark.slow


def cli_results(tmp_path: Path, *overrides: str, sweep: bool = False) -> dict[int, dict]:
    """Run the CLI (a -m sweep when `sweep`) and read every job's result by layer."""
    proc = run_cli(*(["-m"] if sweep else []), *COLOURS, *overrides, f"paths.activation_cache={tmp_path / 'cache'}",
                   "hydra.run.dir=outputs/run", "hydra.sweep.dir=outputs/sweep", cwd=tmp_path, timeout=1200)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(p.read_text()) for p in (tmp_path / "outputs").rglob("result.json")]
    assert results and all(r["status"] == "ok" and r["model"] == CONTROL_MODEL for r in results)
    return {r["layer"]: r["metrics"] for r in results}


def test_overlap_finds_the_planted_alignment_at_its_layer_and_less_far_from_it(tmp_path):
    by_layer = cli_results(tmp_path, "experiment=overlap", f"layer={','.join(map(str, (PLANTED_LAYER, *FAR_LAYERS)))}", sweep=True)
    planted = by_layer[PLANTED_LAYER]
    assert planted["jaccard_topk_p"] < 0.01 and planted["jaccard_topk"] > planted["jaccard_topk_null_q975"], planted
    for far in FAR_LAYERS:
        assert by_layer[far]["jaccard_topk"] < planted["jaccard_topk"], (far, by_layer[far]["jaccard_topk"], planted["jaccard_topk"])


def test_a_probe_trained_on_colour_words_reads_colour_images_at_the_planted_layer(tmp_path):
    metrics = cli_results(tmp_path, "experiment=probe", f"layer={PLANTED_LAYER}", "experiment.attributes=[]")[PLANTED_LAYER]
    assert metrics["text_to_image_p"] <= 0.01, metrics
    assert metrics["text_to_image_accuracy"] > metrics["text_to_image_accuracy_null_q975"], metrics


def test_the_apples_oranges_check_finds_colour_alignment_at_the_planted_layer(tmp_path):
    metrics = cli_results(tmp_path, "experiment=das_colour_alignment", f"layer={PLANTED_LAYER}")[PLANTED_LAYER]
    assert metrics["alignment_gap_p"] < 0.01 and metrics["alignment_gap"] > metrics["alignment_gap_null_q975"], metrics


def test_representation_alignment_finds_the_planted_layer_without_an_sae(tmp_path):
    """Colour words against colour images, raw residuals: unbiased CKA and mutual k-NN above their
    re-pairing nulls at the planted layer, and unbiased CKA lower far from it."""
    layers = ",".join(map(str, (PLANTED_LAYER, *FAR_LAYERS)))
    by_layer = cli_results(tmp_path, "experiment=alignment", f"layer={layers}", "dataset.images_per_concept=16",
                           "experiment.k_neighbours=3", sweep=True)  # fmt: skip
    planted = by_layer[PLANTED_LAYER]
    for metric in ("cka_unbiased", "mutual_knn"):
        assert planted[f"{metric}_p"] < 0.01 and planted[metric] > planted[f"{metric}_null_q975"], (metric, planted)
    for far in FAR_LAYERS:
        assert by_layer[far]["cka_unbiased"] < planted["cka_unbiased"], (far, by_layer[far]["cka_unbiased"])


def test_the_lens_finds_colour_images_nearest_their_colour_words_at_the_planted_layer(tmp_path):
    """LatentLens read-out: each colour image's nearest colour word, against shuffled image labels."""
    metrics = cli_results(tmp_path, "experiment=lens", f"layer={PLANTED_LAYER}")[PLANTED_LAYER]
    assert metrics["image_nearest_word_p"] < 0.01, metrics
    assert metrics["image_nearest_word"] > metrics["image_nearest_word_null_q975"], metrics
