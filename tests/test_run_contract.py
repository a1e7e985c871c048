"""The run contract, in-process (fast): result files, one-line errors, exit codes, reruns."""

from __future__ import annotations

import json

import pytest

import xmodal
from tests.conftest import run_in_process
from tests.test_sae import save_jumprelu_sae
from xmodal.errors import ConfigError


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    return f"paths.activation_cache={tmp_path_factory.mktemp('contract') / 'cache'}"


def test_a_crash_while_handling_a_user_error_prints_its_traceback_and_exits_1(tmp_path, cache, monkeypatch, capsys):
    import xmodal.run

    def buggy_build(cfg):
        try:
            raise ConfigError("a user error the code handles")
        except ConfigError:
            return {}["not_there"]  # a bug inside the handler

    monkeypatch.setattr(xmodal.run, "build_experiment", buggy_build)
    code = run_in_process(cache, run_dir=tmp_path)
    output = "".join(capsys.readouterr())
    assert code == 1
    assert "Traceback" in output and "KeyError" in output, output[-2000:]
    assert json.loads((tmp_path / "failure.json").read_text())["error_type"] == "KeyError"
    assert not (tmp_path / "result.json").exists()


def test_bad_input_exits_2_with_one_line_and_no_result(tmp_path, cache, capsys):
    code = run_in_process("layer=99", cache, run_dir=tmp_path)
    output = "".join(capsys.readouterr())
    assert code == 2
    assert sum("layer=99 is out of range for model 'tiny'" in line for line in output.splitlines()) == 1
    assert "Traceback" not in output
    assert not (tmp_path / "result.json").exists() and (tmp_path / "failure.json").exists()


def test_a_preset_on_a_dual_encoder_resolves_through_its_presets(tmp_path, cache, capsys):
    models = f"paths.model_cache={tmp_path / 'models'}"
    code = run_in_process("model=clip_tiny", "experiment=probe", "layer=preset:1", cache, models, run_dir=tmp_path / "preset1")
    assert code == 2, "clip_tiny lists one preset; preset:1 must not quietly become layer 0"
    assert "layer=preset:1 is out of range: model 'clip_tiny' has 1 presets [0]" in "".join(capsys.readouterr())


def test_a_rerun_leaves_only_its_own_outputs_and_a_failing_rerun_no_result(tmp_path, cache):
    assert run_in_process("experiment.n_permutations=20", cache, run_dir=tmp_path) == 0
    for stale in ("figures/feature_stale.png", "tables/stale.parquet", "images/stale.png"):
        (tmp_path / stale).parent.mkdir(exist_ok=True)
        (tmp_path / stale).write_bytes(b"from an earlier run")
    assert run_in_process("experiment.n_permutations=30", cache, run_dir=tmp_path) == 0  # another config: runs again
    result = json.loads((tmp_path / "result.json").read_text())
    written = {str(p.relative_to(tmp_path)) for d in ("tables", "figures", "images") for p in (tmp_path / d).rglob("*") if p.is_file()}
    listed = {*result["tables"], *result["figures"], *result["images"]}
    assert written == listed | {t.replace(".parquet", ".csv") for t in result["tables"]}
    assert run_in_process("experiment.n_permutations=0", cache, run_dir=tmp_path) == 2  # fails validation, before any writer
    assert not (tmp_path / "result.json").exists() and (tmp_path / "failure.json").exists()


def test_a_local_sae_retrained_at_the_same_path_is_run_again_and_the_result_names_the_code(tmp_path, cache, capsys):
    save_jumprelu_sae(tmp_path / "sae", d_in=64, layer=1)
    job = ["experiment.n_permutations=20", "sae=local", f"sae.path={tmp_path / 'sae'}", cache]
    assert run_in_process(*job, run_dir=tmp_path / "run") == 0
    first = json.loads((tmp_path / "run" / "result.json").read_text())
    assert first["xmodal_version"] == xmodal.__version__ and "git_commit" in first
    assert first["sae_identity"]["weights"] and first["weights_hash"]

    assert run_in_process(*job, run_dir=tmp_path / "run") == 0
    assert "Skipping" in "".join(capsys.readouterr()), "the same config on the same weights resumes"
    save_jumprelu_sae(tmp_path / "sae", d_in=64, layer=1, seed=1)  # retrained: same path, other weights
    assert run_in_process(*job, run_dir=tmp_path / "run") == 0
    assert "Skipping" not in "".join(capsys.readouterr()), "a retrained SAE at the same path must not reuse the old result"
    second = json.loads((tmp_path / "run" / "result.json").read_text())
    assert second["sae_identity"]["weights"] != first["sae_identity"]["weights"]
    assert second["sae_identity"]["path"] == first["sae_identity"]["path"]


def test_a_sweep_with_a_failed_job_reports_it_exits_1_and_a_rerun_redoes_only_that_job(tmp_path, cache, capsys):
    import pandas as pd

    sweep = ["-m", "layer=1,99", "experiment.n_permutations=20", cache]
    assert run_in_process(*sweep, run_dir=tmp_path) == 1, "a sweep with a failed job exits non-zero"
    summary = pd.read_parquet(tmp_path / "summary.parquet").set_index("layer_spec")
    assert summary.loc["1", "status"] == "ok" and summary.loc["99", "status"] == "failed"
    assert "layer=99 is out of range" in summary.loc["99", "error"]
    assert len(list(tmp_path.rglob("result.json"))) == 1
    capsys.readouterr()
    assert run_in_process(*sweep, run_dir=tmp_path) == 1
    assert "".join(capsys.readouterr()).count("Skipping ") == 1, "the finished job resumes; only the failed one runs again"
