"""Studies, one folder each: ``<study>/config.py`` (its config dataclass) and ``<study>/experiment.py`` (its class)."""

from __future__ import annotations

from hydra.core.config_store import ConfigStore
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from xmodal.experiments.alignment.config import AlignmentConfig
from xmodal.experiments.base import Experiment
from xmodal.experiments.das.config import DASConfig
from xmodal.experiments.features.config import FeaturesConfig
from xmodal.experiments.lens.config import LensConfig
from xmodal.experiments.mds.config import MDSConfig
from xmodal.experiments.overlap.config import OverlapConfig
from xmodal.experiments.probe.config import ProbeConfig
from xmodal.experiments.sae_eval.config import SAEEvalConfig
from xmodal.experiments.shift.config import ShiftConfig
from xmodal.experiments.steering.config import SteeringConfig

STUDY_CONFIGS = {
    "overlap": OverlapConfig,
    "mds": MDSConfig,
    "probe": ProbeConfig,
    "shift": ShiftConfig,
    "steering": SteeringConfig,
    "das": DASConfig,
    "alignment": AlignmentConfig,
    "lens": LensConfig,
    "features": FeaturesConfig,
    "sae_eval": SAEEvalConfig,
}


def register_experiment_configs() -> None:
    """Store each study's schema as experiment/base_<study> (conf/experiment/<study>.yaml starts from it)."""
    cs = ConfigStore.instance()
    for study, schema in STUDY_CONFIGS.items():
        cs.store(group="experiment", name=f"base_{study}", node=schema)


def build_experiment(node: DictConfig) -> Experiment:
    """The study a composed `experiment` node describes: its class (``_target_``) given its config object."""
    config = OmegaConf.to_object(node)
    return get_class(config._target_)(config)
