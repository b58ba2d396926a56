"""bench.gate_shares: task-named bundles in, own-expert shares over all and scored tokens out."""

import pytest

from bench.gate_shares import bundle_dirs, gate_shares, main
from protocol.bundle import save_bundle
from protocol.errors import InvalidArgument
from routing.synthetic import random_bundle

TASKS = ("tweet-sentiment", "bbc-topic")


@pytest.fixture
def folder(tmp_path, tiny_spec):
    for seed, task in enumerate(TASKS):
        save_bundle(random_bundle(tiny_spec, task, seed=seed, scale=0.5), tmp_path / task)
    return tmp_path


def test_each_task_is_scored_against_its_own_expert(folder):
    paths = bundle_dirs([str(folder)])
    assert sorted(p.name for p in paths) == sorted(TASKS)
    # One expert everywhere: its own task's tokens all pick it, the other task's none.
    shares = gate_shares("tiny-llama", paths, examples=3, max_length=48,
                         methods=("single:tweet-sentiment", "phatgoose", "average_activation"))
    assert "average_activation" not in shares  # these bundles ship no mean activations
    single = shares["single:tweet-sentiment"]
    assert single["tweet-sentiment"]["overall"] == single["tweet-sentiment"]["scored"] == 1.0
    assert single["bbc-topic"]["overall"] == single["bbc-topic"]["scored"] == 0.0
    for share in shares["phatgoose"].values():
        assert 0.0 <= share["overall"] <= 1.0 and 0.0 <= share["scored"] <= 1.0


def test_bundles_not_named_after_a_task_are_refused(tmp_path, tiny_spec, capsys):
    for seed, name in enumerate(("tweet-sentiment", "my-expert")):
        save_bundle(random_bundle(tiny_spec, name, seed=seed), tmp_path / name)
    assert main([str(tmp_path), "--base", "tiny-llama"]) == 2
    assert "'my-expert' is not named after a registered task" in capsys.readouterr().err
    with pytest.raises(InvalidArgument, match="at least two"):
        bundle_dirs([str(tmp_path / "my-expert")])
