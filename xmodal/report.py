"""``python -m xmodal.report <sweep_dir>``: summary table, layer curves, report.md and report.html for a sweep."""

from __future__ import annotations

import sys

from xmodal.reporting.__main__ import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
