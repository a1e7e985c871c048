"""Config composition: every preset composes and validates; typos fail before anything loads."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

from xmodal import config as schema
from xmodal.conf_dir import CONF_DIR
from xmodal.errors import ConfigError
from xmodal.experiments import STUDY_CONFIGS, register_experiment_configs
from xmodal.experiments.overlap.config import OverlapConfig
from xmodal.organism.config import OrganismModelConfig

UNKNOWN_KEY = (ConfigKeyError, ConfigAttributeError)

schema.register_configs()
register_experiment_configs()


def compose_with(*overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))


def test_default_config_validates():
    cfg = compose_with()
    schema.validate(cfg)
    assert (cfg.model.name, cfg.sae.name, cfg.dataset.name, cfg.experiment.name) == ("organism", "organism", "organism_concepts", "overlap")
    obj = OmegaConf.to_object(cfg)
    assert isinstance(obj.model, OrganismModelConfig) and isinstance(obj.experiment, OverlapConfig)
    assert cfg.layer == "preset:1" and cfg.model.layer_presets[1] == 9  # an SAE layer of the organism


def test_shift_takes_its_base_model_from_the_model_config():
    assert compose_with("experiment=shift").experiment.base_model == "organism_base"
    assert compose_with("experiment=shift", "model=paligemma2_3b").experiment.base_model == "gemma2_2b"
    assert compose_with("experiment=shift", "model=tiny", "experiment.base_model=tiny_text").experiment.base_model == "tiny_text"


@pytest.mark.parametrize("model", options("model"))
def test_every_model_config_composes_without_downloading(model):
    cfg = compose_with(f"model={model}")
    schema.validate(cfg)
    assert cfg.model.get("trust_remote_code", False) is False


@pytest.mark.parametrize("sae", [s for s in options("sae") if s != "local"])
def test_every_sae_config_composes(sae):
    schema.validate(compose_with(f"sae={sae}"))


def test_local_sae_without_path_is_reported():
    with pytest.raises(ConfigError, match="sae.path"):
        schema.validate(compose_with("sae=local"))


@pytest.mark.parametrize("cluster", options("cluster"))
def test_cluster_presets_compose(cluster):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"cluster={cluster}"], return_hydra_config=True)
    launcher = cfg.hydra.launcher._target_
    expected = {"local": "BasicLauncher", "submitit_local": "LocalLauncher", "slurm": "SlurmLauncher"}[cluster]
    assert launcher.endswith(expected)


@pytest.mark.parametrize(
    "override, error",
    [
        ("seed=1.5", ValidationError),
        ("positions.image_pooling=median", ValidationError),
        ("experiment.top_kk=5", UNKNOWN_KEY),
        ("model.hidden_sise=5", UNKNOWN_KEY),
        ("unknown_key=1", UNKNOWN_KEY),
    ],
)
def test_typos_and_wrong_types_fail_at_composition(override, error):
    with pytest.raises(ConfigCompositionException) as info:
        compose_with(override)
    assert isinstance(info.value.__cause__, error)


@pytest.mark.parametrize(
    "override, message",
    [
        ("+experiment.top_kk=5", "unknown config keys: experiment.top_kk"),
        ("layer=-1", "negative"),
        ("layer=abc", "layer='abc' is not a layer"),
        ("layer=rel:1.5", "outside rel:0..rel:1"),
        ("layer=pre:1", "is not a layer"),
        ("experiment.top_k=0", "top_k"),
        ("positions.text_prompt=hello", "{concept}"),
    ],
)
def test_semantic_checks(override, message):
    with pytest.raises(ConfigError, match=message):
        schema.validate(compose_with(override))


@pytest.mark.parametrize("model", ["gemma3_4b", "gemma3_12b", "gemma3_27b"])
@pytest.mark.parametrize("layer", ["rel:0.25", "preset:3", "12"])
def test_size_sweep_configs_validate_without_downloading(model, layer):
    cfg = compose_with(f"model={model}", "sae=gemma_scope_2", f"layer={layer}")
    schema.validate(cfg)
    assert cfg.sae.release == cfg.model.sae_release and cfg.sae.release.startswith("gemma-scope-2-")
    assert len(cfg.model.layer_presets) == 4


def test_readme_slurm_example_composes():
    overrides = [
        "experiment=overlap",
        "model=gemma3_27b",
        "sae=gemma_scope_2",
        "layer=preset:3",
        "dataset=builtin",
        "dataset.image_root=/shared/concept_photos",
        "cluster=slurm",
        "hydra.launcher.partition=gpu",
        "hydra.launcher.account=my_lab",
        "hydra.launcher.mem_gb=120",
        'hydra.launcher.setup=["source ~/xmodal/.venv/bin/activate"]',
        "logger=wandb",
        "logger.mode=online",
    ]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    schema.validate(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]))
    assert cfg.hydra.launcher.max_num_timeout == 3 and cfg.hydra.launcher.setup == ["source ~/xmodal/.venv/bin/activate"]
    assert cfg.sae.release == "gemma-scope-2-27b-it-res"


@pytest.mark.parametrize("experiment", list(STUDY_CONFIGS))
def test_every_experiment_config_composes(experiment):
    cfg = compose_with(f"experiment={experiment}")
    schema.validate(cfg)
    assert cfg.experiment.name == experiment
    assert isinstance(OmegaConf.to_object(cfg.experiment), STUDY_CONFIGS[experiment])


PRESETS = [name for name in options("experiment") if name not in STUDY_CONFIGS]


def test_whole_study_presets_are_global():
    assert len(PRESETS) >= 6
    for name in PRESETS:
        assert (Path(CONF_DIR) / "experiment" / f"{name}.yaml").read_text().startswith("# @package _global_"), name


@pytest.mark.parametrize("preset", PRESETS)
def test_whole_study_presets_set_model_sae_dataset_and_study(preset):
    """experiment=<study>_<model>: one choice sets the study, its model, SAE, dataset and layer; overrides still win."""
    study = preset.split("_")[0]
    cfg = compose_with(f"experiment={preset}")
    if "root" in cfg.dataset.keys() and OmegaConf.is_missing(cfg.dataset, "root"):  # an image folder: the user names it
        cfg = compose_with(f"experiment={preset}", "dataset.root=/data/photos")
    schema.validate(cfg)
    assert cfg.experiment.name == study and isinstance(OmegaConf.to_object(cfg.experiment), STUDY_CONFIGS[study])
    default = compose_with(f"experiment={study}")
    assert (cfg.model.name, cfg.sae.name, cfg.dataset.name, cfg.layer, dict(cfg.experiment)) != (
        default.model.name,
        default.sae.name,
        default.dataset.name,
        default.layer,
        dict(default.experiment),
    )
    overridden = compose_with(f"experiment={preset}", "layer=3", "model=tiny")
    assert overridden.layer == 3 and overridden.model.name == "tiny"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["experiment=probe", "experiment.train_split=1:8"], "experiment.train_split='1:8'; use 1:9, 2:8, 3:7, 4:6, 5:5"),
        (["experiment=probe", "experiment.train_split=2:8", "experiment.train_per_class=2"], "both set the training size"),
        (["experiment=probe", "experiment.top_n_curve=[0,5]"], "must hold counts of 1 or more"),
        (["experiment=das", "experiment.prior_placement=before"], None),  # an enum: Hydra refuses it at composition
        (["experiment=das", "experiment.concepts=[red]"], "or \\[\\] for all the dataset's"),
    ],
)
def test_seed_options_fail_before_a_model_loads(overrides, message):
    from xmodal.experiments import build_experiment

    if message is None:
        with pytest.raises(ConfigCompositionException):
            compose_with(*overrides)
        return
    cfg = compose_with(*overrides)
    with pytest.raises(ConfigError, match=message):
        build_experiment(cfg.experiment)  # the class validates its config at once
