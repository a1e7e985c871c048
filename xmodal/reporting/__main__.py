"""Summarise a sweep on demand: ``python -m xmodal.report <sweep_dir>`` (or ``xmodal.reporting``).

Writes summary.parquet/.csv, layer-curve figures, report.md and report.html (one
self-contained page) into the sweep directory; safe to run while jobs are still
going (unfinished ones are listed). A directory with no job in it is an error and
gets no files.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from xmodal.reporting.sweep import job_dirs, write_sweep_report

USAGE = "usage: python -m xmodal.report <sweep_dir>"


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    if len(argv) != 1 or argv[0] in {"-h", "--help"}:
        print(USAGE, file=sys.stderr)
        return 2
    sweep_dir = Path(argv[0])
    if not sweep_dir.is_dir():
        print(f"xmodal.report: error: sweep directory {str(sweep_dir)!r} does not exist", file=sys.stderr)
        return 2
    if not job_dirs(sweep_dir):  # before writing anything: an empty directory gets no report
        print(
            f"xmodal.report: error: no job folders (.hydra/overrides.yaml) under {str(sweep_dir)!r}; give the sweep directory of a -m run (hydra.sweep.dir)",
            file=sys.stderr,
        )
        return 2
    summary = write_sweep_report(sweep_dir, sequential=False)  # per-job estimate; the wall time is unknown here
    counts = summary["status"].value_counts().to_dict()
    print(f"{len(summary)} jobs ({', '.join(f'{n} {s}' for s, n in counts.items())}): {sweep_dir / 'report.md'}, {sweep_dir / 'report.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
