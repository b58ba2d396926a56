"""Crashes, scaled down: submissions while the coordinator is SIGKILLed and restarted; every
acknowledged expert survives and verifies, nothing partial is left, and (slow variant, with
assembly on Ray and tracking) MLflow agrees with the store after replay."""

from __future__ import annotations

import pytest

from tests.harness.chaos import run_chaos


def test_acknowledged_experts_survive_sigkills_with_nothing_partial(tmp_path, tiny_spec):
    result = run_chaos(tmp_path, tiny_spec, submissions=6, kills=2, seed=3,
                       kill_window_s=(0.3, 1.5), assembly=False)
    assert result.problems == [], result.problems
    assert result.kills == 2
    assert len(result.acknowledged) == 6 == result.audit["indexed"]


@pytest.mark.slow
def test_sigkills_during_assembly_and_tracking_leave_mlflow_agreeing(tmp_path, tiny_spec):
    result = run_chaos(tmp_path, tiny_spec, submissions=6, kills=2, seed=3,
                       kill_window_s=(0.5, 2.5))
    assert result.problems == [], result.problems
    assert result.kills == 2
    assert len(result.acknowledged) == 6 == result.audit["indexed"]
    assert result.audit["mlflow_runs"] == 6 and result.audit["model_versions"] >= 1
