"""Sharded, resumable outputs on disk: the one write protocol of the activation store and the study readouts.

A sharded output is a folder with a manifest (what the rows are; a folder is only ever
extended by a run that asks for exactly the same thing), shards, and ``progress.json``.
A shard is written to a temporary name, renamed, and only then entered in
``progress.json``, so a killed or disk-full run leaves no half shard that a reader would
take as whole; a rerun resumes after the last entered shard. ``complete`` is set last.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

PROGRESS = "progress.json"


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=list))
    os.replace(tmp, path)


def save_shard(directory: Path, name: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str], on_error: Callable[[str], Exception]) -> int:
    """Write `tensors` as `directory/name` through a temporary name; returns its size in bytes.

    An OSError (a full disk, a vanished folder) removes the temporary file and raises
    `on_error(message)`, whose text should say where a rerun resumes.
    """
    tmp = directory / f"{name}.tmp"
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, directory / name)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise on_error(f"writing {directory / name} failed ({err})") from err
    return (directory / name).stat().st_size


def remove_stale_temporaries(directory: Path) -> None:
    """Shards whose write was cut short: never entered in progress.json, so never read."""
    for stale in directory.glob("*.tmp"):
        stale.unlink()


def check_shard_sizes(directory: Path, shards: list[dict], on_error: Callable[[str], Exception]) -> None:
    """Every entered shard must still be the size it was written at (a changed file is not ours)."""
    for shard in shards:
        path = directory / shard["file"]
        size = path.stat().st_size if path.exists() else None
        if size != shard["bytes"]:
            raise on_error(f"{path} is {'missing' if size is None else f'{size} bytes'}, but it was written with {shard['bytes']}")
