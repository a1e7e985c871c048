"""report.html: one self-contained page per sweep, checked in a real browser (headless Chromium)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tests.conftest import run_cli


def chromium() -> str:
    """The browser; CI sets XMODAL_REQUIRE_BROWSER=1 (and installs Debian's chromium), so there a missing one fails."""
    path = os.environ.get("XMODAL_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if path:
        return path
    if os.environ.get("XMODAL_REQUIRE_BROWSER"):
        pytest.fail("XMODAL_REQUIRE_BROWSER is set but no chromium was found (apt-get install chromium)")
    pytest.skip("no chromium on this machine: apt-get install chromium to run the browser check")


def headless(browser: str, *args: str) -> subprocess.CompletedProcess:
    # --no-sandbox: CI runs as root; the page needs no network, and none is allowed (--host-resolver-rules).
    return subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--host-resolver-rules=MAP * ~NOTFOUND",
            "--virtual-time-budget=5000",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_four_layer_sweep_report_renders_its_table_and_figures_in_chromium(tmp_path):
    browser = chromium()
    result = run_cli("-m", "experiment=alignment", "layer=0,1,2,3", "experiment.n_permutations=50", "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    gradient = pd.read_csv(tmp_path / "sweep" / "layer_gradient.csv")
    assert set(gradient["metric"]) == {"cka", "cka_unbiased", "mutual_knn", "cknna"} and (gradient["n_layers"] == 4).all()
    page = tmp_path / "sweep" / "report.html"
    text = page.read_text()
    assert "http://" not in text and "https://" not in text, "the page must not fetch anything"

    dom = headless(browser, "--dump-dom", page.as_uri()).stdout
    rendered = re.search(r'data-figures-rendered="(\d+)/(\d+)"', dom)
    assert rendered, "the page's load check did not run"
    ok, total = map(int, rendered.groups())
    # four layer curves (cka, cka_unbiased, mutual_knn, cknna) and each job's kernels figure at least
    assert ok == total and total >= 4 + 4, rendered.group(0)
    [table] = re.findall(r'<table[^>]*class="[^"]*summary[^"]*".*?</table>', dom, flags=re.S)
    assert len(re.findall(r"<tr[ >]", table)) == 1 + 4  # header and one row per layer

    shot = tmp_path / "report.png"
    headless(browser, "--window-size=1280,1600", f"--screenshot={shot}", page.as_uri())
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.shape == (1600, 1280) and pixels.std() > 20, "the screenshot is blank"


def test_an_empty_sweep_directory_is_one_line_and_writes_nothing(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "xmodal.report", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "no job folders" in proc.stderr
    assert list(tmp_path.iterdir()) == []
