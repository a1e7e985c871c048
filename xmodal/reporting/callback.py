"""Hydra callback: at the end of every multirun, summarise the sweep (and fail if a job did)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from xmodal.reporting.sweep import write_sweep_report

log = logging.getLogger("xmodal.sweep")


class SweepReport(Callback):
    def __init__(self) -> None:
        self.started = time.perf_counter()

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.started = time.perf_counter()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        sequential = str(config.hydra.launcher._target_).endswith("BasicLauncher")
        summary = write_sweep_report(sweep_dir, wall_s=time.perf_counter() - self.started, sequential=sequential)
        bad = summary[summary["status"] != "ok"] if len(summary) else summary
        if len(bad):
            for row in bad.itertuples():
                log.error("job %s %s: %s", row.job, row.status, row.error)
            log.error("%d of %d jobs did not finish; see %s", len(bad), len(summary), sweep_dir / "report.md")
            raise SystemExit(1)
        log.info("All %d jobs finished; report: %s", len(summary), sweep_dir / "report.md")
