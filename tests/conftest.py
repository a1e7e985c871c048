"""Shared fixtures: the tiny random Gemma 3 VLM and the synthetic concept dataset."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("WANDB_MODE", "disabled")  # tests never talk to W&B unless they ask
# pytest-xdist runs a worker per core (pyproject's addopts): each worker, and every process its tests
# start, gets its share of the cores, so that torch's and BLAS's thread pools do not oversubscribe them.
if os.environ.get("PYTEST_XDIST_WORKER"):
    _share = max(1, len(os.sched_getaffinity(0)) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    for _variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(_variable, str(_share))
    if "torch" in sys.modules:  # imported by a plugin before this file: its pool is already sized
        sys.modules["torch"].set_num_threads(_share)
# Hashes of local weights: in the session's own file, not the user's cache.
os.environ.setdefault("XMODAL_HASH_CACHE", str(Path(tempfile.mkdtemp(prefix="xmodal-hashes-")) / "file_hashes.json"))


@pytest.fixture(scope="session")
def tiny():
    from xmodal.models.tiny import tiny_gemma3

    adapter = tiny_gemma3(device="cpu")
    adapter.model  # load once for the session
    return adapter


@pytest.fixture(scope="session")
def synthetic():
    from xmodal.data.synthetic import synthetic_shapes

    return synthetic_shapes(images_per_concept=2, seed=0)


@pytest.fixture
def positions():
    from xmodal.config import PositionsConfig

    return PositionsConfig(batch_size=4)


TINY_CONFIG = "--config-name=config_tiny"  # the tiny random model: fast mechanics, see run_cli


def run_cli(*overrides: str, cwd: Path, env_extra: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `python -m xmodal.run` as a user would, in `cwd` (its outputs/ lands there).

    The CLI tests run on the tiny random model for speed (conf/config_tiny.yaml); the
    shipped default is the organism, which tests select with explicit overrides.
    """
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "xmodal.run", TINY_CONFIG, *overrides],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_in_process(*overrides: str, run_dir: Path, config_name: str = "config_tiny") -> int:
    """Run the xmodal command in this process, as `python -m xmodal.run` would: the exit code.

    Faster than run_cli (no interpreter start, imports and model builds shared with other tests) and
    the same contract: Hydra composes, run.main handles errors, result.json or failure.json lands in
    `run_dir` (hydra.run.dir; for -m, hydra.sweep.dir).
    """
    from xmodal.run import main

    where = f"hydra.sweep.dir={run_dir}" if "-m" in overrides else f"hydra.run.dir={run_dir}"
    argv = ["xmodal.run", f"--config-name={config_name}", *overrides, where]
    saved = sys.argv
    sys.argv = argv
    try:
        main()
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 1
    finally:
        sys.argv = saved
    return 0


# ---------------------------------------------------------------- slow tests ----
# A test is slow when it starts a process: the CLI (run_cli, or `python -m ...` through subprocess),
# a browser, a launcher. It is marked so here, found through the code it runs: the test function,
# the test-suite helpers it calls, and its fixtures. Tests that run the command in-process
# (run_in_process) stay in the fast suite.
STARTS_A_PROCESS = {"run_cli", "subprocess", "Popen"}


def _code_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _code_names(const)
    return names


def starts_a_process(func, seen: set | None = None) -> bool:
    """Whether `func`, or a function of the test suite it names, starts a subprocess."""
    seen = set() if seen is None else seen
    func = inspect.unwrap(func)
    code = getattr(func, "__code__", None)
    if code is None or code in seen:
        return False
    seen.add(code)
    names = _code_names(code)
    if names & STARTS_A_PROCESS:
        return True
    suite = Path(__file__).parent
    for name in names:
        helper = func.__globals__.get(name)
        helper = getattr(helper, "__call__", None) if inspect.isclass(helper) else helper
        module = inspect.getmodule(helper) if callable(helper) else None
        if module is not None and Path(getattr(module, "__file__", "") or "/").parent == suite and starts_a_process(helper, seen):
            return True
    return False


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        fixtures = [d.func for defs in getattr(item, "_fixtureinfo").name2fixturedefs.values() for d in defs]
        if any(starts_a_process(f) for f in [item.function, *fixtures]):
            item.add_marker(pytest.mark.slow)
