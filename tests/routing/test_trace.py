"""Routing trace capture and the expert-usage heatmap."""

from __future__ import annotations

import torch

from routing.base import load_base
from routing.router import route
from routing.synthetic import random_bundle
from routing.trace import capture_routing, plot_usage


def test_trace_counts_every_top_k_slot_and_draws_a_png(tmp_path, tiny_spec):
    base = load_base("tiny-llama")
    bundles = [random_bundle(tiny_spec, f"e{i}", seed=i) for i in range(4)]
    routed = route(base, bundles, "phatgoose", top_k=2)
    tokens = torch.randint(0, 200, (3, 5), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode(), capture_routing(routed) as trace:
        routed(tokens)
    with torch.inference_mode():
        routed(tokens)  # outside the block: not recorded
    assert len(trace.records) == len(tiny_spec.linears)
    choices = trace.choices("model.layers.0.mlp.up_proj")
    assert choices.shape == (15, 2) and (choices[:, 0] != choices[:, 1]).all()
    labels, counts = trace.usage()
    assert labels == ["layer 0", "layer 1"]
    assert counts.shape == (2, 4)
    assert counts.sum().item() == 15 * 2 * len(tiny_spec.linears)
    path = plot_usage(trace, tmp_path / "usage.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000
