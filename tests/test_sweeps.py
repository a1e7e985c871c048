"""Sweeps at scale: resume after a kill, submitit requeue, reports, depth sweeps, W&B groups."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.conftest import REPO, TINY_CONFIG, run_cli
from tests.wandb_records import summarise

SIX_JOBS = ["-m", "experiment=overlap", "layer=0,1,2,3,4,5", "experiment.n_permutations=200"]
COMPARED = [
    "layer",
    "layer_spec",
    "relative_depth",
    "model",
    "sae",
    "dataset",
    "status",
    "overrides",
    "jaccard_topk",
    "jaccard_topk_p",
    "pearson",
    "n_crossmodal_features",
    "n_crossmodal_features_p",
    "mutual_information",
]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("sweeps")


def cli_args(*overrides: str, workdir: Path) -> list[str]:
    return [sys.executable, "-m", "xmodal.run", TINY_CONFIG, *overrides, f"paths.activation_cache={workdir / 'cache'}"]


def finished(sweep: Path) -> list[Path]:
    return sorted(sweep.rglob("result.json"))


def test_killed_sweep_resumes_without_redoing_finished_jobs(workdir):
    reference, sweep = workdir / "reference", workdir / "resumed"
    proc = run_cli(*SIX_JOBS, f"paths.activation_cache={workdir / 'cache'}", f"hydra.sweep.dir={reference}", cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    args = cli_args(*SIX_JOBS, f"hydra.sweep.dir={sweep}", workdir=workdir)
    first = subprocess.Popen(args, cwd=workdir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while len(finished(sweep)) < 2 and time.time() < deadline and first.poll() is None:
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)  # as a preempted node would: no chance to clean up
    first.wait()
    done = finished(sweep)
    assert 2 <= len(done) < 6, f"{len(done)} jobs finished before the kill"
    mtimes = {p: p.stat().st_mtime_ns for p in done}

    again = subprocess.run(args, cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    log = again.stdout + again.stderr
    assert log.count("Skipping ") == len(done)
    assert all(p.stat().st_mtime_ns == mtimes[p] for p in done), "a finished job was redone"
    assert len(finished(sweep)) == 6

    resumed = pd.read_parquet(sweep / "summary.parquet")
    uninterrupted = pd.read_parquet(reference / "summary.parquet")
    assert len(resumed) == 6 and (resumed["status"] == "ok").all()
    pd.testing.assert_frame_equal(
        resumed[COMPARED].sort_values("layer").reset_index(drop=True),
        uninterrupted[COMPARED].sort_values("layer").reset_index(drop=True),
    )


def test_report_lists_a_failed_job_with_its_error(workdir):
    sweep = workdir / "with_failure"
    proc = run_cli(
        "-m",
        "experiment=overlap",
        "layer=1,2,99",
        "experiment.n_permutations=100",
        f"paths.activation_cache={workdir / 'cache'}",
        f"hydra.sweep.dir={sweep}",
        cwd=workdir,
    )
    assert proc.returncode == 1, "a sweep with a failed job must exit non-zero"
    assert len(finished(sweep)) == 2, "the failure stopped the other jobs"
    for name in ("summary.parquet", "report.md"):
        (sweep / name).unlink()  # the on-demand report must write them again

    report = subprocess.run([sys.executable, "-m", "xmodal.reporting", str(sweep)], cwd=workdir, capture_output=True, text=True)
    assert report.returncode == 0, report.stderr
    summary = pd.read_parquet(sweep / "summary.parquet")
    failed = summary[summary["status"] == "failed"]
    assert len(summary) == 3 and len(failed) == 1
    assert "layer=99 is out of range for model 'tiny'" in failed["error"].iloc[0]
    text = (sweep / "report.md").read_text()
    assert "## Jobs that did not finish" in text and "layer=99 is out of range" in text
    curves = list((sweep / "figures").glob("overlap__*.png"))
    assert {p.stem for p in curves} >= {"overlap__jaccard_topk", "overlap__pearson", "overlap__n_crossmodal_features"}
    assert all(f"figures/{p.name}" in text for p in curves)

    missing = subprocess.run([sys.executable, "-m", "xmodal.reporting", str(workdir / "nope")], capture_output=True, text=True)
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def test_depth_sweep_over_models_records_absolute_and_relative_layers(workdir):
    sweep = workdir / "depths"
    proc = run_cli(
        "-m",
        "experiment=overlap",
        "model=tiny,tiny_12l",
        "layer=rel:0.5,preset:1",
        "experiment.n_permutations=100",
        f"paths.activation_cache={workdir / 'cache'}",
        f"hydra.sweep.dir={sweep}",
        cwd=workdir,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = pd.read_parquet(sweep / "summary.parquet").set_index(["model", "layer_spec"])
    assert summary.loc[("tiny", "rel:0.5"), "layer"] == 3 and summary.loc[("tiny_12l", "rel:0.5"), "layer"] == 6
    assert summary.loc[("tiny", "preset:1"), "layer"] == 2 and summary.loc[("tiny_12l", "preset:1"), "layer"] == 5
    assert summary.loc[("tiny_12l", "rel:0.5"), "relative_depth"] == pytest.approx(6 / 11)
    assert summary.loc[("tiny", "rel:0.5"), "num_layers"] == 6


def test_wandb_offline_sweep_shares_one_group(workdir):
    sweep = workdir / "wandb_sweep"
    proc = run_cli(
        "-m",
        "experiment=overlap",
        "layer=1,2",
        "logger=wandb",
        "experiment.n_permutations=100",
        f"paths.activation_cache={workdir / 'cache'}",
        f"hydra.sweep.dir={sweep}",
        cwd=workdir,
        env_extra={"WANDB_MODE": "offline"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted(sweep.rglob("run-*.wandb"))
    assert len(runs) == 2
    logged = [summarise(p) for p in runs]
    assert {run["group"] for run in logged} == {"wandb_sweep"}
    assert len({run["run_id"] for run in logged}) == 2
    for run, layer in zip(logged, (1, 2)):
        result = json.loads(next(p for p in sweep.rglob("result.json") if f"layer={layer}" in str(p)).read_text())
        assert run["history"]["layer"] == layer
        assert run["history"]["jaccard_topk"] == pytest.approx(result["metrics"]["jaccard_topk"])
        assert any(k.startswith("tables/concepts") for k in run["history"])
        assert any(k.startswith("figures/jaccard_vs_baseline") for k in run["history"])


class XmodalSubmititJob:
    """An xmodal job as submitit runs it: checkpoint() requeues it with the same arguments."""

    def __init__(self, overrides: list[str]) -> None:
        self.overrides = overrides

    def __call__(self) -> dict:
        from xmodal.run import main

        sys.argv = ["xmodal.run", *self.overrides]
        main()
        return json.loads(Path(self.overrides[-1].split("=", 1)[1], "result.json").read_text())

    def checkpoint(self):
        import submitit

        return submitit.helpers.DelayedSubmission(self)


def preempt_local_job(job) -> None:
    """Send submitit's preemption signal (USR2) to the job's task, as SLURM does.

    ``LocalJob._interrupt()`` signals the local controller process, which in submitit
    1.5.4 does not pass the signal on, so the task would never see it.
    """
    import psutil
    from submitit.local.local import LocalJobEnvironment

    tasks = [p for p in psutil.Process(int(job.job_id)).children(recursive=True) if "submitit.core._submit" in " ".join(p.cmdline())]
    assert tasks, "no running task to preempt"
    for task in tasks:
        task.send_signal(LocalJobEnvironment._usr_sig())


@pytest.mark.slow  # submitit starts the job in a process of its own
def test_submitit_interrupted_job_is_requeued_and_resumes_from_the_cache(workdir, monkeypatch):
    import submitit

    # The worker process unpickles XmodalSubmititJob by module name, as pytest imported it.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO / "tests"), str(REPO), os.environ.get("PYTHONPATH", "")]))
    cache, out = workdir / "requeue_cache", workdir / "requeued"
    executor = submitit.AutoExecutor(folder=workdir / "submitit", cluster="local")
    executor.update_parameters(timeout_min=10)
    job = executor.submit(
        XmodalSubmititJob(
            [TINY_CONFIG, "experiment=overlap", "layer=2", "experiment.n_permutations=3000", f"paths.activation_cache={cache}", f"hydra.run.dir={out}"]
        )
    )
    deadline = time.time() + 300

    def finished_readout() -> bool:  # the streaming pass entered its last shard (progress.json: complete)
        return any('"complete": true' in p.read_text() for p in cache.rglob("progress.json"))

    while not finished_readout() and time.time() < deadline and not job.done():
        time.sleep(0.05)
    assert finished_readout(), f"the job never wrote its activations: {job.state}"
    assert not (out / "result.json").exists()
    preempt_local_job(job)
    result = job.result()
    assert result["status"] == "ok" and result["layer"] == 2
    log = Path(job.paths.stderr).read_text() + Path(job.paths.stdout).read_text()
    assert "Calling checkpoint method" in log and "Requeued job" in log
    assert log.count("Starting with JobEnvironment") == 2
    assert "Activation cache hit for layer 2" in log  # the second attempt resumed from the cache


def test_the_layer_gradient_is_a_rank_correlation_with_its_permutation_p():
    from xmodal.reporting.sweep import layer_gradient

    depth = np.linspace(0.1, 0.9, 6)
    rising = pd.DataFrame(
        {
            "job": [f"layer={i}" for i in range(6)],
            "status": "ok",
            "experiment": "overlap",
            "model": "m",
            "sae": "s",
            "relative_depth": depth,
            "rises": depth * 2,
            "rises_null_mean": 0.0,
            "noise": [0.3, 0.1, 0.5, 0.2, 0.4, 0.35],
            "noise_null_mean": 0.0,
        }
    )
    table = layer_gradient(rising).set_index("metric")
    assert table.loc["rises", "spearman_rho"] == pytest.approx(1.0)
    assert table.loc["rises", "p"] == pytest.approx(2 / 720)  # exact: the one ordering, in both directions, of 6! orderings
    assert table.loc["noise", "p"] > 0.2
    assert table.loc["rises", "n_layers"] == 6
    two = layer_gradient(rising.iloc[:2]).set_index("metric")
    assert two.loc["rises", "p"] == pytest.approx(1.0)  # two layers: both orderings reach |rho| = 1
