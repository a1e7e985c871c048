"""Sweeps on a real SLURM cluster (tests/slurm_cluster.py): one array per sweep, the faults
a cluster throws at it, and the pre-submission check.

Each fault's sweep ends in a summary.parquet equal to that of the undisturbed sweep.
Skipped without Debian's slurm-wlm and munge; CI installs them and sets
XMODAL_REQUIRE_SLURM=1, so that there a skip fails.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest

from tests.conftest import TINY_CONFIG
from tests.slurm_cluster import PARTITION, SlurmCluster, missing_binaries


def on_slurm(test):
    """A test on the cluster: marked `slurm` (CI installs it) and `slow`."""
    return pytest.mark.slurm(pytest.mark.slow(test))


# What the 2-CPU test node can give; the preset's defaults (a GPU, 8 CPUs, 64 GB) it cannot.
FITS_THE_NODE = [
    f"hydra.launcher.partition={PARTITION}",
    "hydra.launcher.gpus_per_node=null",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.mem_gb=1",
    "hydra.launcher.timeout_min=60",
]
COMPARED = ["layer", "model", "sae", "dataset", "status", "jaccard_topk", "jaccard_topk_p", "pearson", "n_crossmodal_features", "n_crossmodal_features_p"]
OBSERVED = ["layer", "model", "sae", "dataset", "status", "jaccard_topk", "pearson"]  # no permutation count in these
SLOW_PERMUTATIONS = 400_000  # about 65 s of the overlap's metrics on the tiny model: longer than timeout_min=1


def test_the_check_names_each_resource_no_node_can_give_and_passes_one_that_fits():
    from xmodal.cluster import Node, Partition, check_request, parse_gpus, parse_time_min
    from xmodal.errors import ConfigError

    gpu = Partition("gpu", (Node("a", 64, 512_000, 8), Node("b", 32, 256_000, parse_gpus("gpu:a100:4(S:0-1),shard:8"))), parse_time_min("2-00:00:00"))
    assert gpu.max_time_min == 2 * 24 * 60 and gpu.nodes[1].gpus == 4 and parse_time_min("UNLIMITED") is None
    check_request({"gpus_per_node": 8, "cpus_per_task": 64, "mem_gb": 400, "timeout_min": 240, "nodes": 1, "tasks_per_node": 1}, gpu)
    with pytest.raises(ConfigError) as err:
        check_request({"gpus_per_node": 16, "cpus_per_task": 8, "mem_gb": 64, "timeout_min": 4000, "nodes": 1, "tasks_per_node": 1}, gpu)
    assert str(err.value).startswith("cluster=slurm asks partition gpu for gpus_per_node=16, timeout_min=4000, which no node can ever give")
    assert "the largest has 8 GPUs (a), a time limit of 2880 min" in str(err.value) and "hydra.launcher.gpus_per_node=8" in str(err.value)
    with pytest.raises(ConfigError, match="gres=gpu:2"):
        check_request({"gres": "gpu:2", "cpus_per_task": 1, "nodes": 1}, Partition("cpu", (Node("c", 4, 8000, 0),), None))
    with pytest.raises(ConfigError, match=r"gpus_per_node=8, cpus=64, mem_gb=500 on one node"):  # each fits some node, none all three
        check_request(
            {"gpus_per_node": 8, "cpus_per_task": 64, "mem_gb": 500, "nodes": 1},
            Partition("mixed", (Node("a", 64, 256_000, 8), Node("b", 8, 600_000, 0)), None),
        )


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    missing = missing_binaries()
    if missing:
        if os.environ.get("XMODAL_REQUIRE_SLURM"):
            pytest.fail(f"XMODAL_REQUIRE_SLURM is set but {', '.join(missing)} not found (apt-get install slurm-wlm munge)")
        pytest.skip(f"no SLURM here ({', '.join(missing)} not found; apt-get install slurm-wlm munge)")
    slurm = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        slurm.start()
        yield slurm
    finally:
        left = slurm.stop()
        daemons = [p.pid for p in psutil.process_iter(["cmdline"]) if str(slurm.conf) in " ".join(p.info["cmdline"] or [])]
        assert not left and not daemons, f"left running after the SLURM tests: {left} {daemons}"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("slurm_sweeps")


def sweep_args(sweep: Path, cache: Path, *overrides: str, layers: str = "1,2") -> list[str]:
    return [
        sys.executable,
        "-m",
        "xmodal.run",
        TINY_CONFIG,
        "-m",
        "experiment=overlap",
        "model=tiny",
        "sae=none",
        "dataset=synthetic",
        f"layer={layers}",
        "cluster=slurm",
        *FITS_THE_NODE,
        *overrides,
        f"hydra.sweep.dir={sweep}",
        f"paths.activation_cache={cache}",
        "paths.cache_preset_layers=false",
    ]


def start(cluster: SlurmCluster, args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**cluster.env, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    return subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, timeout: float = 400) -> tuple[int, str]:
    output, _ = proc.communicate(timeout=timeout)
    return proc.returncode, output


def wait_for(ready, what: str, cluster: SlurmCluster, timeout: float = 300, proc: subprocess.Popen | None = None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = ready()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the sweep exited ({proc.returncode}) before {what}:\n{proc.stdout.read()[-3000:]}")
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}; queue:\n{cluster.run('squeue', '--states=all', check=False)}\n{cluster.logs_tail()}")


def array_id(sweep: Path) -> str:
    """The sweep's job id, from submitit's folders (<array>_<task>, or <job> for a sweep of one)."""
    tasks = sorted(p.name for p in (sweep / ".submitit").glob("*") if re.fullmatch(r"\d+(_\d+)?", p.name))
    return tasks[0].split("_")[0] if tasks else ""


def task_states(cluster: SlurmCluster, array: str) -> dict[str, str]:
    """squeue's view of the array: task id (e.g. 7_1) -> state, also for finished tasks."""
    out = cluster.run("squeue", "--states=all", "--array", "--noheader", "-o", "%i|%T", "-j", array, check=False)
    return dict(line.split("|") for line in out.split())


def cached_layers(cache: Path) -> set[int]:
    """The layers whose streaming readout the cache holds finished (progress.json says complete)."""
    layers = set()
    for manifest in cache.rglob("readout.json"):
        progress = manifest.with_name("progress.json")
        if progress.exists() and json.loads(progress.read_text())["complete"]:
            layers.add(json.loads(manifest.read_text())["layer"])
    return layers


def result_of(sweep: Path, layer: int) -> Path:
    return next(sweep.glob(f"*layer={layer},*")) / "result.json"


def task_log(sweep: Path, task: str) -> str:
    folder = sweep / ".submitit" / task
    return "".join(p.read_text() for p in sorted(folder.glob("*_log.*")))


def assert_same_summary(sweep: Path, reference: Path, columns: list[str] = COMPARED) -> None:
    got = pd.read_parquet(sweep / "summary.parquet")
    expected = pd.read_parquet(reference / "summary.parquet")
    expected = expected[expected["layer"].isin(got["layer"])]
    assert (got["status"] == "ok").all(), got[["layer", "status", "error"]]
    pd.testing.assert_frame_equal(got[columns].sort_values("layer").reset_index(drop=True), expected[columns].sort_values("layer").reset_index(drop=True))


@pytest.fixture(scope="module")
def reference(cluster, workdir):
    """The undisturbed sweep, three layers as one array, watched through squeue and scontrol while it runs."""
    sweep = workdir / "reference"
    proc = start(cluster, sweep_args(sweep, workdir / "cache_reference", layers="1,2,3"), workdir)
    array = wait_for(lambda: array_id(sweep), "the array's submission", cluster, proc=proc)
    seen = wait_for(lambda: (s := task_states(cluster, array)) and "RUNNING" in s.values() and s, "a running task", cluster, proc=proc)
    names = cluster.run("squeue", "--array", "--noheader", "-o", "%i %j %P", "-j", array, check=False)
    job = cluster.run("scontrol", "show", "job", "-o", array)
    code, output = finish(proc)
    assert code == 0, output[-3000:]
    return {"sweep": sweep, "array": array, "seen": seen, "names": names, "job": job, "output": output}


@on_slurm
def test_a_sweep_is_one_array_whose_tasks_end_in_the_job_completion_log(cluster, reference):
    sweep, array = reference["sweep"], reference["array"]
    assert set(reference["seen"]) <= {f"{array}_{i}" for i in range(3)}
    assert all(line.split()[1:] == ["run", PARTITION] for line in reference["names"].splitlines())
    assert reference["job"].count(f"ArrayJobId={array} ") == 3, reference["job"]  # one record per task
    # the sweep ends on its tasks' results; SLURM may log the last completion a moment later
    wait_for(
        lambda: len([line for line in cluster.jobcomp_lines() if f"ArrayJobId={array} " in line]) == 3, "3 lines in the job completion log", cluster, timeout=60
    )
    completed = [line for line in cluster.jobcomp_lines() if f"ArrayJobId={array} " in line]
    print("job completion log:", *completed, sep="\n")  # shown with pytest -s: the records a reader can compare
    assert len(completed) == 3 and all("JobState=COMPLETED" in line and "Partition=debug" in line for line in completed)
    assert {line.split("ArrayTaskId=")[1].split()[0] for line in completed} == {"0", "1", "2"}
    summary = pd.read_parquet(sweep / "summary.parquet")
    assert sorted(summary["layer"]) == [1, 2, 3] and (summary["status"] == "ok").all()
    assert (sweep / "report.html").exists()
    for task in range(3):  # where the README says the logs go
        out = sweep / ".submitit" / f"{array}_{task}" / f"{array}_{task}_0_log.out"
        assert "Job completed successfully" in out.read_text()
    assert "following the jobs with squeue" in reference["output"] and "Bypassing sacct error" not in reference["output"]


@on_slurm
def test_the_default_preset_fails_before_submission_naming_what_to_change(cluster, workdir):
    env = {**cluster.env, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    base = [sys.executable, "-m", "xmodal.run", TINY_CONFIG, "-m", "experiment=overlap", "layer=1,2", "cluster=slurm"]
    before = set(cluster.run("squeue", "--states=all", "--noheader", "-o", "%i").split())  # job ids
    default = subprocess.run([*base, f"hydra.sweep.dir={workdir / 'default'}"], cwd=workdir, env=env, capture_output=True, text=True, timeout=120)
    assert default.returncode == 2
    assert default.stderr.strip().splitlines() == [
        "Error: hydra.launcher.partition=gpu is not a partition of this cluster (it has: debug, urgent); set hydra.launcher.partition to one of them"
    ]
    on_debug = subprocess.run(
        [*base, f"hydra.launcher.partition={PARTITION}", f"hydra.sweep.dir={workdir / 'default'}"],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert on_debug.returncode == 2
    [line] = on_debug.stderr.strip().splitlines()
    assert "asks partition debug for gpus_per_node=1, cpus_per_task=8, mem_gb=64, timeout_min=240" in line
    assert "the largest has 0 GPUs (" in line and "2 CPUs (" in line and "a time limit of 60 min" in line
    assert "set hydra.launcher.gpus_per_node=null hydra.launcher.cpus_per_task=2" in line
    assert set(cluster.run("squeue", "--states=all", "--noheader", "-o", "%i").split()) == before  # nothing was submitted
    assert not (workdir / "default" / ".submitit").exists()


@on_slurm
def test_a_preempted_task_is_requeued_and_resumes_from_the_activation_cache(cluster, workdir, reference):
    """A job in the `urgent` partition preempts the sweep's running tasks: SLURM sends them the user
    signal, submitit calls the launcher's checkpoint and requeues; the rerun reads its layer from the cache."""
    sweep, cache = workdir / "preempted", workdir / "cache_preempted"
    proc = start(cluster, sweep_args(sweep, cache), workdir)
    array = wait_for(lambda: array_id(sweep), "the array's submission", cluster, proc=proc)
    wait_for(lambda: 1 in cached_layers(cache) and not result_of_exists(sweep, 1), "layer 1's activations in the cache", cluster, proc=proc)
    cluster.run("sbatch", "--partition=urgent", f"--cpus-per-task={cluster.cpus}", f"--output={workdir / 'urgent.out'}", "--wrap=sleep 1")
    code, output = finish(proc)
    assert code == 0, output[-3000:]
    log = task_log(sweep, f"{array}_0")
    assert "this job is preempted" in log and "Calling checkpoint method" in log and "Requeued job" in log, log[-3000:]
    assert log.count("Starting with JobEnvironment") == 2
    assert "Activation cache hit for layer 1" in log
    assert_same_summary(sweep, reference["sweep"])


def result_of_exists(sweep: Path, layer: int) -> bool:
    folders = list(sweep.glob(f"*layer={layer},*"))
    return bool(folders) and (folders[0] / "result.json").exists()


@on_slurm
def test_a_timed_out_task_is_requeued_up_to_max_num_timeout_times(cluster, workdir, reference):
    """The signal SLURM sends `signal_delay_s` before the time limit (USR2), sent by hand on each attempt so that
    the test need not wait out a limit (timeout_min=1: submitit counts any USR2 as a time-out): submitit
    checkpoints through the launcher and requeues the task once (max_num_timeout=1); the second time-out
    ends it, and the same command with a longer timeout_min finishes it."""
    sweep, cache = workdir / "timed_out", workdir / "cache_timed_out"
    timing_out = ["hydra.launcher.max_num_timeout=1", "hydra.launcher.timeout_min=1", "hydra.launcher.signal_delay_s=5"]
    # Many permutations keep each attempt busy past its 1-minute limit, also when its activations are in the
    # cache: the signal always finds the study running, and should submitit's exception raised from the
    # signal handler land in library code that swallows it, SLURM's kill at the limit still ends the attempt.
    busy = f"experiment.n_permutations={SLOW_PERMUTATIONS}"
    args = sweep_args(sweep, cache, busy, *timing_out, layers="1")
    proc = start(cluster, args, workdir)
    task = wait_for(lambda: array_id(sweep), "the job's submission", cluster, proc=proc)  # one job, not an array
    for attempt in (1, 2):
        # the study has started (so submitit's signal handler is set) on this attempt
        wait_for(lambda: task_log(sweep, task).count("overlap | model=tiny") == attempt, f"attempt {attempt} running", cluster, proc=proc)
        cluster.run("scancel", "--signal=USR2", task)
        wait_for(
            lambda: "Requeued job" in task_log(sweep, task) or "timed-out too many times" in task_log(sweep, task), "the signal handled", cluster, timeout=60
        )
    code, output = finish(proc)
    log = task_log(sweep, task)
    assert "this job is timed-out" in log and "Calling checkpoint method" in log and "Requeued job" in log and "(0 remaining timeouts)" in log
    assert "timed-out too many times" in log and log.count("Starting with JobEnvironment") == 2, log[-3000:]
    assert code != 0 and not result_of_exists(sweep, 1), output[-3000:] + log[-3000:]
    again = subprocess.run(
        sweep_args(sweep, cache, busy, layers="1"), cwd=workdir, env={**cluster.env, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=400
    )
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert_same_summary(sweep, reference["sweep"], OBSERVED)  # its p-values rest on more permutations


@on_slurm
def test_after_scancel_the_same_command_runs_only_the_cancelled_task(cluster, workdir, reference):
    sweep, cache = workdir / "cancelled", workdir / "cache_cancelled"
    args = sweep_args(sweep, cache, "hydra.launcher.array_parallelism=1")  # one task at a time: the second still pends
    proc = start(cluster, args, workdir)
    array = wait_for(lambda: array_id(sweep), "the array's submission", cluster, proc=proc)
    cluster.run("scancel", f"{array}_1")
    code, output = finish(proc)
    assert code != 0 and f"Job {array}_1 (task: 0)" in output and "has not produced any output" in output, output[-3000:]
    assert result_of_exists(sweep, 1) and not result_of_exists(sweep, 2)
    first = result_of(sweep, 1).stat().st_mtime_ns
    again = subprocess.run(args, cwd=workdir, env={**cluster.env, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=400)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    rerun = array_id_after(sweep, array)
    assert "Skipping " in task_log(sweep, f"{rerun}_0") and "Skipping " not in task_log(sweep, f"{rerun}_1")
    assert result_of(sweep, 1).stat().st_mtime_ns == first
    assert_same_summary(sweep, reference["sweep"])


def array_id_after(sweep: Path, earlier: str) -> str:
    ids = {p.name.split("_")[0] for p in (sweep / ".submitit").glob("*_*") if re.fullmatch(r"\d+_\d+", p.name)} - {earlier}
    assert len(ids) == 1, ids
    return ids.pop()


@on_slurm
def test_a_sweep_survives_its_node_going_down(cluster, workdir, reference):
    sweep, cache = workdir / "node_down", workdir / "cache_node_down"
    proc = start(cluster, sweep_args(sweep, cache), workdir)
    array = wait_for(lambda: array_id(sweep), "the array's submission", cluster, proc=proc)
    wait_for(lambda: "RUNNING" in task_states(cluster, array).values(), "a running task", cluster, proc=proc)
    cluster.run("scontrol", "update", f"nodename={cluster.node}", "state=down", "reason=test")
    wait_for(lambda: cluster.sinfo_state().startswith("down"), "the node down", cluster, proc=proc, timeout=60)
    time.sleep(3)
    cluster.run("scontrol", "update", f"nodename={cluster.node}", "state=resume")
    code, output = finish(proc)
    assert code == 0, output[-3000:]
    wait_for(lambda: set(task_states(cluster, array).values()) == {"COMPLETED"}, "both tasks COMPLETED in squeue", cluster, timeout=60)
    requeued = (cluster.root / "log" / "slurmctld.log").read_text().count(f"due to failure of node {cluster.node}")
    assert requeued >= 1  # SLURM requeued the running tasks
    for line in cluster.jobcomp_lines():  # no task reads as finished without its result.json
        if f"ArrayJobId={array} " in line and "JobState=COMPLETED" in line:
            assert result_of_exists(sweep, int(line.split("ArrayTaskId=")[1].split()[0]) + 1)
    assert_same_summary(sweep, reference["sweep"])


@on_slurm
def test_the_store_runs_as_an_array_and_a_requeued_task_resumes_after_its_last_shard(cluster, workdir):
    """`xmodal.sae_train -m cluster=slurm`, one layer set per task; `scontrol requeue` of task 0 while it
    fills its store. Its rerun resumes after the last entered shard and ends with the same store as task 1's."""
    sweep = workdir / "store_sweep"
    args = [
        sys.executable,
        "-m",
        "xmodal.sae_train",
        "-m",
        "cluster=slurm",
        *FITS_THE_NODE,
        "model=tiny",
        "dataset=synthetic",
        # About 200 shards, some 25 s of filling: the requeue, and the 5 s of SLURM's KillWait before the kill
        # (submitit ignores the SIGTERM), land well inside the fill.
        "dataset.images_per_concept=64",
        "layers=[1],[2]",
        "store.texts=concepts",
        "store.shard_tokens=60",
        "positions.batch_size=1",
        "store.eval_fraction=0.3",
        "store.dir=${hydra:sweep.dir}/${hydra:job.num}/store",
        "out_dir=${hydra:sweep.dir}/${hydra:job.num}/sae",
        "training.d_sae=64",
        "training.k=8",
        "training.training_tokens=5000",
        "training.batch_size=128",
        f"hydra.sweep.dir={sweep}",
    ]
    proc = start(cluster, args, workdir)
    array = wait_for(lambda: array_id(sweep), "the array's submission", cluster, proc=proc)
    progress = sweep / "0" / "store" / "progress.json"
    wait_for(lambda: progress.exists() and len(json.loads(progress.read_text())["shards"]) >= 2, "two shards in task 0's store", cluster, proc=proc)
    cluster.run("scontrol", "requeue", f"{array}_0")
    code, output = finish(proc)
    assert code == 0, output[-3000:]
    log = task_log(sweep, f"{array}_0")
    assert log.count("Starting with JobEnvironment") == 2 and "Resuming activation store" in log, log[-3000:]
    resumed_after = int(log.split("Resuming activation store")[1].split(" after ")[1].split()[0])
    assert resumed_after >= 2  # batches already in entered shards were not redone
    quality = {task: pd.read_csv(sweep / str(task) / "sae" / "quality.csv") for task in (0, 1)}
    assert all((sweep / str(task) / "sae" / "done.json").exists() for task in (0, 1))
    assert quality[0]["layer"].unique().tolist() == [1] and quality[1]["layer"].unique().tolist() == [2]
    for column in ("store_rows", "store_shards", "n_tokens"):  # the resumed store holds what the undisturbed one does
        assert quality[0][column].tolist() == quality[1][column].tolist(), column
