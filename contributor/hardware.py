"""Training on the base model's device: batches moved there, autocast for its device type, and
optional gradient checkpointing."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def autocast_device(model: nn.Module) -> str:
    """The device type torch.autocast takes for `model`: "cuda" on a GPU, else "cpu" (on MPS
    the CPU autocast leaves the model's ops alone)."""
    return "cuda" if model_device(model).type == "cuda" else "cpu"


def on_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The batch's tensors on `device` (no copy when they are there already)."""
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


@contextmanager
def checkpointing(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Recompute each transformer block's activations in the backward pass instead of keeping
    them: less memory for about a third more compute per step.

    transformers checkpoints a block only while it is in training mode; only the blocks are
    switched to it (not their children), so dropout layers stay in eval mode.
    """
    if not enabled:
        yield
        return
    from transformers.modeling_layers import GradientCheckpointingLayer

    if not getattr(model, "supports_gradient_checkpointing", False):
        from protocol.errors import InvalidArgument

        raise InvalidArgument(f"{type(model).__name__} does not support gradient "
                              "checkpointing: drop --gradient-checkpointing",
                              field="gradient-checkpointing")
    blocks = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    previous = [block.training for block in blocks]
    try:
        for block in blocks:
            block.training = True
        yield
    finally:
        for block, mode in zip(blocks, previous, strict=True):
            block.training = mode
        model.gradient_checkpointing_disable()
