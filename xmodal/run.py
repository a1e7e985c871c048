"""The xmodal command: ``python -m xmodal.run experiment=overlap layer=5,9,12 -m``.

Order matters for fast failure: the composed config is checked against the schema
(Hydra does that), then semantically, then the model's config.json, the layer, the
SAE and the dataset are checked, all before any weights load. result.json is
written last; a job that stops early leaves none.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from xmodal import config as config_schema
from xmodal.activations.cache import ActivationCache
from xmodal.errors import XmodalError
from xmodal.experiments.base import RunContext
from xmodal.reporting.results import ResultWriter

log = logging.getLogger("xmodal.run")
config_schema.register_configs()
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def job_names() -> tuple[Path, str, str]:
    """Output directory, run name and sweep group of the current Hydra job."""
    hydra_cfg = HydraConfig.get()
    output_dir = Path(hydra_cfg.runtime.output_dir)
    overrides = hydra_cfg.job.override_dirname or "defaults"
    if hydra_cfg.mode == RunMode.MULTIRUN:
        return output_dir, overrides, Path(hydra_cfg.sweep.dir).name
    return output_dir, overrides, output_dir.name


def run_job(cfg: DictConfig) -> dict[str, Any]:
    start = time.perf_counter()
    output_dir, run_name, group = job_names()
    writer = ResultWriter(output_dir)  # removes a stale result.json first
    config_schema.validate(cfg)
    torch.manual_seed(cfg.seed)

    setup_start = time.perf_counter()
    experiment = instantiate(cfg.experiment)
    model = instantiate(cfg.model)  # reads the model config only; weights load on first use
    model.check_layer(cfg.layer)
    features = instantiate(cfg.sae, layer=cfg.layer)
    features.check_model(model.name, model.hidden_size, cfg.layer)
    dataset = instantiate(cfg.dataset)
    logger = instantiate(cfg.logger)
    ctx = RunContext(
        model=model,
        features=features,
        dataset=dataset,
        layer=cfg.layer,
        seed=cfg.seed,
        positions=OmegaConf.to_object(cfg.positions),
        cache=ActivationCache(cfg.paths.activation_cache),
        writer=writer,
        logger=logger,
    )
    ctx.timings_s["setup"] = time.perf_counter() - setup_start
    log.info(
        "%s | model=%s layer=%d sae=%s dataset=%s (%d concepts, %d images) -> %s",
        experiment.name, model.name, cfg.layer, features.name, dataset.name,
        len(dataset.concepts), len(dataset.images), output_dir,
    )
    logger.start(run_name, group, OmegaConf.to_container(cfg, resolve=True), output_dir)
    ok = False
    try:
        metrics = experiment.run(ctx)
        ctx.timings_s["total"] = time.perf_counter() - start
        logger.log_metrics(metrics, cfg.layer)
        extra = {"layer": cfg.layer, "model": model.name, "sae": features.name, "dataset": dataset.name}
        result = writer.finish(experiment.name, metrics, ctx.timings_s, extra)
        ok = True
    finally:
        logger.finish(ok)
    log.info("Finished in %.1f s: %s", ctx.timings_s["total"], result)
    return metrics


def user_error(err: BaseException) -> XmodalError | None:
    """The XmodalError behind `err`, also when Hydra's instantiate wrapped it."""
    seen = err
    while seen is not None:
        if isinstance(seen, XmodalError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    try:
        run_job(cfg)
    except Exception as err:
        cause = user_error(err)
        if cause is None:
            raise  # a bug, not bad input: keep the traceback
        log.error("%s", cause)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
