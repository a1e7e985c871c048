"""A second model by its conf/model/ name, for studies that need one (shift's base LLM, DAS's VLM judge)."""

from __future__ import annotations

from typing import Sequence

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from xmodal.conf_dir import CONF_DIR
from xmodal.config import register_configs
from xmodal.errors import ConfigError
from xmodal.models.base import ModelAdapter, instantiate_model


def load_named_model(name: str, overrides: Sequence[str] = (), key: str = "model") -> ModelAdapter:
    """Instantiate conf/model/<name>.yaml (with `model.*` overrides); `key` names the setting in errors.

    Inside a running Hydra app the app's own config search path is used; elsewhere conf/.
    """
    try:
        if GlobalHydra.instance().is_initialized():
            cfg = compose(config_name="config", overrides=[f"model={name}", *overrides])
        else:
            register_configs()
            with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
                cfg = compose(config_name="config", overrides=[f"model={name}", *overrides])
    except Exception as err:  # Hydra's MissingConfigException lists the options
        raise ConfigError(f"{key}={name!r} is not a config in conf/model/: {str(err).splitlines()[0]}") from err
    return instantiate_model(cfg.model)
