"""Result files: written atomically, readable by the group like any other file."""

from __future__ import annotations

import os
from pathlib import Path

from xmodal.reporting.results import atomic_write


def test_atomic_write_leaves_one_file_with_the_usual_permissions(tmp_path):
    previous = os.umask(0o022)
    try:
        path = atomic_write(tmp_path / "tables" / "x.csv", lambda p: Path(p).write_text("a,b\n"))
    finally:
        os.umask(previous)
    assert path.read_text() == "a,b\n"
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)  # not mkstemp's private 0o600
    assert [p.name for p in path.parent.iterdir()] == ["x.csv"]  # no temporary left behind
