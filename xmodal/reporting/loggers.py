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
    def start(self, run_name: str, group: str, config: dict[str, Any], output_dir: Path, run_id: str) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], identity: dict[str, Any]) -> None:
        pass

    def log_table(self, name: str, frame: pd.DataFrame) -> None:
        pass

    def log_figure(self, name: str, path: Path) -> None:
        pass

    def finish(self, ok: bool) -> None:
        pass


class WandbLogger(NullLogger):
    def __init__(
        self, project: str = "xmodal", entity: str | None = None, mode: str = "offline", group: str | None = None, tags: list[str] | None = None
    ) -> None:
        self.project, self.entity, self.mode, self.group, self.tags = project, entity, mode, group, list(tags or [])
        self.run: Any = None

    def start(self, run_name: str, group: str, config: dict[str, Any], output_dir: Path, run_id: str) -> None:
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        self.run = wandb.init(
            project=self.project,
            entity=self.entity,
            mode=self.mode,
            group=self.group or group,
            name=run_name,
            id=run_id,  # derived from the job directory: a requeued job continues its run
            resume="allow",
            tags=self.tags,
            config=scrub_secrets(config),
            dir=str(output_dir),
            reinit="finish_previous",
        )
        # Every metric is plotted against the decoder layer (and relative depth) in W&B panels.
        self.run.define_metric("layer")
        self.run.define_metric("relative_depth")
        self.run.define_metric("*", step_metric="layer")

    def log_metrics(self, metrics: dict[str, float], identity: dict[str, Any]) -> None:
        numbers = {k: v for k, v in identity.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self.run.log({**metrics, **numbers})
        self.run.summary.update({k: v for k, v in identity.items() if isinstance(v, str)})

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
