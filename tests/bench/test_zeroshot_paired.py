"""The report's paired bootstrap and label-balance figures against direct computations."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from bench.zeroshot.config import TINY
from bench.zeroshot.paired import balanced_accuracy, majority_rate, paired_difference, task_draws
from bench.zeroshot.report import balance_table, markdown, paired_table

A = {"t1": [1, 1, 0, 1], "t2": [1, 0, 1]}
B = {"t1": [0, 1, 0, 0], "t2": [1, 1, 0]}


def test_paired_difference_matches_a_direct_loop_over_the_same_draws():
    draws = task_draws({"t1": 4, "t2": 3}, draws=200, seed=3)
    got = paired_difference(A, B, draws)
    direct = []
    for k in range(200):
        per_task = []
        for task in ("t1", "t2"):
            rows = draws[task][k]
            per_task.append(sum(A[task][i] - B[task][i] for i in rows) / len(rows))
        direct.append(sum(per_task) / 2)
    direct = np.array(direct)
    # observed: t1 (3-1)/4 = 0.5, t2 (2-2)/3 = 0 -> 0.25
    assert got.diff == pytest.approx(0.25)
    assert got.p_not_better == pytest.approx(np.mean(direct <= 0))
    assert got.low == pytest.approx(np.quantile(direct, 0.025))
    assert got.high == pytest.approx(np.quantile(direct, 0.975))
    assert got.low < got.diff < got.high


def test_paired_difference_is_exact_when_methods_differ_on_every_example():
    # a beats b on every example: every draw shows +1, none <= 0, however the examples fall
    draws = task_draws({"t": 5})
    got = paired_difference({"t": [1] * 5}, {"t": [0] * 5}, draws)
    assert (got.diff, got.low, got.high, got.p_not_better) == (1.0, 1.0, 1.0, 0.0)


def test_paired_difference_rejects_draws_of_another_size():
    with pytest.raises(ValueError, match="t1"):
        paired_difference(A, B, task_draws({"t1": 5, "t2": 3}))


def test_balanced_accuracy_and_majority_rate_match_a_direct_count():
    labels = [0, 0, 0, 0, 1, 1, 2]
    predictions = [0, 0, 0, 0, 0, 1, 0]  # recall: class 0 4/4, class 1 1/2, class 2 0/1
    assert balanced_accuracy(predictions, labels) == pytest.approx((1 + 0.5 + 0) / 3)
    assert majority_rate(labels) == pytest.approx(4 / 7)
    # always answering the majority scores its rate in accuracy but 1/classes balanced
    assert balanced_accuracy([0] * 7, labels) == pytest.approx(1 / 3)


def _summary(correct: dict, predictions: dict | None, labels: dict | None) -> dict:
    summary = {"accuracy": {m: {t: float(np.mean(v)) for t, v in c.items()}
                            for m, c in correct.items()},
               "means": {m: {} for m in correct}, "correct": correct}
    if predictions is not None:
        summary.update(predictions=predictions, labels=labels)
    return summary


def test_report_tables_show_paired_rows_and_balance_per_classification_task():
    labels = {"tweet-sentiment": [0, 1, 2, 2], "boolq": [0, 1, 1, 1], "imdb-sentiment": [0, 1]}
    base = {t: [2] * len(y) for t, y in labels.items()}
    perfect = {t: list(y) for t, y in labels.items()}
    correct = {m: {t: [int(p == g) for p, g in zip(pred[t], labels[t], strict=True)]
                   for t in labels} for m, pred in (("base", base), ("phatgoose", perfect))}
    summary = _summary(correct, {"base": base, "phatgoose": perfect}, labels)
    paired = "\n".join(paired_table(TINY, summary))
    assert "| base |" in paired and "| PHATGOOSE |" not in paired
    balance = "\n".join(balance_table(TINY, summary))
    # base always answers 2: tweet-sentiment recalls class 2 only (1/3); boolq has no class 2
    assert "| tweet-sentiment | 0.500 | 0.333 | 1.000 |" in balance
    assert "| boolq | 0.750 | 0.000 | 1.000 |" in balance
    assert "| imdb-sentiment | 0.500 | 0.000 | 1.000 |" in balance


def test_report_says_when_results_lack_predictions():
    correct = {"phatgoose": {"boolq": [1, 0]}, "base": {"boolq": [0, 0]}}
    text = markdown(TINY, _summary(correct, None, None), {}, ["# t"])
    assert "predate the recording" in text
    assert "held-in diff" in text


def test_random_experts_keep_shapes_norms_and_keys_but_change_values(tiny_spec):
    from routing.controls import random_experts, random_gates
    from routing.stack import stack_experts
    from routing.synthetic import random_bundle

    weights = stack_experts([random_bundle(tiny_spec, n, seed=i, scale=0.5, with_activations=True)
                             for i, n in enumerate(("alpha", "beta"))])
    randomised = random_experts(weights, seed=1)
    assert random_experts(weights, seed=1).modules.keys() == randomised.modules.keys()
    for name, module in weights.modules.items():
        other = randomised.modules[name]
        assert torch.equal(other.keys, module.keys)
        for field in ("lora_A", "lora_B"):
            trained, drawn = getattr(module, field), getattr(other, field)
            assert drawn.shape == trained.shape and drawn.dtype == trained.dtype
            assert not torch.allclose(drawn, trained)
            torch.testing.assert_close(drawn.flatten(1).norm(dim=1),
                                       trained.flatten(1).norm(dim=1))
        torch.testing.assert_close(random_experts(weights, seed=1).modules[name].lora_A,
                                   other.lora_A)  # seeded: the same draw twice
    gated = random_gates(weights, seed=1)
    for name, module in weights.modules.items():
        keys = gated.modules[name].keys
        assert not torch.allclose(keys, module.keys)
        torch.testing.assert_close(keys.norm(dim=1), module.keys.norm(dim=1))
        assert torch.equal(gated.modules[name].lora_A, module.lora_A)


def test_scorer_routes_the_random_controls_and_they_change_the_scores(tiny_base, tiny_spec):
    from bench.zeroshot.scoring import Collection, Scorer
    from routing.stack import stack_experts
    from routing.synthetic import random_bundle
    from tasks import Example

    weights = stack_experts([random_bundle(tiny_spec, n, seed=i, scale=0.5, with_activations=True)
                             for i, n in enumerate(("alpha", "beta"))])
    scorer = Scorer(tiny_base, Collection(weights, None, None, None), TINY,
                    progress=lambda _: None)
    tests = {"t": [Example("Tweet: a lovely day\nSentiment:", ("negative", "positive"), 1),
                   Example("Q: is it wet?\nA:", ("yes", "no"), 0)]}
    scores = {m: scorer.run(m, tests)["t"].scores
              for m in ("phatgoose", "random_experts", "random_gates")}
    assert np.asarray(scores["random_experts"]).shape == np.asarray(scores["phatgoose"]).shape
    assert not np.allclose(scores["random_experts"], scores["phatgoose"])
    assert not np.allclose(scores["random_gates"], scores["phatgoose"])


def test_seed_table_gives_the_spread_and_the_seeds_where_phatgoose_leads():
    from bench.zeroshot.report import seed_mean_difference, seed_table

    def round_(phatgoose: list[int], base: list[int]) -> dict:
        correct = {"phatgoose": {t: phatgoose for t in ("tweet-sentiment", "boolq",
                                                        "imdb-sentiment")},
                   "base": {t: base for t in ("tweet-sentiment", "boolq", "imdb-sentiment")}}
        return _summary(correct, None, None) | {"means": {
            m: {"held_in": {"mean": float(np.mean(c["boolq"]))},
                "held_out": {"mean": float(np.mean(c["boolq"]))}} for m, c in correct.items()}}

    first = round_([1] * 20, [0] * 20)  # a sure lead
    second = round_([1] * 10 + [0] * 10, [0] * 10 + [1] * 10)  # a tie: no lead
    text = "\n".join(seed_table(TINY, first | {"seeds": [second]}))
    assert "Across 2 training seeds" in text
    # PHATGOOSE 1.0 and 0.5: mean 0.75, sample sd 0.354; base 0.0 and 0.5
    assert "| PHATGOOSE | 0.750 ± 0.354 | - | - | - | 0.750 ± 0.354 | - | - | - |" in text
    # averaged over the seeds, PHATGOOSE's examples are 1 (first ten) and 0.5; base's 0 and 0.5
    pooled = seed_mean_difference([first, second], "phatgoose", "base", TINY.held_in)
    assert pooled.diff == pytest.approx(0.5)
    assert 0.0 < pooled.low < 0.5 < pooled.high <= 1.0
    cell = f"{pooled.diff:+.3f} [{pooled.low:+.3f}, {pooled.high:+.3f}]"
    # each seed: a lead of 1.0 whose interval is above 0, then a tie
    assert f"| base | 0.250 ± 0.354 | {cell} | +1.000, +0.000 | 1/2 / 1/2 |" in text
    assert "Where each seed was scored" not in text  # results that predate the record
    unfinished = second | {"means": {"base": second["means"]["base"]}}
    assert seed_table(TINY, first | {"seeds": [unfinished]}) == []  # no PHATGOOSE in seed 1
    here = {"precision": "fp32", "cpu": "AMD EPYC", "cores": 2}
    text = "\n".join(seed_table(TINY, first | {"scored_on": {"phatgoose": None},
                                               "seeds": [second | {"train_seed": 1,
                                                                   "scored_on": {"base": here}}]}))
    assert "seed 0: not recorded; seed 1: fp32 on AMD EPYC (2 cores)." in text


def test_seed_task_table_gives_each_seed_per_task_and_the_range():
    from bench.zeroshot.report import seed_task_table

    first = _summary({"base": {"boolq": [0, 0], "imdb-sentiment": [0, 1]},
                      "phatgoose": {"boolq": [1, 1], "imdb-sentiment": [1, 1]}}, None, None)
    second = _summary({"base": {"boolq": [0, 1]},
                       "phatgoose": {"boolq": [1, 0], "imdb-sentiment": [0, 0]}}, None, None)
    lines = seed_task_table(TINY, first | {"seeds": [second]})
    assert "| task | base | PHATGOOSE |" in lines
    assert "| boolq (held-in) | 0.000 / 0.500 (0.500) | 1.000 / 0.500 (0.500) |" in lines
    # a task a seed did not score is a dash, not a range over the seeds that did
    assert "| imdb-sentiment (held-out) | - | 1.000 / 0.000 (1.000) |" in lines
    assert "| tweet-sentiment (held-in) | - | - |" in lines
    assert seed_task_table(TINY, first | {"seeds": [{"accuracy": {}}]}) == []


def test_seeds_flag_refuses_fewer_than_one(capsys):
    from bench.zeroshot.__main__ import parse_args

    assert parse_args([]).seeds == 1
    with pytest.raises(SystemExit):
        parse_args(["--seeds", "0"])
    assert "--seeds must be at least 1" in capsys.readouterr().err


def test_checkpoints_give_back_what_a_finished_job_scored(tmp_path):
    from bench.zeroshot.scoring import DIAGNOSTICS, Checkpoints
    from routing.evaluate import EvalResult

    checkpoints = Checkpoints(tmp_path / "scores")
    assert checkpoints.load("phatgoose") is None
    result = {"boolq": EvalResult([[-1.5, -0.25]], [1], [0], 3.5)}
    here = {"precision": "fp32", "cpu": "some CPU", "cores": 2}
    checkpoints.save("phatgoose", result, 12.0, here)
    checkpoints.save(DIAGNOSTICS, {"own_share": {"boolq": 0.5}}, 4.0)
    assert checkpoints.scored_on(["phatgoose", DIAGNOSTICS, "smear"]) == {
        "phatgoose": here, DIAGNOSTICS: None}  # smear: not scored yet
    loaded, seconds = checkpoints.load("phatgoose")
    assert seconds == 12.0 and loaded == result and loaded["boolq"].accuracy == 0.0
    assert checkpoints.load(DIAGNOSTICS) == ({"own_share": {"boolq": 0.5}}, 4.0)
    assert sorted(p.name for p in (tmp_path / "scores").iterdir()) == [
        "diagnostics.json", "phatgoose.json"]  # no partial file left behind
    assert Checkpoints(None).load("phatgoose") is None


def test_an_unfinished_job_keeps_its_scored_tasks_until_the_job_is_saved(tmp_path):
    from bench.zeroshot.scoring import Checkpoints
    from routing.evaluate import EvalResult

    checkpoints = Checkpoints(tmp_path / "scores")
    fp32 = {"precision": "fp32", "cpu": "some CPU", "cores": 2}
    boolq = EvalResult([[-1.5, -0.25]], [1], [1], 3.5)
    assert checkpoints.tasks("smear", fp32) == {}
    checkpoints.save_task("smear", "boolq", boolq, fp32)
    checkpoints.save_task("smear", "piqa", EvalResult([[-2.0, -1.0]], [1], [0], 2.0),
                          {**fp32, "precision": "bf16"})
    assert checkpoints.tasks("smear", fp32) == {"boolq": boolq}  # bf16's piqa is scored again
    assert checkpoints.load("smear") is None and not checkpoints.complete(["smear"])
    checkpoints.save("smear", {"boolq": boolq}, 9.0, fp32)
    assert not (tmp_path / "scores" / "smear.tasks").exists()
    assert checkpoints.tasks("smear", fp32) == {}


def test_scorer_keeps_tasks_scored_before_and_reports_each_new_one(tiny_base, tiny_spec):
    from bench.zeroshot.scoring import Collection, Scorer
    from routing.evaluate import EvalResult
    from routing.stack import stack_experts
    from routing.synthetic import random_bundle
    from tasks import Example

    weights = stack_experts([random_bundle(tiny_spec, "alpha", seed=0, scale=0.5)])
    scorer = Scorer(tiny_base, Collection(weights, None, None, None), TINY,
                    progress=lambda _: None)
    tests = {"kept": [Example("Q: is it wet?\nA:", ("yes", "no"), 0)],
             "new": [Example("Q: is it dry?\nA:", ("yes", "no"), 1)]}
    earlier = EvalResult([[-9.0, -1.0]], [1], [0], 60.0)  # not what this base would score
    reported = []
    out = scorer.run("phatgoose", tests, done={"kept": earlier},
                     on_task=lambda task, result: reported.append((task, result)))
    assert out["kept"] is earlier and [task for task, _ in reported] == ["new"]
    assert reported[0][1] is out["new"] and len(out["new"].scores[0]) == 2


def test_a_round_is_complete_only_with_every_job_and_gives_back_its_system(tmp_path):
    from bench.zeroshot.scoring import DIAGNOSTICS, Checkpoints
    from routing.evaluate import EvalResult

    checkpoints = Checkpoints(tmp_path / "scores")
    assert not checkpoints.complete(["phatgoose"]) and checkpoints.system() is None
    checkpoints.save("phatgoose", {"boolq": EvalResult([[-1.0, -2.0]], [0], [0], 1.0)}, 2.0)
    assert checkpoints.complete(["phatgoose"])
    assert not checkpoints.complete(["phatgoose", DIAGNOSTICS])  # diagnostics still to run
    described = {"version_id": "v1", "router": "/x", "experts": [{"bundle": "k1"}]}
    checkpoints.save_system(described)
    assert checkpoints.system() == described
    assert not Checkpoints(None).complete([]) and Checkpoints(None).system() is None


def test_wall_clock_adds_the_time_of_killed_invocations(tmp_path):
    from bench.zeroshot.__main__ import WallClock

    record = tmp_path / "wall" / "command.json"
    WallClock(record)  # writes its record at once; its thread rewrites it a minute later
    assert json.loads(record.read_text())[0] >= 0  # what a killed run leaves behind
    record.write_text("[600.0]")  # as if the first invocation had been killed after 10 min
    second = WallClock(record)
    assert second.earlier == [600.0] and 600.0 <= second.total() < 660.0
    second.finish()
    assert not record.exists()
    second.save()  # the daemon thread saving after the end writes nothing
    assert not record.exists()


def test_the_machine_a_job_is_scored_on_names_precision_and_cpu():
    from bench.zeroshot.scoring import machine
    from routing.precision import native_bf16

    scored_on = machine(TINY)
    assert scored_on["precision"] == ("bf16" if native_bf16("cpu") else "fp32")
    assert scored_on["cores"] == os.cpu_count() and scored_on["cpu"]
