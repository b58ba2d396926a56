"""The zero-shot benchmark's pieces on the tiny model, and (slow) its whole pipeline."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch

from bench.zeroshot.config import METHODS, TINY, content_key
from bench.zeroshot.diagnostics import token_choices
from bench.zeroshot.report import bar_chart, heatmap, markdown, summarise
from bench.zeroshot.retrieval import Encoder, RetrievalIndex
from bench.zeroshot.scoring import Collection, PromptMask, Scorer
from routing.evaluate import EvalResult, evaluate
from routing.router import route, routing_inputs, unroute
from routing.stack import stack_experts
from routing.synthetic import random_bundle
from tasks import Example

EXAMPLES = [
    Example("Tweet: what a lovely day\nSentiment:", ("negative", "neutral", "positive"), 2),
    Example("Question: where do fish live?\nAnswer:", ("in the sea", "on trees"), 0),
    Example("Goal: boil water.\nSolution:", ("use a kettle", "use a fridge", "shout"), 0),
    Example("Q:", ("a much longer answer with many tokens", "b"), 1),
]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def weights(tiny_spec):
    bundles = [random_bundle(tiny_spec, name, seed=i, scale=0.5, with_activations=True)
               for i, name in enumerate(("alpha", "beta", "gamma"))]
    return stack_experts(bundles)


@pytest.fixture
def routed(tiny_base):
    yield tiny_base
    unroute(tiny_base.model)


def test_content_key_changes_with_data_flags_and_base(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"input": "a", "target": " b"}\n')
    key = content_key(data, ["--steps", "3"], "f" * 64)
    assert key == content_key(data, ["--steps", "3"], "f" * 64)
    assert key != content_key(data, ["--steps", "4"], "f" * 64)
    assert key != content_key(data, ["--steps", "3"], "e" * 64)
    data.write_text('{"input": "a", "target": " c"}\n')
    assert key != content_key(data, ["--steps", "3"], "f" * 64)


def test_prompt_mask_covers_each_rows_prompt_only(tiny_base):
    mask = PromptMask(tiny_base.tokenizer, EXAMPLES, 64)
    got = mask.mask([1, 3])  # a batch of two prompts, right-padded to the longer
    tok = tiny_base.tokenizer
    lengths = [len(tok(EXAMPLES[i].input, add_special_tokens=False)["input_ids"]) for i in (1, 3)]
    assert got.shape == (2, max(lengths))
    for row, length in enumerate(lengths):
        assert bool(got[row, :length].all()) and not bool(got[row, length:].any())


def test_smear_scores_equal_unpadded_runs_routed_on_the_prompt(routed, weights):
    scorer = Scorer(routed, Collection(weights, None, None, None), replace(TINY, eval_batch_size=5))
    route(routed, weights, method="smear")
    scores = scorer._smear(EXAMPLES, "smear").scores
    tok = routed.tokenizer
    for example, row in zip(EXAMPLES, scores, strict=True):
        prompt = tok(example.input, add_special_tokens=False)["input_ids"]
        for choice, score in zip(example.choices, row, strict=True):
            ids = prompt + tok(" " + choice, add_special_tokens=False)["input_ids"]
            mask = torch.tensor([[1] * len(prompt) + [0] * (len(ids) - len(prompt))])
            with torch.no_grad(), routing_inputs(routed.model, attention_mask=mask):
                logp = torch.log_softmax(routed.model(input_ids=torch.tensor([ids])).logits[0],
                                         dim=-1)
            expected = np.mean([logp[i - 1, ids[i]].item() for i in range(len(prompt),
                                                                              len(ids))])
            assert score == pytest.approx(expected, abs=1e-4)


def test_retrieval_with_one_expert_everywhere_equals_that_single_expert(routed, weights):
    class Everyone:  # an index whose nearest expert is always beta
        def nearest(self, queries):
            return ["beta"] * len(queries)

    class NoEncoder:
        def embed(self, texts):
            return torch.zeros(len(texts), 4)

    scorer = Scorer(routed, Collection(weights, None, Everyone(), NoEncoder()), TINY)
    route(routed, weights, method="retrieval")
    retrieved = scorer._retrieval(EXAMPLES, "retrieval").scores
    route(routed, weights, method="single:beta")
    single = evaluate(routed.model, routed.tokenizer, EXAMPLES, progress=False).scores
    assert np.allclose(_flat(retrieved), _flat(single), atol=1e-5)
    unroute(routed.model)
    plain = evaluate(routed.model, routed.tokenizer, EXAMPLES, progress=False).scores
    # The chosen expert did change the scores.
    assert not np.allclose(_flat(retrieved), _flat(plain), atol=1e-4)


def _flat(scores: list[list[float]]) -> np.ndarray:
    return np.concatenate([np.asarray(row) for row in scores])


def test_retrieval_index_picks_the_expert_holding_the_nearest_example(tmp_path):
    files = {}
    for name, texts in (("weather", ["It will rain heavily tomorrow.", "Sunny skies all week."]),
                        ("cooking", ["Boil the pasta for ten minutes.", "Whisk eggs and sugar."])):
        files[name] = tmp_path / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps({"input": t, "target": " x"}) + "\n"
                                       for t in texts))
    encoder = Encoder()
    index = RetrievalIndex.from_files(encoder, files, limit=1000)
    queries = encoder.embed(["Expect thunderstorms and rain tonight.", "Stir the sauce."])
    assert torch.allclose(queries.norm(dim=1), torch.ones(2), atol=1e-5)
    assert index.nearest(queries) == ["weather", "cooking"]


def test_own_share_counts_real_tokens_and_layers(routed, weights):
    route(routed, weights, method="single:gamma")
    choices = token_choices(routed, EXAMPLES, batch_size=3)
    tok = routed.tokenizer
    real = sum(len(tok(e.input + e.target, add_special_tokens=False)["input_ids"])
               for e in EXAMPLES)
    assert all(c.shape[0] == real for c in choices.by_module.values())  # padding excluded
    assert choices.own_share("gamma")["overall"] == 1.0
    assert choices.own_share("gamma")["scored"] == 1.0
    assert choices.own_share("alpha")["overall"] == 0.0
    assert sorted(choices.own_share("gamma")["per_layer"]) == [0, 1]
    usage = choices.usage()
    assert usage.shape == (2, 3) and torch.allclose(usage[:, 2], torch.ones(2))


def test_scored_positions_are_those_that_predict_the_answer(routed, weights):
    route(routed, weights, method="phatgoose", top_k=2)
    choices = token_choices(routed, EXAMPLES, batch_size=3)
    tok = routed.tokenizer
    expected = []
    for example in EXAMPLES:
        prompt = tok(example.input, add_special_tokens=False)["input_ids"]
        answer = tok(example.target, add_special_tokens=False)["input_ids"]
        # The last prompt position predicts the answer's first id; the answer's last
        # position predicts nothing that is scored.
        expected += [False] * (len(prompt) - 1) + [True] * len(answer) + [False]
    assert choices.scored.tolist() == expected
    top1 = torch.stack([ids[:, 0] for ids in choices.by_module.values()])
    for index, name in enumerate(choices.experts):
        share = (top1[:, choices.scored] == index).double().mean().item()
        assert choices.own_share(name)["scored"] == pytest.approx(share)


def test_own_share_of_phatgoose_is_a_share_of_top1_choices(routed, weights):
    route(routed, weights, method="phatgoose", top_k=2)
    choices = token_choices(routed, EXAMPLES, batch_size=2)
    shares = [choices.own_share(e)["overall"] for e in weights.experts]
    assert sum(shares) == pytest.approx(1.0)  # every token's top-1 is exactly one expert
    assert torch.allclose(choices.usage().sum(1), torch.ones(2))


def _fake_results(plan):
    rng = np.random.default_rng(0)
    results = {}
    for method in METHODS:
        results[method] = {}
        for task in (*plan.held_in, *plan.held_out):
            if method == "oracle" and task in plan.held_out:
                continue
            labels = [0] * 10
            predictions = rng.integers(0, 2, size=10).tolist()
            results[method][task] = EvalResult([[0.0, 0.0]] * 10, predictions, labels, 0.1)
    return results


def test_report_writes_table_chart_and_heatmap(tmp_path):
    summary = summarise(TINY, _fake_results(TINY))
    for method in METHODS:
        held_in = summary["means"][method]["held_in"]
        assert held_in["low"] <= held_in["mean"] <= held_in["high"]
        assert held_in["mean"] == pytest.approx(np.mean(
            [summary["accuracy"][method][t] for t in TINY.held_in]))
    assert "held_out" not in summary["means"]["oracle"]
    own = {m: {t: {"overall": 0.5, "scored": 0.25, "per_layer": {0: 0.5}} for t in TINY.held_in}
           for m in ("phatgoose", "average_activation")}
    text = markdown(TINY, summary, {"own_share": own}, ["# title"])
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    paired = 1 + len(METHODS) - 1  # PHATGOOSE against every other method
    balance = 1 + len(TINY.held_in) + len(TINY.held_out)  # all tiny tasks are classification
    assert len(rows) == (1 + len(TINY.held_in) + len(TINY.held_out) + 2 + paired + balance
                         + 1 + len(TINY.held_in))
    assert rows[-1].endswith("| 0.50 / 0.25 | 0.50 / 0.25 |")
    for shares in own.values():  # results written before the scored share existed
        for share in shares.values():
            del share["scored"]
    old_rows = markdown(TINY, summary, {"own_share": own}, ["# title"]).splitlines()
    assert old_rows[-1].endswith("| 0.50 | 0.50 |")
    assert "held-out mean" in text and "oracle*" in text
    assert bar_chart(summary, tmp_path / "means.png", "t").read_bytes()[:8] == PNG_MAGIC
    usage = {"imdb-sentiment": [[0.5, 0.5], [1.0, 0.0]]}
    assert heatmap(usage, ["a", "b"], tmp_path / "h.png", "t").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.slow
@pytest.mark.timeout(2400)  # six runs of the benchmark, about 17 min on a busy 2-core machine
def test_tiny_benchmark_runs_end_to_end_and_reuses_cached_experts(tmp_path):
    from bench.zeroshot.__main__ import main

    out, cache = tmp_path / "results", tmp_path / "cache"
    args = ["--tiny", "--out", str(out), "--cache", str(cache)]
    assert main([*args, "--workdir", str(tmp_path / "first"), "--seeds", "2"]) == 0
    first = json.loads((out / "results.json").read_text())
    # the second training seed: new experts and gates, the post-hoc methods scored again
    (again,) = first["seeds"]
    assert again["train_seed"] == 1
    assert set(again["experts"]).isdisjoint(e["bundle"] for e in first["system"]["experts"])
    assert set(again["accuracy"]) == set(METHODS) - {"base", "retrieval", "multitask", "oracle"}
    assert "Across 2 training seeds" in (out / "results.md").read_text()
    assert first["system"]["n_experts"] == len(TINY.held_in)
    assert not any(e["cached"] for e in first["system"]["experts"])
    assert set(first["accuracy"]) == set(METHODS)
    assert set(first["accuracy"]["oracle"]) == set(TINY.held_in)
    for name in ("results.md", "means.png", "heatmap.png"):
        assert (out / name).stat().st_size > 0
    # A finished round is not trained again: with its bundles gone, a rerun of jobs it scored
    # still reports, from the scores and the round's saved description.
    cache.rename(tmp_path / "kept")
    assert main([*args, "--workdir", str(tmp_path / "second"), "--methods", "base"]) == 0
    second = json.loads((out / "results.json").read_text())
    assert not cache.exists()  # nothing trained
    assert second["system"] == first["system"]
    assert second["accuracy"]["base"] == first["accuracy"]["base"]
    # Nor when its description was lost: the scores stand, the description is rebuilt from the
    # recipes (bundle names exact, what only training knew null) and says so.
    rounds = {json.loads(path.read_text())["experts"][0]["bundle"]: path
              for path in (tmp_path / "scores").glob("*/_system.json")}
    rounds[first["system"]["experts"][0]["bundle"]].unlink()
    assert main([*args, "--workdir", str(tmp_path / "recovered"), "--methods", "base"]) == 0
    recovered = json.loads((out / "results.json").read_text())
    assert not cache.exists() and "recovered" in recovered["system"]
    assert recovered["system"]["version_id"] is None
    assert ([e["bundle"] for e in recovered["system"]["experts"]]
            == [e["bundle"] for e in first["system"]["experts"]])
    assert recovered["accuracy"]["base"] == first["accuracy"]["base"]
    # Other test examples make a new round, which takes its bundles from the content cache.
    (tmp_path / "kept").rename(cache)
    assert main([*args, "--workdir", str(tmp_path / "third"), "--methods", "base",
                 "--test-examples", "6"]) == 0
    third = json.loads((out / "results.json").read_text())
    assert all(e["cached"] for e in third["system"]["experts"])
    assert third["test_examples"]["boolq"] == 6
    # A later seed's round retrained in a fresh clone trains its experts, not the multitask
    # LoRA, which only the first round scores.
    cache.rename(tmp_path / "kept-again")
    shutil.rmtree(rounds[again["experts"][0]].parent)
    assert main([*args, "--workdir", str(tmp_path / "fourth"), "--seeds", "2"]) == 0
    fourth = json.loads((out / "results.json").read_text())
    assert sorted(p.name for p in cache.iterdir()) == sorted(again["experts"])
    assert fourth["seeds"][0]["experts"] == again["experts"]
    assert set(fourth["seeds"][0]["accuracy"]) == set(again["accuracy"])
    # A job interrupted after some of its tasks keeps them: here phatgoose had scored one task
    # (made perfect, to tell it apart) when the run stopped; the rerun scores only the rest.
    scores = rounds[again["experts"][0]].parent
    saved = json.loads((scores / "phatgoose.json").read_text())
    task = sorted(saved["out"])[0]
    kept = {**saved["out"][task], "predictions": saved["out"][task]["labels"]}
    assert kept["predictions"] != saved["out"][task]["predictions"]  # a real difference
    (scores / "phatgoose.tasks").mkdir()
    (scores / "phatgoose.tasks" / f"{task}.json").write_text(
        json.dumps({"out": kept, "scored_on": saved["scored_on"]}))
    (scores / "phatgoose.json").unlink()
    assert main([*args, "--workdir", str(tmp_path / "fifth"), "--seeds", "2"]) == 0
    fifth = json.loads((out / "results.json").read_text())["seeds"][0]["accuracy"]["phatgoose"]
    assert fifth[task] == 1.0
    assert {t: a for t, a in fifth.items() if t != task} == {
        t: a for t, a in fourth["seeds"][0]["accuracy"]["phatgoose"].items() if t != task}
    assert not (scores / "phatgoose.tasks").exists() and (scores / "phatgoose.json").exists()


def test_methods_default_to_the_plan_and_unknown_ones_are_refused(capsys):
    from bench.zeroshot.__main__ import parse_args
    from bench.zeroshot.config import FULL

    assert "phatgoose_centred" not in FULL.methods and TINY.methods == METHODS
    assert parse_args([]).methods is None
    with pytest.raises(SystemExit):
        parse_args(["--methods", "base,phatgose"])
    assert "unknown method(s) phatgose" in capsys.readouterr().err
