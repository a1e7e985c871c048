"""The probe study's `metrics` phase with experiment.solver=torch against solver=sklearn, in one process.

Runs the same job twice (same config, same cached codes), once per solver, and prints the
ratio of the `metrics` phase times and the largest difference between the two solvers'
accuracies (probes table and top-N curve). Overrides after the script name go to both runs:

    python benchmarks/probe_solver.py                                   # the default experiment=probe on the organism
    python benchmarks/probe_solver.py model=tiny sae=none dataset=synthetic layer=2   # seconds, a smoke test

Writes benchmarks/results/probe_solver.json (out=... to change).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch


def main(argv: list[str]) -> dict:
    from hydra import compose, initialize_config_dir

    from xmodal.conf_dir import CONF_DIR
    from xmodal.run import JobInfo, run_job

    out = Path("benchmarks/results/probe_solver.json")
    overrides = []
    for arg in argv:
        if arg.startswith("out="):
            out = Path(arg.removeprefix("out="))
        else:
            overrides.append(arg)
    report: dict = {"overrides": overrides, "date": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__, "threads": torch.get_num_threads(), "runs": {}}
    tables = {}
    with tempfile.TemporaryDirectory() as tmp, initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        # a first run fills the activation cache: the attribute probes read their image variants inside the
        # timed metrics phase, and neither timed run should pay for their extraction (the same overrides,
        # so that every readout the timed runs ask for is there)
        warm = compose(config_name="config", overrides=["experiment=probe", *overrides, "experiment.solver=torch"])
        run_job(warm, JobInfo(Path(tmp) / "warm", "warm", "probe_solver", False, []))
        for solver in ("torch", "sklearn"):
            cfg = compose(config_name="config", overrides=["experiment=probe", *overrides, f"experiment.solver={solver}"])
            output_dir = Path(tmp) / solver
            job = JobInfo(output_dir, f"solver={solver}", "probe_solver", False, [f"experiment.solver={solver}"])
            run_job(cfg, job)
            result = json.loads((output_dir / "result.json").read_text())
            report["runs"][solver] = {"timings_s": result["timings_s"], "metrics": result["metrics"]}
            frames = [pd.read_parquet(output_dir / "tables" / "probes.parquet").set_index("probe")["accuracy"]]
            if (output_dir / "tables" / "top_n_curve.parquet").exists():
                curve = pd.read_parquet(output_dir / "tables" / "top_n_curve.parquet")
                frames.append(curve.set_index("top_n")["accuracy"].rename(lambda n: f"top_{n}"))
            tables[solver] = pd.concat(frames)
    metrics_s = {s: report["runs"][s]["timings_s"]["metrics"] for s in ("torch", "sklearn")}
    difference = (tables["torch"] - tables["sklearn"]).abs()
    report |= {
        "metrics_s": metrics_s,
        "speedup": metrics_s["sklearn"] / metrics_s["torch"],
        "accuracy": pd.DataFrame(tables).to_dict(orient="index"),
        "max_accuracy_difference": float(difference.max()),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(pd.DataFrame(tables).assign(difference=difference).to_string())
    print(
        f"metrics phase: torch {metrics_s['torch']:.1f} s, sklearn {metrics_s['sklearn']:.1f} s, "
        f"speedup {report['speedup']:.1f}x; largest accuracy difference {report['max_accuracy_difference']:.4f} -> {out}"
    )
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
