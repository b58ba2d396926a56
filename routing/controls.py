"""Random controls: a router with its experts' adapters, or its gate keys, drawn at random."""

from __future__ import annotations

from dataclasses import replace

import torch

from routing.stack import RouterWeights

ADAPTER_FIELDS = ("lora_A", "lora_B", "ia3_out", "ia3_in")


def random_like(tensor: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Gaussian values of `tensor`'s shape, each expert's row (dim 0) rescaled to that row's
    Frobenius norm; entries that are exactly zero (padding to the largest rank, rows of
    another adapter kind) stay zero so that no expert gains rank or a kind it lacked."""
    noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float32)
    noise = noise * (tensor != 0)
    rows = tensor.float().flatten(1).norm(dim=1)
    scale = rows / noise.flatten(1).norm(dim=1).clamp_min(1e-12)
    shape = (-1,) + (1,) * (tensor.dim() - 1)
    return (noise * scale.view(shape)).to(tensor.dtype)


def random_experts(weights: RouterWeights, seed: int = 0) -> RouterWeights:
    """The same router (keys, prototypes, activations) over random adapters of the trained
    ones' shapes and per-module, per-expert norms: what routing gains without what the
    experts learned."""
    generator = torch.Generator().manual_seed(seed)
    modules = {}
    for name, module in weights.modules.items():
        swapped = {f: random_like(getattr(module, f), generator)
                   for f in ADAPTER_FIELDS if getattr(module, f) is not None}
        modules[name] = replace(module, **swapped)
    return replace(weights, modules=modules)


def random_gates(weights: RouterWeights, seed: int = 0) -> RouterWeights:
    """The trained experts behind random gate keys of the trained keys' per-module norms."""
    generator = torch.Generator().manual_seed(seed)
    modules = {name: replace(module, keys=random_like(module.keys, generator))
               for name, module in weights.modules.items()}
    return replace(weights, modules=modules)
