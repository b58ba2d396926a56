"""`python -m bench.scale` end to end on the tiny model (slow: a real serve, two arrivals, the
consumer processes), and its storage count, which counts a hard-linked file once."""

from __future__ import annotations

import json
import os

import pytest

from bench.scale import main, parse_args, storage


def test_storage_counts_a_hard_linked_file_once(tmp_path):
    store = tmp_path / "store"
    (store / "experts" / "a").mkdir(parents=True)
    (store / "experts" / "a" / "adapter.safetensors").write_bytes(b"x" * 1000)
    (store / "mlflow" / "artifacts").mkdir(parents=True)
    os.link(store / "experts" / "a" / "adapter.safetensors",
            store / "mlflow" / "artifacts" / "adapter.safetensors")
    (store / "mlflow" / "mlflow.db").write_bytes(b"y" * 10)
    counted = storage(store)
    assert counted["store_bytes"] == 1000 and counted["mlflow_bytes_apparent"] == 1010
    assert counted["mlflow_bytes_added"] == 10 and counted["unique_bytes"] == 1010


def test_quick_mode_writes_nothing_under_bench_results(tmp_path):
    args = parse_args(["--experts", "4", "--quick", "--work", str(tmp_path)])
    assert args.out == tmp_path / "results" and args.checkpoints == [4]


@pytest.mark.slow
def test_scale_runs_end_to_end_on_the_tiny_model(tmp_path):
    assert main(["--experts", "2", "--quick", "--work", str(tmp_path), "--base",
                 "tiny-llama"]) == 0
    (point,) = json.loads((tmp_path / "results" / "results.json").read_text())["checkpoints"]
    assert point["experts"] == 2 and point["stored_over_sent"] > 1.0  # tiny: charts dominate
    assert point["store"]["same_top_k"] and point["store"]["max_abs_logit_diff"] < 1e-4
    assert point["forward"]["float32"]["paged_default"]["routed_over_base"] > 0
    assert len(json.loads((tmp_path / "results" / "results.json").read_text())["arrivals"]) == 2
