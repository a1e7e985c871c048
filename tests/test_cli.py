"""`python -m xmodal.run` as a user runs it: results on disk, sweeps, launchers, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from tests.conftest import run_cli
from tests.test_sae import save_jumprelu_sae


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("cli")


def cache_override(workdir: Path) -> str:
    return f"paths.activation_cache={workdir / 'activation_cache'}"


def results_under(root: Path) -> list[Path]:
    return sorted(root.rglob("result.json"))


def test_default_run_is_the_organism_with_its_sae(tmp_path):
    organism = ("model=organism", "sae=organism", "dataset=organism_concepts", "layer=preset:1")  # the shipped defaults
    proc = run_cli(*organism, "experiment.n_permutations=200", f"paths.activation_cache={tmp_path / 'cache'}", "hydra.run.dir=outputs/organism", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "outputs" / "organism" / "result.json").read_text())
    assert (result["status"], result["layer"], result["model"], result["sae"]) == ("ok", 9, "organism", "organism")
    assert result["metrics"]["n_concepts"] == 33


def test_overlap_writes_result_tables_and_figures_and_is_deterministic(workdir):
    first = run_cli("experiment=overlap", cache_override(workdir), "hydra.run.dir=outputs/run1", cwd=workdir)
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_cli("experiment=overlap", cache_override(workdir), "hydra.run.dir=outputs/run2", cwd=workdir)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Activation cache hit" in second.stdout + second.stderr

    run = workdir / "outputs" / "run1"
    result = json.loads((run / "result.json").read_text())
    assert result["status"] == "ok" and result["experiment"] == "overlap" and result["layer"] == 1
    for table in ("codes", "concepts", "null", "feature_correlations", "crossmodal_features"):
        assert (run / "tables" / f"{table}.parquet").exists() and (run / "tables" / f"{table}.csv").exists()
    for figure in ("jaccard_vs_baseline", "crossmodal_heatmap", "null_distributions", "concept_geometry"):
        assert (run / "figures" / f"{figure}.png").stat().st_size > 10_000
    assert (run / ".hydra" / "config.yaml").exists()

    metrics = result["metrics"]
    for stat in ("jaccard_topk", "jaccard_active", "pearson", "spearman", "mutual_information", "n_crossmodal_features"):
        assert f"{stat}_null_mean" in metrics and 0 < metrics[f"{stat}_p"] <= 1
    null = pd.read_parquet(run / "tables" / "null.parquet")
    assert (null["n_permutations"] == 1000).all()
    concepts = pd.read_parquet(run / "tables" / "concepts.parquet")
    assert len(concepts) == metrics["n_concepts"] == 12
    for term in ("text", "image", "text_vs_image_partner", "image_vs_text_partner"):  # seed 000's four ratios, each with its null
        assert {f"specificity_{term}", f"specificity_{term}_null"} <= set(concepts.columns)
        assert f"specificity_{term}_mean" in metrics and f"specificity_{term}_null_mean" in metrics
    assert {"concept", "partner", "specificity_text_vs_image_partner"} <= set(pd.read_parquet(run / "tables" / "crossmodal_features.parquet").columns)
    codes = pd.read_parquet(run / "tables" / "codes.parquet")
    assert set(codes["modality"]) == {"text", "image"} and (codes["value"] != 0).all()  # sparse: non-zeros only

    # Same command, same numbers (the second run read the cache).
    assert json.loads((workdir / "outputs" / "run2" / "result.json").read_text())["metrics"] == metrics


def test_multirun_over_layers(workdir):
    sweep = workdir / "sweep_basic"
    proc = run_cli("-m", "experiment=overlap", "layer=1,2,3", "experiment.n_permutations=200", cache_override(workdir), f"hydra.sweep.dir={sweep}", cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = results_under(sweep)
    # One folder per job, named by its overrides (cache paths left out), directly under the sweep.
    assert [p.parent.name for p in results] == [f"experiment.n_permutations=200,experiment=overlap,layer={n}" for n in (1, 2, 3)]
    assert all(p.parent.parent == sweep for p in results)
    assert {json.loads(p.read_text())["layer"] for p in results} == {1, 2, 3}


def test_multirun_through_submitit_local(workdir):
    sweep = workdir / "sweep_submitit"
    proc = run_cli(
        "-m",
        "experiment=overlap",
        "layer=1,2,3",
        "experiment.n_permutations=200",
        "hydra/launcher=submitit_local",
        cache_override(workdir),
        f"hydra.sweep.dir={sweep}",
        cwd=workdir,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = results_under(sweep)
    assert len(results) == 3
    assert all(json.loads(p.read_text())["status"] == "ok" for p in results)
    assert list(sweep.rglob("*_submitted.pkl")), "jobs did not go through submitit"


def make_photos(root: Path) -> Path:
    for i, concept in enumerate(["cat", "dog"]):
        (root / concept).mkdir(parents=True)
        Image.new("RGB", (32, 32), (200 * i, 50, 50)).save(root / concept / "a.png")
    return root


def bad_inputs(tmp: Path) -> dict[str, tuple[list[str], str, dict]]:
    empty = make_photos(tmp / "empty_concept")
    (empty / "bird").mkdir()
    corrupt = make_photos(tmp / "corrupt")
    (corrupt / "dog" / "b.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    save_jumprelu_sae(tmp / "wide_sae", d_in=128)
    offline = {"HF_HUB_OFFLINE": "1"}
    return {
        "layer_out_of_range": (["layer=99"], "layer=99 is out of range for model 'tiny'", {}),
        "layer_not_int": (["layer=abc"], "layer='abc' is not a layer", {}),
        "missing_root": (["dataset=image_folder", f"dataset.root={tmp / 'nowhere'}"], "does not exist", {}),
        "concept_without_image": (["dataset=image_folder", f"dataset.root={empty}"], "bird' holds no image", {}),
        "corrupt_image": (["dataset=image_folder", f"dataset.root={corrupt}"], "b.jpg' of concept 'dog' cannot be read", {}),
        "sae_width": (["sae=local", f"sae.path={tmp / 'wide_sae'}"], "expects d_in=128 but model 'tiny' has hidden size 64", {}),
        "unknown_model_offline": (["model=gemma3_4b", "model.name_or_path=google/no-such-vlm"], "could not load model config 'google/no-such-vlm'", offline),
        "embedder_offline": (
            ["experiment=mds", "experiment.text_embedder=sentence-transformers/no-such-embedder", "experiment.zero_mask=false"],
            "text embedder 'sentence-transformers/no-such-embedder' cannot be loaded",
            offline,
        ),
        "image_embedder_offline": (
            ["experiment=mds", "experiment.image_embedder_fallback=null", "experiment.zero_mask=false"],
            "could not load image embedder processor 'google/vit-base-patch16-224-in21k'",
            offline,
        ),
        "organism_sae_layer": (["model=organism", "sae=organism", "dataset=organism_concepts", "layer=7"], "not layer=7", {}),
        "organism_sae_width": (
            ["model=organism", "sae=organism", "dataset=organism_concepts", "layer=9", "sae.width=2048"],
            "sae.width=2048 is not shipped for the instruct organism (joint); the widths are 512, 1024",
            {},
        ),
        "text_only_dataset": (["experiment=overlap", "dataset=das_appendix_e"], "experiment=overlap needs images, and dataset 'das_appendix_e' has none", {}),
    }


@pytest.mark.parametrize(
    "case",
    [
        "layer_out_of_range",
        "layer_not_int",
        "missing_root",
        "concept_without_image",
        "corrupt_image",
        "sae_width",
        "unknown_model_offline",
        "embedder_offline",
        "image_embedder_offline",
        "organism_sae_layer",
        "organism_sae_width",
        "text_only_dataset",
    ],
)
def test_bad_input_gives_one_clear_error_and_no_result(case, tmp_path):
    overrides, message, env = bad_inputs(tmp_path)[case]
    proc = run_cli(*overrides, f"paths.activation_cache={tmp_path / 'cache'}", cwd=tmp_path, env_extra=env, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert sum(message in line for line in output.splitlines()) == 1, output[-2000:]
    assert "Traceback" not in output and "Error in call to target" not in output, output[-3000:]
    assert results_under(tmp_path) == []


def test_wandb_offline_run_is_written_without_the_api_key(workdir):
    secret = "xmodal-test-secret-4f2a"
    run_dir = workdir / "outputs" / "wandb_run"
    proc = run_cli(
        "logger=wandb",
        "experiment.n_permutations=100",
        cache_override(workdir),
        f"hydra.run.dir={run_dir}",
        cwd=workdir,
        env_extra={"WANDB_MODE": "offline", "WANDB_API_KEY": secret},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    logged = list(runs[0].glob("*.wandb"))
    assert logged and logged[0].stat().st_size > 0
    assert list((runs[0] / "files" / "media").rglob("*.png")), "figures were not attached"
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), f"API key leaked into {path}"


def test_mds_study_sweeps_over_layers(workdir):
    sweep = workdir / "mds_sweep"
    proc = run_cli("-m", "experiment=mds", "layer=1,2", "experiment.n_null=50", cache_override(workdir), f"hydra.sweep.dir={sweep}", cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = results_under(sweep)
    assert len(results) == 2
    for path in results:
        result = json.loads(path.read_text())
        assert result["experiment"] == "mds"
        groups = pd.read_parquet(path.parent / "tables" / "group_sizes.parquet")
        assert list(groups["group"]) == ["ImgD", "CrossD", "TextD"]
        assert groups["n_features"].sum() == result["metrics"]["n_active_features"]
        assert {"n_ImgD_null_mean", "n_TextD_p", "mds_std_null_mean"} <= set(result["metrics"])
        assert (path.parent / "figures" / "mds_histogram.png").exists()
        scores = pd.read_parquet(path.parent / "tables" / "interpretability.parquet")
        # offline, the paper's ViT-in21k cannot load: the fallback is used and named as such
        assert set(scores["embedder"]) == {"all-MiniLM-L6-v2", "tiny vision tower (mean-pooled); fallback, google/vit-base-patch16-224-in21k not loadable"}
        examples = pd.read_parquet(path.parent / "tables" / "top_examples.parquet")
        assert set(examples["modality"]) <= {"image", "text"} and examples.groupby(["feature", "modality"])["rank"].max().le(8).all()
        assert (examples["activation"] > 0).all() and (path.parent / "figures" / "top_images.png").exists()
        assert {"I_mean", "I_null_mean", "W_mean", "W_null_mean"} <= set(scores.columns)
        overall = scores[scores["group"] == "all"].set_index("modality")  # Table 1: every active feature
        assert overall["n_features"].tolist() == [result["metrics"]["n_active_features"]] * 2
        assert result["metrics"]["winrate_delta_image_minus_text"] == pytest.approx(overall.loc["image", "W_mean"] - overall.loc["text", "W_mean"])
        masks = pd.read_parquet(path.parent / "tables" / "zero_mask.parquet")
        assert set(masks["removed"]) == {"none", "ImgD", "TextD", "CrossD"} and masks["accuracy"].between(0, 1).all()
        assert masks.loc[masks["removed"] != "none", "random_mean"].notna().all()
    assert (sweep / "figures" / "mds__n_ImgD.png").exists()
    assert len(pd.read_parquet(sweep / "summary.parquet")) == 2


def test_mds_on_a_multimodal_sae_trained_in_the_run(workdir):
    run_dir = workdir / "outputs" / "msae"
    proc = run_cli(
        "experiment=mds",
        "experiment.msae=true",
        "experiment.msae_d_sae=64",
        "experiment.msae_k=8",
        "experiment.msae_epochs=5",
        "experiment.interpretability=false",
        "experiment.zero_mask=false",
        "experiment.n_null=20",
        cache_override(workdir),
        f"hydra.run.dir={run_dir}",
        cwd=workdir,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    from sae_lens import SAE

    msae = SAE.load_from_disk(run_dir / "msae")
    assert (msae.cfg.d_sae, msae.cfg.k) == (64, 8)
    features = pd.read_parquet(run_dir / "tables" / "features.parquet")
    assert features["feature"].max() < 64


def test_probe_study_writes_every_probe_next_to_its_null(workdir):
    run_dir = workdir / "outputs" / "probe"
    proc = run_cli("experiment=probe", "experiment.n_permutations=20", cache_override(workdir), f"hydra.run.dir={run_dir}", cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    probes = pd.read_parquet(run_dir / "tables" / "probes.parquet").set_index("probe")
    assert list(probes.index) == ["text_to_text", "image_to_image", "text_to_image", "image_to_text", "modality", "brightness", "redness"]
    assert probes["chance"].between(0, 1).all() and probes["shuffled_mean"].between(0, 1).all()
    assert probes.loc["brightness", "chance"] == 0.5 and probes.loc["text_to_image", "n_test"] == 36
    metrics = json.loads((run_dir / "result.json").read_text())["metrics"]
    assert {"text_to_image_accuracy", "text_to_image_accuracy_null_mean", "text_to_image_p", "text_to_image_chance"} <= set(metrics)
    assert (run_dir / "figures" / "probe_accuracy.png").exists()
    from safetensors import safe_open

    record = json.loads((run_dir / "result.json").read_text())
    assert record["weights"] == [f"weights/probe_{name}.safetensors" for name in probes.index]
    with safe_open(run_dir / "weights" / "probe_text_to_image.safetensors", framework="numpy") as weights:
        classes = json.loads(weights.metadata()["classes"])
        coef, ids = weights.get_tensor("coef"), weights.get_tensor("feature_ids")
    assert len(classes) == 12 and coef.shape == (12, len(ids)) and ids.max() < metrics["n_features"]


def test_probe_seed_003_options_top_n_curve_split_ratio_and_shared_features(workdir):
    run_dir = workdir / "outputs" / "probe_seed003"
    proc = run_cli(
        "experiment=probe",
        "experiment.n_permutations=20",
        "experiment.top_n_curve=[1,5]",
        "experiment.train_split=5:5",
        "experiment.attributes=[]",
        cache_override(workdir),
        f"hydra.run.dir={run_dir}",
        cwd=workdir,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    curve = pd.read_parquet(run_dir / "tables" / "top_n_curve.parquet")
    assert list(curve["top_n"]) == ["1", "5", "all"] and curve["macro_f1"].between(0, 1).all()
    assert (curve["n_train"] == 18).all()  # 5:5 of 36 images (3 per class, 12 classes)
    metrics = json.loads((run_dir / "result.json").read_text())["metrics"]
    assert {"top_1_image_macro_f1", "top_all_image_macro_f1", "top_5_image_p"} <= set(metrics)
    shared = pd.read_parquet(run_dir / "tables" / "shared_features.parquet")
    assert shared.groupby("class")["rank"].max().eq(2).all() and (shared["occurrences"] <= shared["n_samples"]).all()
    assert (run_dir / "figures" / "top_n_curve.png").stat().st_size > 5_000


def test_probe_on_the_vision_tower_reads_images_only(workdir, tiny):
    run_dir = workdir / "outputs" / "probe_tower"
    proc = run_cli(
        "experiment=probe",
        "experiment.features=vision_tower",
        "experiment.n_permutations=20",
        "experiment.attributes=[brightness]",
        cache_override(workdir),
        f"hydra.run.dir={run_dir}",
        cwd=workdir,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    probes = pd.read_parquet(run_dir / "tables" / "probes.parquet")
    assert list(probes["probe"]) == ["image_to_image", "brightness"]
    metrics = json.loads((run_dir / "result.json").read_text())["metrics"]
    assert metrics["n_features"] == tiny.model.config.vision_config.hidden_size and metrics["n_text_samples"] == 0
    proc = run_cli(
        "experiment=probe",
        "experiment.features=vision_tower",
        "experiment.top_n_curve=[1]",
        cache_override(workdir),
        f"hydra.run.dir={workdir / 'outputs' / 'tower_bad'}",
        cwd=workdir,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "with experiment.features=vision_tower there are none" in output and "Traceback" not in output


def test_probe_reads_coco_supercategories_from_captions_and_images(tmp_path):
    """Seed 001's category probes: label=category, one caption and one image per COCO image."""
    from tests.test_data import make_coco

    root = make_coco(tmp_path / "coco", per_label=6)
    run_dir = tmp_path / "run"
    proc = run_cli(
        "experiment=probe",
        "dataset=coco_supercategories",
        f"dataset.root={root}",
        "dataset.supercategories=[animal,vehicle]",
        "dataset.images_per_category=6",
        "experiment.label=category",
        "experiment.text_templates=['{concept}']",
        "experiment.n_permutations=20",
        "experiment.attributes=[]",
        f"paths.activation_cache={tmp_path / 'cache'}",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    probes = pd.read_parquet(run_dir / "tables" / "probes.parquet").set_index("probe")
    assert (probes["chance"] == 0.5).all() and probes.loc["image_to_image", "n_train"] + probes.loc["image_to_image", "n_test"] == 12
    assert probes.loc["image_to_image", "accuracy"] == 1.0  # red animals, blue vehicles: the tiny tower tells them apart


def test_probe_with_a_single_class_is_refused(tmp_path):
    root = make_photos(tmp_path / "one_class")
    for path in (root / "dog").iterdir():
        path.unlink()
    (root / "dog").rmdir()
    proc = run_cli("experiment=probe", "dataset=image_folder", f"dataset.root={root}", f"paths.activation_cache={tmp_path / 'cache'}", cwd=tmp_path)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2
    assert sum("has 1 concept(s); cross-modal statistics need at least 2" in line for line in output.splitlines()) == 1, output[-2000:]
    assert results_under(tmp_path) == []


def test_probe_split_without_test_examples_is_refused(tmp_path):
    proc = run_cli("experiment=probe", "experiment.train_per_class=3", f"paths.activation_cache={tmp_path / 'cache'}", cwd=tmp_path)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2
    assert sum("train_per_class=3 leaves no test example" in line for line in output.splitlines()) == 1, output[-2000:]
    assert results_under(tmp_path) == []


def test_shift_between_a_vlm_and_its_own_decoder_is_zero(workdir):
    run_dir = workdir / "outputs" / "shift"
    proc = run_cli("experiment=shift", "experiment.n_permutations=200", cache_override(workdir), f"hydra.run.dir={run_dir}", cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((run_dir / "result.json").read_text())["metrics"]
    # tiny_text is tiny's own language model: the same prompts must give the same codes.
    assert metrics["cosine"] == pytest.approx(1.0) and metrics["l2_mean"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["cosine_null_mean"] < 0.99 and metrics["cosine_p"] < 0.01
    prompts = pd.read_parquet(run_dir / "tables" / "prompts.parquet")
    assert len(prompts) == 12 and {"cosine", "cosine_null", "l2"} <= set(prompts.columns)
    assert (run_dir / "figures" / "coefficient_differences.png").exists()


def test_shift_on_whole_sentences(workdir, tmp_path):
    """experiment.prompts=sentences: the shipped set by default, or a file of one 'category<TAB>sentence' per line."""
    run_dir = workdir / "outputs" / "shift_sentences"
    proc = run_cli(
        "experiment=shift", "experiment.prompts=sentences", "experiment.n_permutations=50", cache_override(workdir), f"hydra.run.dir={run_dir}", cwd=workdir
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    prompts = pd.read_parquet(run_dir / "tables" / "prompts.parquet")
    assert len(prompts) == 24 and "The quick brown fox jumps over the lazy dog." in set(prompts["prompt"])
    assert json.loads((run_dir / "result.json").read_text())["metrics"]["n_prompts"] == 24

    mine = tmp_path / "mine.txt"
    mine.write_text("# two of my own\nvisual\tA red square.\nabstract\tTime flies.\nbroken line without a tab\n")
    proc = run_cli(
        "experiment=shift",
        "experiment.prompts=sentences",
        f"experiment.sentences_file={mine}",
        cache_override(workdir),
        f"hydra.run.dir={tmp_path / 'bad'}",
        cwd=workdir,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "mine.txt, line 4: expected 'category<TAB>sentence'" in output, output[-2000:]
    assert not (tmp_path / "bad" / "result.json").exists()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (['experiment.base_model_overrides=["model.hidden_size=32"]'], "has hidden size 32 but model 'tiny' has 64"),
        (["experiment.base_model=no_such_model"], "experiment.base_model='no_such_model' is not a config in conf/model/"),
    ],
)
def test_shift_refuses_incompatible_base_models(overrides, message, tmp_path):
    proc = run_cli("experiment=shift", *overrides, f"paths.activation_cache={tmp_path / 'cache'}", cwd=tmp_path)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2 and sum(message in line for line in output.splitlines()) == 1, output[-2000:]
    assert results_under(tmp_path) == []
