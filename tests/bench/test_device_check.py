"""`python -m bench.device_check`: says there is no accelerator and exits 0 on a CPU machine; its
checks run (on the tiny model, on the CPU) so the GPU run meets no untried code."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_without_an_accelerator_it_says_so_and_exits_0():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # a GPU machine behaves as a CPU one
    result = subprocess.run([sys.executable, "-m", "bench.device_check"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "no CUDA accelerator on this machine" in result.stdout


@pytest.mark.usefixtures("ray_local")
def test_each_check_runs_on_the_tiny_model():
    from bench.device_check import coordinator_check, exactness_check, routing_check, train_check
    from routing.base import load_base

    base = load_base("tiny-llama")
    rows = train_check(base, steps=2, gate_steps=1)
    rows += routing_check(base, [2, 4], naive=4, rounds=1, shape=(2, 8))
    exact = exactness_check(lambda dtype: load_base("tiny-llama", dtype=dtype))
    assert [row[2].split()[-1] for row in exact if row[2].startswith(("<", "<="))] == ["ok"] * 2
    rows += coordinator_check(experts=2)
    checks = [row[0] for row in rows]
    assert checks[0].startswith("expert steps/s") and "routed / base, 4 experts" in checks
    assert "naive loop / routed, 4 experts" in checks
    assert rows[-1][0] == "assemble 2 experts (Ray)" and rows[-1][2].startswith("version ")
    assert all(float(row[1].split()[0]) > 0 for row in rows)


def test_the_profile_names_the_ops_of_a_base_and_a_routed_forward(capsys):
    from bench.device_check import profile_check
    from routing.base import load_base

    profile_check(load_base("tiny-llama"), experts=2, shape=(2, 8))
    printed = capsys.readouterr().out
    assert "base: 0 kernel launches" in printed  # none on the CPU
    assert "routed_2: 0 kernel launches" in printed and "aten::mm" in printed
