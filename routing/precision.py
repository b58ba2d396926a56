"""Compute precision for training and scoring: bf16 autocast where the CPU runs it natively.

Weights stay float32 everywhere (the base fingerprint, the shipped tensors and the gates'
master copies are unchanged); `autocast` only runs matmuls in bfloat16. On a CPU with AMX or
AVX512-BF16 that is the cheapest speed-up there is: on this project's 2-core machines a
576 x 1536 matmul over 512 rows ran 3x faster on one thread (454 vs 152 GFLOPS), a
SmolLM2-135M LoRA training step at 8 x 64 tokens 1.6x faster (2.2 vs 3.5 s) and a forward
pass 2.4x faster (0.63 vs 1.51 s). Without native support bf16 is emulated and slower than
float32, so "auto" picks float32 there.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from protocol.errors import InvalidArgument

PRECISIONS = ("auto", "bf16", "fp32")


def native_bf16(device: str = "cpu") -> bool:
    """Whether bf16 matmuls run natively (not emulated) on `device`."""
    if device == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # private, hence getattr
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


def resolve(precision: str, device: str = "cpu") -> str:
    """"auto" -> "bf16" where native, else "fp32"; "bf16" and "fp32" are kept as given."""
    if precision not in PRECISIONS:
        raise InvalidArgument(f"precision must be one of {', '.join(PRECISIONS)}, got "
                              f"{precision!r}", field="precision")
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


@contextlib.contextmanager
def autocast(precision: str, device: str = "cpu") -> Iterator[str]:
    """Run the block under bf16 autocast when `precision` resolves to bf16; yields the choice."""
    chosen = resolve(precision, device)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=chosen == "bf16"):
        yield chosen


def for_scoring(model: torch.nn.Module, precision: str, device: str = "cpu") -> str:
    """Cast `model` to bf16 weights for scoring when `precision` resolves to bf16; returns the
    choice. Casting the weights, not autocast: routed layers follow the base weights' dtype
    (routing.layers), and their in-place mixture does not run under autocast."""
    chosen = resolve(precision, device)
    if chosen == "bf16":
        model.to(torch.bfloat16)
    return chosen
