"""Experiment trackers: Weights & Biases, or nothing.

W&B runs in offline mode by default: no account, no network, a run directory under
the job's output that ``wandb sync`` uploads later. The jobs of one sweep share a
group (the sweep directory's name). The API key stays in the environment: configs
are scrubbed of anything that looks like a secret before they are logged.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pandas as pd

_SECRET = re.compile(r"(api_?key|token|secret|password)", re.IGNORECASE)


def scrub_secrets(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: ("<redacted>" if _SECRET.search(str(k)) else scrub_secrets(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub_secrets(v) for v in value]
    return value


class NullLogger:
    def start(self, run_name: str, group: str, config: dict[str, Any], output_dir: Path) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], layer: int) -> None:
        pass

    def log_table(self, name: str, frame: pd.DataFrame) -> None:
        pass

    def log_figure(self, name: str, path: Path) -> None:
        pass

    def finish(self, ok: bool) -> None:
        pass


class WandbLogger(NullLogger):
    def __init__(self, project: str = "xmodal", entity: str | None = None, mode: str = "offline", group: str | None = None, tags: list[str] | None = None) -> None:
        self.project, self.entity, self.mode, self.group, self.tags = project, entity, mode, group, list(tags or [])
        self.run: Any = None

    def start(self, run_name: str, group: str, config: dict[str, Any], output_dir: Path) -> None:
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        self.run = wandb.init(
            project=self.project,
            entity=self.entity,
            mode=self.mode,
            group=self.group or group,
            name=run_name,
            tags=self.tags,
            config=scrub_secrets(config),
            dir=str(output_dir),
            reinit="finish_previous",
        )

    def log_metrics(self, metrics: dict[str, float], layer: int) -> None:
        # Layer goes in as a metric so W&B panels can plot any metric against it directly.
        self.run.log({**metrics, "layer": layer})

    def log_table(self, name: str, frame: pd.DataFrame) -> None:
        import wandb

        self.run.log({f"tables/{name}": wandb.Table(dataframe=frame.head(10_000))})

    def log_figure(self, name: str, path: Path) -> None:
        import wandb

        self.run.log({f"figures/{name}": wandb.Image(str(path))})

    def finish(self, ok: bool) -> None:
        if self.run is not None:
            self.run.finish(exit_code=0 if ok else 1)
            self.run = None
