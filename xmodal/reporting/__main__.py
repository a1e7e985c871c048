"""Summarise a sweep on demand: ``python -m xmodal.reporting <sweep_dir>``.

Writes summary.parquet/.csv, layer-curve figures and report.md into the sweep
directory; safe to run while jobs are still going (unfinished ones are listed).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from xmodal.reporting.sweep import write_sweep_report

USAGE = "usage: python -m xmodal.reporting <sweep_dir>"


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    if len(argv) != 1 or argv[0] in {"-h", "--help"}:
        print(USAGE, file=sys.stderr)
        return 2
    sweep_dir = Path(argv[0])
    if not sweep_dir.is_dir():
        print(f"xmodal.reporting: error: sweep directory {str(sweep_dir)!r} does not exist", file=sys.stderr)
        return 2
    summary = write_sweep_report(sweep_dir, sequential=False)  # per-job estimate; the wall time is unknown here
    if summary.empty:
        print(f"xmodal.reporting: error: no job folders (.hydra/overrides.yaml) under {str(sweep_dir)!r}", file=sys.stderr)
        return 2
    counts = summary["status"].value_counts().to_dict()
    print(f"{len(summary)} jobs ({', '.join(f'{n} {s}' for s, n in counts.items())}): {sweep_dir / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
