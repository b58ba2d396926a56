"""bench.control_strength: the random-experts control's adapter size against the trained one."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from bench.control_strength import ratios
from routing.synthetic import random_bundle


def test_random_factors_match_a_random_adapter_and_fall_short_of_an_aligned_one(tiny_spec):
    # An adapter whose factors are random already is its own control: ratios near 1.
    drawn = random_bundle(tiny_spec, "drawn", seed=1, rank=4, with_activations=True)
    found = ratios(drawn)
    assert len(found["weight"]) == len(found["output"]) == len(drawn.manifest.modules)
    assert 0.6 < np.median(found["weight"]) < 1.6
    assert 0.3 < np.median(found["output"]) < 3.0
    # A trained-like adapter: every rank-one piece points the same way, and the mean input
    # lies along it. Random factors of the same norms move the weight and, far more, the
    # output on that input by less.
    adapter, activations = {}, {}
    generator = torch.Generator().manual_seed(2)
    for key, a in drawn.adapter.items():
        if key.endswith(".lora_A"):
            module = key[: -len(".lora_A")]
            b = drawn.adapter[f"{module}.lora_B"]
            v = torch.randn(a.shape[1], generator=generator)
            u = torch.randn(b.shape[0], generator=generator)
            adapter[key] = v.expand_as(a).clone()
            adapter[f"{module}.lora_B"] = u.unsqueeze(1).expand_as(b).clone()
            activations[module] = v
    aligned = ratios(replace(drawn, adapter=adapter, activations=activations))
    assert np.median(aligned["weight"]) < 0.7  # about 1/sqrt(rank) = 0.5
    assert np.median(aligned["output"]) < 0.3
