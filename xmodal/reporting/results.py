"""A job's output directory: tables, figures and, written last, result.json.

A job starts by clearing what an earlier run wrote there (result.json first), so a
finished job's folder holds only what that run wrote, and the figures it lists are
the figures there are.

Every file is written to a temporary name and renamed, so readers never see a
half-written file. ``result.json`` exists only for a job that finished; a job
that failed or was killed leaves none, and a rerun treats the directory as unfinished.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import pandas as pd

RESULT_FILE = "result.json"
FAILURE_FILE = "failure.json"  # a failed job's error line; never mistaken for a result
OUTPUT_DIRS = ("tables", "figures", "images", "exports", "weights", "msae")  # what a job writes (msae: mds trains one there)


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def atomic_write(path: Path, write: Callable[[str], None]) -> Path:
    """Call write(tmp_path) and rename the result onto `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes files private; results are for the whole group
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _json_number(value: Any) -> float | int | None:
    value = float(value) if not isinstance(value, (int, bool)) else value
    return None if isinstance(value, float) and not math.isfinite(value) else value


class ResultWriter:
    def __init__(self, output_dir: str | Path) -> None:
        self.output_dir = Path(output_dir)
        self.tables: list[str] = []
        self.figures: list[str] = []
        self.images: list[str] = []
        self.exports: list[str] = []
        self.weights: list[str] = []
        # An earlier run's outputs in this directory must not outlive this one: result.json goes
        # first, so that no moment shows a result beside a half-cleared folder.
        (self.output_dir / RESULT_FILE).unlink(missing_ok=True)
        (self.output_dir / FAILURE_FILE).unlink(missing_ok=True)
        for name in OUTPUT_DIRS:
            if (self.output_dir / name).is_dir():
                shutil.rmtree(self.output_dir / name)

    def table(self, name: str, frame: pd.DataFrame) -> Path:
        """tables/<name>.parquet, with a .csv twin for a quick look."""
        parquet = atomic_write(self.output_dir / "tables" / f"{name}.parquet", lambda p: frame.to_parquet(p, index=False))
        atomic_write(self.output_dir / "tables" / f"{name}.csv", lambda p: frame.to_csv(p, index=False))
        self.tables.append(str(parquet.relative_to(self.output_dir)))
        return parquet

    def figure(self, name: str, fig: Any) -> Path:
        import matplotlib.pyplot as plt

        path = atomic_write(self.output_dir / "figures" / f"{name}.png", lambda p: fig.savefig(p, dpi=130, bbox_inches="tight", format="png"))
        plt.close(fig)
        self.figures.append(str(path.relative_to(self.output_dir)))
        return path

    def image(self, name: str, image: Any) -> Path:
        """images/<name>.png from a PIL image (e.g. a synthesised concept image)."""
        path = atomic_write(self.output_dir / "images" / f"{name}.png", lambda p: image.save(p, format="png"))
        self.images.append(str(path.relative_to(self.output_dir)))
        return path

    def export(self, name: str, payload: Any) -> Path:
        """exports/<name>.json: data in another tool's format (e.g. a Neuronpedia feature batch)."""
        text = json.dumps(payload, indent=1, allow_nan=False)
        path = atomic_write(self.output_dir / "exports" / f"{name}.json", lambda p: Path(p).write_text(text))
        self.exports.append(str(path.relative_to(self.output_dir)))
        return path

    def tensors(self, name: str, tensors: dict[str, Any], metadata: dict[str, str] | None = None) -> Path:
        """weights/<name>.safetensors: arrays a result was computed with (e.g. a probe's weights)."""
        from safetensors.numpy import save_file

        path = atomic_write(self.output_dir / "weights" / f"{name}.safetensors", lambda p: save_file(tensors, p, metadata=metadata))
        self.weights.append(str(path.relative_to(self.output_dir)))
        return path

    def finish(self, experiment: str, metrics: dict[str, Any], timings_s: dict[str, float], extra: dict[str, Any] | None = None) -> Path:
        """Write result.json last: its presence is what marks the job finished."""
        payload = {
            "status": "ok",
            "experiment": experiment,
            "metrics": {k: _json_number(v) for k, v in metrics.items()},
            "tables": self.tables,
            "figures": self.figures,
            "images": self.images,
            **({"exports": self.exports} if self.exports else {}),
            **({"weights": self.weights} if self.weights else {}),
            "timings_s": {k: round(float(v), 4) for k, v in timings_s.items()},
            **(extra or {}),
        }
        text = json.dumps(payload, indent=2, allow_nan=False)
        return atomic_write(self.output_dir / RESULT_FILE, lambda p: Path(p).write_text(text))


def read_result(output_dir: str | Path) -> dict[str, Any] | None:
    """The finished result in `output_dir`, or None."""
    path = Path(output_dir) / RESULT_FILE
    if not path.exists():
        return None
    payload = json.loads(path.read_text())
    return payload if payload.get("status") == "ok" else None


def write_failure(output_dir: str | Path, error: BaseException, config_hash: str | None) -> Path:
    """failure.json; an earlier run's result.json goes, also when this run failed before its ResultWriter."""
    (Path(output_dir) / RESULT_FILE).unlink(missing_ok=True)
    line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    payload = {"status": "failed", "error_type": type(error).__name__, "error": line, "config_hash": config_hash}
    return atomic_write(Path(output_dir) / FAILURE_FILE, lambda p: Path(p).write_text(json.dumps(payload, indent=2)))
