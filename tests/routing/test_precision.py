"""routing.precision: the precision names, bf16 autocast, and bf16 weights for scoring."""

import copy

import pytest
import torch

from protocol.errors import InvalidArgument
from routing import precision
from routing.evaluate import choice_scores
from tasks.task import Example


def test_resolve_keeps_explicit_choices_and_refuses_unknown_names():
    assert precision.resolve("fp32") == "fp32"
    assert precision.resolve("bf16") == "bf16"
    assert precision.resolve("auto") == ("bf16" if precision.native_bf16() else "fp32")
    with pytest.raises(InvalidArgument) as info:
        precision.resolve("fp16")
    assert info.value.field == "precision" and "auto, bf16, fp32" in str(info.value)


def test_autocast_runs_matmuls_in_bf16_only_when_asked():
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    with precision.autocast("bf16") as chosen:
        assert chosen == "bf16" and (a @ b).dtype == torch.bfloat16
    with precision.autocast("fp32") as chosen:
        assert chosen == "fp32" and (a @ b).dtype == torch.float32


def test_bf16_scores_stay_close_to_fp32(tiny_base):
    examples = [Example(f"review {i}: it was", ("good", "bad", "fine"), i % 3)
                for i in range(6)]
    exact = choice_scores(tiny_base.model, tiny_base.tokenizer, examples)
    model = copy.deepcopy(tiny_base.model)
    assert precision.for_scoring(model, "bf16") == "bf16"
    assert next(model.parameters()).dtype == torch.bfloat16
    fast = choice_scores(model, tiny_base.tokenizer, examples)
    assert len(fast) == len(exact)
    for row_fast, row_exact in zip(fast, exact, strict=True):
        torch.testing.assert_close(torch.tensor(row_fast), torch.tensor(row_exact),
                                   atol=0.05, rtol=0.02)
    assert fast != exact  # bf16 did run: the scores moved, a little
    model = copy.deepcopy(tiny_base.model)
    assert precision.for_scoring(model, "fp32") == "fp32"
    assert next(model.parameters()).dtype == torch.float32
