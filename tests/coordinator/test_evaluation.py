"""Evaluation inside the coordinator: the config file, versions evaluated on a real Ray actor
holding tiny-llama, promote's threshold on the mean accuracy, and failures that leave a
version without metrics. (MLflow tags: see test_assemble_e2e.)"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import pytest

from coordinator.checks.evaluation import (
    EvalPool,
    EvaluationConfig,
    active_config,
    evaluate_version,
    read_evaluation,
    save_active_config,
)
from coordinator.checks.evaluator import Evaluator
from coordinator.cli import main
from coordinator.store.versions import VersionStore
from coordinator.versions.assemble import assemble
from demo.processes import free_port
from protocol.errors import InvalidArgument
from tasks.registry import HELD_OUT
from tests.harness.stores import add_expert, make_store

TASKS = ("openbookqa", "imdb-sentiment")  # public held-out tasks, cheap to load
CONFIG = EvaluationConfig(tasks=TASKS, examples_per_task=8, batch_size=8)


@pytest.fixture(scope="module")
def pool(ray_local):  # noqa: F811
    """One actor holding tiny-llama, shared by the tests of this module (as across versions)."""
    shared = EvalPool(CONFIG)
    yield shared
    shared.shutdown()


def test_config_reads_toml_and_json_files(tmp_path):
    toml = tmp_path / "eval.toml"
    toml.write_text('tasks = ["openbookqa", "drug-review"]\nexamples-per-task = 5\n'
                    'top_k = 1\nmax_drop = 0.05\n')
    config = EvaluationConfig.from_file(toml)
    assert config.tasks == ("openbookqa", "drug-review") and config.examples_per_task == 5
    assert config.top_k == 1 and config.max_drop == 0.05 and config.actors == 1
    as_json = tmp_path / "eval.json"
    as_json.write_text(json.dumps(config.to_json()))
    assert EvaluationConfig.from_file(as_json) == config
    assert EvaluationConfig().tasks == HELD_OUT


def test_config_key_changes_only_with_what_the_metrics_mean():
    base = EvaluationConfig(tasks=TASKS)
    assert dataclasses.replace(base, batch_size=2, actors=2, max_drop=0.3).key == base.key
    assert dataclasses.replace(base, examples_per_task=7).key != base.key
    assert dataclasses.replace(base, tasks=TASKS[:1]).key != base.key


@pytest.mark.parametrize("settings, field", [
    ({"tasks": ["no-such-task"]}, "tasks"),
    ({"tasks": []}, "tasks"),
    ({"tasks": ["piqa", "piqa"]}, "tasks"),
    ({"method": "retrieval"}, "method"),
    ({"examples_per_task": 0}, "examples_per_task"),
    ({"actors": 1.5}, "actors"),
    ({"max_drop": 2.0}, "max_drop"),
    ({"n_examples": 5}, "eval_config"),
])
def test_config_refuses_bad_settings_naming_them(settings, field):
    with pytest.raises(InvalidArgument) as caught:
        EvaluationConfig.from_json(settings)
    assert caught.value.field == field


def test_serve_takes_the_eval_config_from_its_toml_or_a_flag(tmp_path):
    from coordinator.server import ServerConfig

    settings = tmp_path / "serve.toml"
    settings.write_text(f'store = "{tmp_path / "s"}"\nbase = "tiny-llama"\n'
                        f'eval-config = "{tmp_path / "eval.toml"}"\n')
    args = argparse.Namespace(config=str(settings))
    assert ServerConfig.from_args(args).eval_config == tmp_path / "eval.toml"
    from coordinator.cli import build_parser

    flags = build_parser().parse_args(["serve", "--config", str(settings),
                                       "--eval-config", "other.json"])
    assert ServerConfig.from_args(flags).eval_config == Path("other.json")


@pytest.fixture(scope="module")
def two_evaluated(tmp_path_factory, tiny_spec, pool):
    """v1 = {a}, v2 = {a, b}, both evaluated on the shared actor."""
    store = make_store(tmp_path_factory.mktemp("eval") / "store", tiny_spec)
    add_expert(store, tiny_spec, "a", seed=21)
    v1 = assemble(store, store.list_experts()).version_id
    add_expert(store, tiny_spec, "b", seed=22)
    v2 = assemble(store, store.list_experts()).version_id
    records = {v: evaluate_version(store.root, v, pool) for v in (v1, v2)}
    return store.root, records


def test_evaluation_records_per_task_accuracy_and_mean(two_evaluated, pool):
    root, records = two_evaluated
    for version_id, record in records.items():
        metrics = record["metrics"]
        assert set(metrics) == {*TASKS, "accuracy"}
        assert record["n_examples"] == {t: 8 for t in TASKS}
        # 8 examples per task: every accuracy is a count of eighths
        assert all(abs(metrics[t] * 8 - round(metrics[t] * 8)) < 1e-9 for t in TASKS)
        assert metrics["accuracy"] == pytest.approx(sum(metrics[t] for t in TASKS) / 2)
        assert read_evaluation(root, version_id) == record
    # The actor keeps its model: evaluating again is deterministic and gives the same numbers.
    again = evaluate_version(root, next(iter(records)), pool)
    assert again["metrics"] == next(iter(records.values()))["metrics"]


def _promote(root: Path, version: str, *extra: str) -> int:
    # An MLflow that is down: the local evaluation records must be enough to decide.
    down = f"http://127.0.0.1:{free_port()}"
    return main(["promote", version, "--store", str(root), "--tracking-uri", down, *extra])


def test_promote_refuses_a_drop_beyond_the_threshold_unless_forced(two_evaluated, capsys):
    """The tiny random experts give whatever accuracies they give (possibly equal), so the
    case is built on the measured numbers: the better-evaluated version is champion, and the
    threshold is set just under / just over the measured drop (negative when the two tie,
    which then demands an improvement)."""
    root, records = two_evaluated
    (better, best), (worse, low) = sorted(
        ((v, r["metrics"]["accuracy"]) for v, r in records.items()), key=lambda x: -x[1])
    drop = best - low
    versions = VersionStore(root)
    assert _promote(root, better) == 0 and versions.champion_id() == better
    capsys.readouterr()

    assert _promote(root, worse, "--max-drop", f"{drop - 0.05}") == 2
    err = capsys.readouterr().err
    assert "--force" in err and f"{low:.4f}" in err and f"{best:.4f}" in err
    assert versions.champion_id() == better

    # The threshold of the evaluation config the coordinator runs with is the default.
    save_active_config(root, dataclasses.replace(CONFIG, max_drop=drop - 0.05))
    assert active_config(root).max_drop == pytest.approx(drop - 0.05)
    assert _promote(root, worse) == 2
    assert versions.champion_id() == better

    assert _promote(root, worse, "--force") == 0 and versions.champion_id() == worse
    save_active_config(root, dataclasses.replace(CONFIG, max_drop=drop + 0.05))
    assert _promote(root, better) == 0 and versions.champion_id() == better
    assert _promote(root, worse) == 0 and versions.champion_id() == worse

    capsys.readouterr()
    assert main(["versions", "--store", str(root), "--json",
                 "--tracking-uri", f"http://127.0.0.1:{free_port()}"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["version_id"]: r["metrics"] for r in rows} == {
        v: r["metrics"] for v, r in records.items()}


def test_failed_evaluation_leaves_the_version_without_metrics(tmp_path, tiny_spec, pool):
    store = make_store(tmp_path / "store", tiny_spec)
    c = add_expert(store, tiny_spec, "c", seed=23)
    broken = assemble(store, store.list_experts()).version_id
    manifest = VersionStore(store.root).folder(broken) / "version.json"
    # the version now names an expert the store does not hold
    manifest.write_text(manifest.read_text().replace(c.expert_id, "f" * 64))
    add_expert(store, tiny_spec, "d", seed=24)
    good = assemble(store, store.list_experts()).version_id

    evaluator = Evaluator(store.root, CONFIG, pool=pool).start()  # evaluates CURRENT = good
    try:
        evaluator.submit(broken)
        assert evaluator.wait_idle(120)
        assert read_evaluation(store.root, broken) is None
        assert "pruned" in evaluator.last_error
        assert read_evaluation(store.root, good)["config_key"] == CONFIG.key
        evaluator.submit(good)  # already evaluated under this config: skipped
        assert evaluator.wait_idle(60) and evaluator.evaluated == 1
    finally:
        evaluator.close()
    assert active_config(store.root) == CONFIG


def test_evaluate_command_gives_the_same_numbers_on_a_fresh_actor(two_evaluated, tmp_path,
                                                                   capsys):
    root, records = two_evaluated
    version_id, record = next(iter(records.items()))
    config_file = tmp_path / "eval.json"
    config_file.write_text(json.dumps(CONFIG.to_json()))
    assert main(["evaluate", version_id[:8], "--store", str(root), "--eval-config",
                 str(config_file), "--tracking-uri", f"http://127.0.0.1:{free_port()}"]) == 0
    out = capsys.readouterr().out
    assert f"version {version_id}: " in out and "tracking calls stay queued" in out
    assert read_evaluation(root, version_id)["metrics"] == record["metrics"]
