"""The xmodal command: ``python -m xmodal.run experiment=overlap layer=5,9,12 -m``.

Order matters for fast failure: the composed config is checked against the schema
(Hydra does that), then semantically, then the model's config.json, the layer, the
SAE and the dataset are checked, all before any weights load. result.json is
written last; a job that stops early leaves none.

Sweeps resume: a job whose directory already holds a finished result.json for the
same config and the same weights (local weights count by content) returns at once, so rerunning a multirun with the same
``hydra.sweep.dir`` completes only what is missing. Under ``-m`` a failing job
records its error in failure.json and the sweep goes on; the sweep report lists it
and the command exits non-zero.
"""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import psutil
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

import xmodal
from xmodal import config as config_schema
from xmodal.activations.cache import ActivationCache
from xmodal.conf_dir import CONF_DIR
from xmodal.errors import user_error
from xmodal.experiments import build_experiment, register_experiment_configs
from xmodal.experiments.base import RunContext
from xmodal.layers import LayerSpec, layer_given, parse_layer, relative_depth, resolve_layer
from xmodal.models.base import instantiate_model
from xmodal.reporting.results import ResultWriter, read_result, write_failure
from xmodal.saes.loading import instantiate_sae

log = logging.getLogger("xmodal.run")
config_schema.register_configs()
register_experiment_configs()

# Keys that change where things are stored or logged, not what is computed.
NOT_IN_CONFIG_HASH = ("logger", "paths")


@dataclass
class JobInfo:
    output_dir: Path
    run_name: str  # the job's overrides, e.g. "layer=3,model=tiny"
    group: str  # the sweep directory's name; the run directory's name outside sweeps
    multirun: bool
    overrides: list[str]


def current_job() -> JobInfo:
    hydra_cfg = HydraConfig.get()
    output_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    group = Path(hydra_cfg.sweep.dir).name if multirun else output_dir.name
    overrides = list(hydra_cfg.overrides.task)
    return JobInfo(output_dir, hydra_cfg.job.override_dirname or "defaults", group, multirun, overrides)


def config_hash(cfg: DictConfig) -> str:
    """Hash of the resolved config, leaving out storage and tracking keys."""
    container = OmegaConf.to_container(cfg, resolve=True)
    for key in NOT_IN_CONFIG_HASH:
        container.pop(key, None)
    return hashlib.sha256(json.dumps(container, sort_keys=True, default=str).encode()).hexdigest()[:16]


def weights_hash(model_identity: dict[str, Any], sae_identity: dict[str, Any]) -> str:
    """Hash of what identifies the weights a job reads: the model's and the SAE's identity."""
    payload = json.dumps({"model": model_identity, "sae": sae_identity}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def code_version() -> dict[str, Any]:
    """xmodal's version and, in a git checkout, the commit and whether tracked files differ from it."""
    checkout = Path(xmodal.__file__).resolve().parent.parent
    version: dict[str, Any] = {"xmodal_version": xmodal.__version__, "git_commit": None, "git_dirty": None}
    try:
        found = subprocess.run(["git", "rev-parse", "--show-toplevel", "HEAD"], cwd=checkout, capture_output=True, text=True, timeout=10)
        lines = found.stdout.split()
        # Only xmodal's own checkout: an installed copy inside some other repository has no commit of its own.
        if found.returncode == 0 and len(lines) == 2 and Path(lines[0]).resolve() == checkout:
            dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=checkout, capture_output=True, timeout=30)
            version.update(git_commit=lines[1], git_dirty=dirty.returncode != 0)
    except (OSError, subprocess.TimeoutExpired) as err:  # no git, or a slow file system: recorded as unknown
        log.info("git commit not recorded (%s)", err)
    return version


def run_job(cfg: DictConfig, job: JobInfo) -> dict[str, Any]:
    start = time.perf_counter()
    config_schema.validate(cfg)
    digest = config_hash(cfg)
    setup_start = time.perf_counter()
    layer_spec = parse_layer(cfg.layer)
    experiment = build_experiment(cfg.experiment)
    model = instantiate_model(cfg.model)  # reads the model config only; weights load on first use
    experiment.check_model(model)
    if not model.has_decoder and layer_spec.kind == "preset" and not layer_given(job.overrides):
        # The shipped default (layer=preset:1) names a decoder's layer; a dual encoder's default is
        # its shared embedding. A preset the user asks for resolves through model.layer_presets.
        layer_spec = LayerSpec("abs", 0)
    layer = resolve_layer(layer_spec, model.num_layers, model.layer_presets, model.name)
    model.check_layer(layer)
    features = instantiate_sae(cfg.sae, layer)
    # Resume only where the same config ran on the same weights: a local model or SAE retrained at
    # the same path has another identity (a hash of its files), so its jobs run again.
    weights = weights_hash(model.identity, features.identity)
    finished = read_result(job.output_dir)
    if finished is not None and (finished.get("config_hash"), finished.get("weights_hash")) == (digest, weights):
        log.info("Skipping %s: finished earlier with the same config and weights (%s)", job.run_name, job.output_dir / "result.json")
        return finished["metrics"]
    writer = ResultWriter(job.output_dir)  # clears the earlier run's outputs, result.json first
    torch.manual_seed(cfg.seed)
    features.check_model(model.name, model.site_width(features.reads), layer)  # the width where the SAE reads
    dataset = instantiate(cfg.dataset)
    experiment.check_dataset(dataset)
    logger = instantiate(cfg.logger)
    ctx = RunContext(
        model=model,
        features=features,
        dataset=dataset,
        layer=layer,
        seed=cfg.seed,
        positions=OmegaConf.to_object(cfg.positions),
        cache=ActivationCache(cfg.paths.activation_cache),
        writer=writer,
        logger=logger,
        cache_also_layers=tuple(model.layer_presets) if cfg.paths.cache_preset_layers else (),
    )
    ctx.timings_s["setup"] = time.perf_counter() - setup_start
    log.info(
        "%s | model=%s layer=%d (%s) sae=%s dataset=%s (%d concepts, %d images) -> %s",
        experiment.name,
        model.name,
        layer,
        layer_spec,
        features.name,
        dataset.name,
        len(dataset.concepts),
        len(dataset.images),
        job.output_dir,
    )
    run_id = hashlib.sha256(str(job.output_dir.resolve()).encode()).hexdigest()[:16]  # stable across requeues
    logger.start(job.run_name, job.group, OmegaConf.to_container(cfg, resolve=True), job.output_dir, run_id)
    ok = False
    try:
        with ctx.timed("experiment"):
            metrics = experiment.run(ctx)
        ctx.timings_s["total"] = time.perf_counter() - start
        # From interpreter start: with one process per job (submitit) this is the job's whole cost.
        ctx.timings_s["since_process_start"] = time.time() - psutil.Process().create_time()
        identity = {
            "model": model.name,
            "num_layers": model.num_layers,
            "layer": layer,
            "layer_spec": str(layer_spec),
            "relative_depth": relative_depth(layer, model.num_layers),
            "sae": features.name,
            "sae_width": features.identity.get("width") or (features.d_sae if features.sae is not None else None),
            "dataset": dataset.name,
            "seed": cfg.seed,
        }
        logger.log_metrics(metrics, identity)
        provenance = {"model_identity": model.identity, "sae_identity": features.identity, **code_version()}
        extra = {**identity, "config_hash": digest, "weights_hash": weights, "overrides": job.overrides, **provenance, **ctx.metadata}
        result = writer.finish(experiment.name, metrics, ctx.timings_s, extra)
        ok = True
    finally:
        logger.finish(ok)
    log.info("Finished in %.1f s: %s", ctx.timings_s["total"], result)
    return metrics


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    job = current_job()
    try:
        run_job(cfg, job)
    except Exception as err:
        cause = user_error(err)
        write_failure(job.output_dir, cause or err, None)
        if cause is not None:
            log.error("%s", cause)
        else:
            log.exception("unexpected error in job %s", job.run_name)
        if job.multirun:
            return  # the other jobs go on; the sweep report lists this one and the exit code is non-zero
        if cause is not None:
            raise SystemExit(2) from None
        raise


if __name__ == "__main__":
    main()
