"""The inference benchmark on the tiny model: its naive loop is the routed mixture, its JSON."""

from __future__ import annotations

import json

import pytest
import torch

from bench.inference import install, main, routed_layers, synthetic_router, uninstall
from routing.base import load_base


@pytest.fixture(scope="module")
def base():
    """A private tiny base: the benchmark swaps its modules in and out."""
    return load_base("tiny-llama")


@pytest.mark.parametrize("count", [4, 16])
def test_naive_loop_computes_the_same_mixture_as_the_routed_model(base, count):
    # the baseline must do the routed model's work the obvious way, not some other work
    layers = routed_layers(base, synthetic_router(base, count, rank=4), top_k=2)
    tokens = torch.randint(0, 200, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        plain = base.model(tokens).logits
        install(base.model, layers)
        routed = base.model(tokens).logits
        uninstall(base.model, layers)
        install(base.model, layers, naive=True)
        naive = base.model(tokens).logits
        uninstall(base.model, layers)
    assert not torch.allclose(routed, plain, atol=1e-3)  # the experts do change the output
    torch.testing.assert_close(naive, routed, atol=1e-5, rtol=1e-5)


def test_run_writes_ratios_speedup_and_load_average(tmp_path):
    out = tmp_path / "inference.json"
    assert main(["--base", "tiny-llama", "--experts", "2", "8", "--naive-experts", "8",
                 "--rounds", "2", "--batch", "2", "--tokens", "8", "--threads", "1",
                 "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = result["results"]
    assert list(rows) == ["base", "routed_2", "routed_8", "naive_8"]
    assert rows["base"]["cpu_ratio_to_base"] == 1.0
    assert len(rows["routed_8"]["runs"]) == 2 and len(rows["naive_8"]["runs"]) == 2
    assert len(rows["base"]["runs"]) == 4  # one paired with each routed run
    for row in rows.values():
        assert row["cpu_s"] > 0 and row["cpu_best_ratio_to_base"] > 0
    assert rows["naive_8"]["cpu_routed_speedup"] > 0
    assert len(result["load_average"]["before"]) == 3
