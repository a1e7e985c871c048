"""``cluster=slurm`` before anything is submitted: the request against the partition's nodes.

A request that no node of the partition can ever meet (a GPU on a CPU partition, more CPUs
or memory than the largest node, a time over the partition's limit) would pend forever
(``Reason=PartitionConfig``, or sbatch refusing the GRES). `SlurmPreflight`, a Hydra
callback that conf/cluster/slurm.yaml adds, fails such a sweep before ``sbatch`` with one
line: what is asked and what the largest node has.

It also lets the launcher follow the array on a cluster without accounting (no slurmdbd):
submitit asks ``sacct`` for job states, which fails there at every poll, so a cancelled or
failed task that wrote no result would be waited for forever. There the states come from
``squeue --states=all``, which lists finished jobs for the cluster's ``MinJobAge``.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from submitit.slurm import slurm as submitit_slurm

from xmodal.errors import ConfigError, XmodalError

log = logging.getLogger("xmodal.cluster")


@dataclass(frozen=True)
class Node:
    name: str
    cpus: int
    memory_mb: int
    gpus: int


@dataclass(frozen=True)
class Partition:
    name: str
    nodes: tuple[Node, ...]
    max_time_min: float | None  # None: UNLIMITED


def _slurm(*args: str) -> str:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise ConfigError(f"`{' '.join(args)}` failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def _fields(line: str) -> dict[str, str]:
    """One record of `scontrol show ... -o`: Key=Value pairs separated by spaces."""
    return dict(re.findall(r"(\w+)=(\S*)", line))


def parse_time_min(text: str) -> float | None:
    """SLURM's time format ([days-]hours:minutes:seconds, or minutes) in minutes; None for UNLIMITED."""
    if text.upper() in ("UNLIMITED", "INFINITE", "NONE", ""):
        return None
    days, _, clock = text.rpartition("-")
    parts = [float(p) for p in clock.split(":")]
    if len(parts) == 1:
        minutes = parts[0]
    else:
        while len(parts) < 3:
            parts.insert(0, 0.0)
        minutes = parts[0] * 60 + parts[1] + parts[2] / 60
    return minutes + (float(days) * 24 * 60 if days else 0.0)


def parse_gpus(gres: str) -> int:
    """GPUs in a node's Gres field, e.g. ``gpu:a100:4(S:0-1),shard:8`` -> 4; ``(null)`` -> 0."""
    total = 0
    for item in re.sub(r"\(.*?\)", "", gres).split(","):
        parts = item.split(":")
        if parts[0] == "gpu" and len(parts) >= 2 and parts[-1].isdigit():
            total += int(parts[-1])
    return total


def read_partition(name: str) -> Partition:
    """The partition's nodes and time limit, from ``scontrol show partition/node``."""
    listed = [_fields(line) for line in _slurm("scontrol", "show", "partition", "-o").splitlines() if line.strip()]
    known = [p.get("PartitionName", "?") for p in listed]
    found = [p for p in listed if p.get("PartitionName") == name]
    if not found:
        raise ConfigError(
            f"hydra.launcher.partition={name} is not a partition of this cluster (it has: {', '.join(known) or 'none'}); "
            f"set hydra.launcher.partition to one of them"
        )
    partition = found[0]
    node_list = partition.get("Nodes", "")
    nodes = []
    if node_list and node_list != "(null)":
        for line in _slurm("scontrol", "show", "node", "-o", node_list).splitlines():
            f = _fields(line)
            if "NodeName" in f:
                nodes.append(Node(f["NodeName"], int(f.get("CPUTot", 0)), int(f.get("RealMemory", 0)), parse_gpus(f.get("Gres", ""))))
    return Partition(name, tuple(nodes), parse_time_min(partition.get("MaxTime", "UNLIMITED")))


def _gib(mb: float) -> str:
    return f"{mb / 1024:.3g} GB"


def check_request(launcher: dict[str, Any], partition: Partition) -> None:
    """Raise ConfigError naming each resource that no node of `partition` can give."""
    gpus = max(launcher.get("gpus_per_node") or 0, (launcher.get("gpus_per_task") or 0) * (launcher.get("tasks_per_node") or 1))
    gres = launcher.get("gres")
    if gres:
        gpus = max(gpus, parse_gpus(str(gres).removeprefix("gres:")))
    cpus = (launcher.get("cpus_per_task") or 1) * (launcher.get("tasks_per_node") or 1)
    memory_mb = (launcher.get("mem_gb") or 0) * 1024
    nodes_needed = launcher.get("nodes") or 1
    if not partition.nodes:
        raise ConfigError(f"partition {partition.name} has no nodes; set hydra.launcher.partition to another one")

    def fits(node: Node) -> bool:
        return node.gpus >= gpus and node.cpus >= cpus and node.memory_mb >= memory_mb

    most_gpus = max(partition.nodes, key=lambda n: n.gpus)
    most_cpus = max(partition.nodes, key=lambda n: n.cpus)
    most_memory = max(partition.nodes, key=lambda n: n.memory_mb)
    unmet = []  # (what is asked, what the largest node has)
    if gpus > most_gpus.gpus:
        asked = f"gres={gres}" if gres and not launcher.get("gpus_per_node") else f"gpus_per_node={gpus}"
        unmet.append((asked, f"{most_gpus.gpus} GPUs ({most_gpus.name})", "gpus_per_node=null" if most_gpus.gpus == 0 else f"gpus_per_node={most_gpus.gpus}"))
    if cpus > most_cpus.cpus:
        unmet.append(
            (
                f"cpus_per_task={launcher.get('cpus_per_task')}"
                + (f" x tasks_per_node={launcher.get('tasks_per_node')}" if (launcher.get("tasks_per_node") or 1) > 1 else ""),
                f"{most_cpus.cpus} CPUs ({most_cpus.name})",
                f"cpus_per_task={most_cpus.cpus}",
            )
        )
    if memory_mb > most_memory.memory_mb:
        unmet.append(
            (f"mem_gb={launcher.get('mem_gb')}", f"{_gib(most_memory.memory_mb)} ({most_memory.name})", f"mem_gb={int(most_memory.memory_mb // 1024) or 1}")
        )
    timeout_min = launcher.get("timeout_min")
    if partition.max_time_min is not None and timeout_min and timeout_min > partition.max_time_min:
        unmet.append((f"timeout_min={timeout_min}", f"a time limit of {partition.max_time_min:g} min", f"timeout_min={int(partition.max_time_min)}"))
    if nodes_needed > len(partition.nodes):
        unmet.append((f"nodes={nodes_needed}", f"{len(partition.nodes)} nodes", f"nodes={len(partition.nodes)}"))
    if not unmet and nodes_needed > sum(fits(n) for n in partition.nodes):
        largest = max(partition.nodes, key=lambda n: (n.gpus, n.cpus, n.memory_mb))
        unmet.append(
            (
                f"gpus_per_node={gpus}, cpus={cpus}, mem_gb={launcher.get('mem_gb')} on one node",
                f"{largest.gpus} GPUs, {largest.cpus} CPUs, {_gib(largest.memory_mb)} ({largest.name})",
                "a smaller request",
            )
        )
    if unmet:
        raise ConfigError(
            f"cluster=slurm asks partition {partition.name} for {', '.join(a for a, _, _ in unmet)}, which no node can ever give "
            f"(the largest has {', '.join(h for _, h, _ in unmet)}); set {' '.join('hydra.launcher.' + fix for _, _, fix in unmet)} "
            f"or choose another partition"
        )


def check_slurm_request(launcher: dict[str, Any]) -> None:
    """The whole pre-submission check: SLURM's commands present, the partition known, the request possible."""
    for command in ("sbatch", "scontrol"):
        if shutil.which(command) is None:
            raise ConfigError(
                f"cluster=slurm needs SLURM's `{command}` on PATH, and it is not there; run from a SLURM login node, or use cluster=submitit_local"
            )
    name = launcher.get("partition")
    if not name:
        defaults = [_fields(line) for line in _slurm("scontrol", "show", "partition", "-o").splitlines() if "Default=YES" in line]
        if not defaults:
            raise ConfigError("hydra.launcher.partition is not set and the cluster has no default partition; set hydra.launcher.partition")
        name = defaults[0]["PartitionName"]
    check_request(launcher, read_partition(name))


def accounting_enabled() -> bool:
    config = _slurm("scontrol", "show", "config")
    match = re.search(r"^AccountingStorageType\s*=\s*(\S+)", config, re.MULTILINE)
    return match is not None and match.group(1) != "accounting_storage/none"


class SqueueInfoWatcher(submitit_slurm.SlurmInfoWatcher):
    """submitit's job states from ``squeue --states=all`` (in sacct's format) instead of ``sacct``."""

    def _make_command(self) -> list[str] | None:
        to_check = sorted({x.split("_")[0] for x in self._registered - self._finished})
        if not to_check:
            return None
        return ["squeue", "--states=all", "--noheader", "-o", "%i|%T|%N", "-j", ",".join(to_check)]

    def read_info(self, string: bytes | str) -> dict[str, dict[str, str]]:
        text = string.decode() if isinstance(string, bytes) else string
        info = super().read_info("JobID|State|NodeList\n" + text)
        # A task cancelled while its array was one pending record leaves no record of its own: squeue
        # (which answered for its array) no longer lists it, so it will never run; without this it would be waited for forever.
        listed_arrays = {job_id.split("_")[0] for job_id in info}
        for job_id in self._registered - self._finished:
            if job_id not in info and job_id.split("_")[0] in listed_arrays:
                info[job_id] = {"JobID": job_id, "State": "NOT_IN_SQUEUE", "NodeList": ""}
        return info


def follow_jobs_with_squeue() -> None:
    """For clusters without slurmdbd: every SLURM job of this process is followed through squeue."""
    if not isinstance(submitit_slurm.SlurmJob.watcher, SqueueInfoWatcher):
        submitit_slurm.SlurmJob.watcher = SqueueInfoWatcher(delay_s=60)


class SlurmPreflight(Callback):
    """Hydra callback (conf/cluster/slurm.yaml): runs in the submitting process before the sweep is launched."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        launcher = OmegaConf.to_container(config.hydra.launcher, resolve=True)
        try:
            check_slurm_request(launcher)
        except XmodalError as err:
            sys.stderr.write(f"Error: {err}\n")
            raise SystemExit(2) from None
        if not accounting_enabled():
            log.info("SLURM has no accounting here (AccountingStorageType=accounting_storage/none): following the jobs with squeue")
            follow_jobs_with_squeue()
