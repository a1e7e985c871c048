"""The conftest hook that marks process-starting tests slow: it follows helpers and fixtures."""

from __future__ import annotations

from tests import test_cli, test_errors, test_planted_control, test_report_html, test_run_contract
from tests.conftest import starts_a_process


def test_tests_that_start_the_cli_are_found_directly_or_through_helpers():
    assert starts_a_process(test_cli.test_default_run_is_the_organism_with_its_sae)  # run_cli
    assert starts_a_process(test_planted_control.test_overlap_finds_the_planted_alignment_at_its_layer_and_less_far_from_it)  # via cli_results
    assert starts_a_process(test_report_html.test_an_empty_sweep_directory_is_one_line_and_writes_nothing)  # subprocess.run


def test_unit_tests_and_in_process_runs_are_not():
    assert not starts_a_process(test_errors.test_a_crash_while_handling_a_user_error_is_not_a_user_error)
    assert not starts_a_process(test_run_contract.test_bad_input_exits_2_with_one_line_and_no_result)  # run_in_process
