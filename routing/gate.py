"""The PHATGOOSE gated expert layer, used to train one gate vector per adapted module.

For a module with frozen base weight W and a frozen expert delta, per token x (d_in,):

    y = W x + sigmoid(v . x) * delta(x)

with v (d_in,) initialised to ZERO and the only trainable tensor. delta(x) is
`s * B A x` for LoRA, `(l - 1) * (W x)` for an output-scaled (IA)^3 module and
`W ((l - 1) * x)` for an input-scaled one (docs/methods.md). With the gate switched off the layer
runs the plain expert (g = 1), which is how mean input activations are measured.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from protocol.bundle import ModuleSpec


def expert_delta(kind: str, base: nn.Linear, x: torch.Tensor, base_out: torch.Tensor,
                 tensors: dict[str, torch.Tensor], scaling: float) -> torch.Tensor:
    """The additive expert term of one module.

    x: (..., d_in); base_out: (..., d_out), the base layer's output for x;
    tensors: {"lora_A": (r, d_in), "lora_B": (d_out, r)} or {"ia3": (d_out,) | (d_in,)}.
    Returns (..., d_out) in base_out's dtype; the expert's float32 tensors compute in float32
    (a bf16 base's activations are widened for the LoRA product).
    """
    if kind == "lora":
        lora_A = tensors["lora_A"]
        delta = F.linear(F.linear(x.to(lora_A.dtype), lora_A), tensors["lora_B"])
        return (scaling * delta).to(base_out.dtype)
    if kind == "ia3_out":
        # The base output already holds W x (and the bias, as peft scales it too).
        return ((tensors["ia3"] - 1.0) * base_out).to(base_out.dtype)
    if kind == "ia3_in":
        return F.linear(((tensors["ia3"] - 1.0) * x).to(x.dtype), base.weight)
    raise ValueError(f"unknown module kind {kind!r}")


class GatedExpertLinear(nn.Module):
    """A frozen base linear layer plus a frozen expert delta, mixed by a trainable gate."""

    def __init__(self, base: nn.Linear, spec: ModuleSpec, tensors: dict[str, torch.Tensor],
                 scaling: float) -> None:
        super().__init__()
        self.base = base
        self.kind = spec.kind
        self.scaling = scaling
        # The expert's tensors are held by reference, not copied (on the CPU; an accelerator
        # gets one copy): a test can then prove that gate training leaves the very tensors
        # that get shipped untouched.
        device = base.weight.device
        self.expert = {key: value.to(device) for key, value in tensors.items()}
        for tensor in self.expert.values():
            tensor.requires_grad_(False)
        # float32 whatever the base's dtype: the gate trains and ships in float32
        self.gate = nn.Parameter(torch.zeros(spec.d_in, dtype=torch.float32, device=device))
        self.gate_enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (batch, seq, d_in) -> (batch, seq, d_out); one gate value per token."""
        base_out = self.base(x)
        delta = expert_delta(self.kind, self.base, x, base_out, self.expert, self.scaling)
        if not self.gate_enabled:
            return base_out + delta
        gate = torch.sigmoid(x.to(self.gate.dtype) @ self.gate).unsqueeze(-1)  # (b, seq, 1)
        return base_out + (gate * delta).to(base_out.dtype)


def _module_tensors(adapter: dict[str, torch.Tensor], spec: ModuleSpec) -> dict[str, torch.Tensor]:
    prefix = f"{spec.name}."
    return {key[len(prefix):]: value for key, value in adapter.items()
            if key.startswith(prefix) and "." not in key[len(prefix):]}


def _replace(model: nn.Module, name: str, layer: nn.Module) -> nn.Module:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    previous = getattr(parent, child)
    setattr(parent, child, layer)
    return previous


@contextmanager
def gated_experts(model: nn.Module, modules: list[ModuleSpec], adapter: dict[str, torch.Tensor],
                  scaling: float) -> Iterator[dict[str, GatedExpertLinear]]:
    """Swap each adapted linear of `model` for a GatedExpertLinear; restore them on exit.

    adapter: bundle-named expert tensors ("<module>.lora_A", ...). Yields module name -> layer;
    read the trained gates from `layer.gate` before leaving the block.
    """
    layers: dict[str, GatedExpertLinear] = {}
    try:
        for spec in modules:
            base = model.get_submodule(spec.name)
            if not isinstance(base, nn.Linear):
                raise TypeError(f"{spec.name} is a {type(base).__name__}, not an nn.Linear")
            layer = GatedExpertLinear(base, spec, _module_tensors(adapter, spec), scaling)
            _replace(model, spec.name, layer)
            layers[spec.name] = layer
        yield layers
    finally:
        for name, layer in layers.items():
            _replace(model, name, layer.base)


def gate_vectors(layers: dict[str, GatedExpertLinear]) -> dict[str, torch.Tensor]:
    """module name -> gate vector (d_in,), detached float32 copies."""
    return {name: layer.gate.detach().to("cpu", torch.float32).clone()
            for name, layer in layers.items()}


@torch.no_grad()
def mean_input_activations(model: nn.Module, layers: dict[str, GatedExpertLinear],
                           batches: Iterable[dict[str, torch.Tensor]]
                           ) -> tuple[dict[str, torch.Tensor], int]:
    """Mean input of each gated module over non-padding tokens, with the expert fully active.

    batches: dicts with input_ids and attention_mask (batch, seq). Returns module name ->
    (d_in,) float32 mean, and the number of tokens averaged.
    """
    device = next(model.parameters()).device
    wide = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
    sums = {name: torch.zeros(layer.base.in_features, dtype=wide, device=device)
            for name, layer in layers.items()}
    mask: list[torch.Tensor] = []  # the current batch's (batch, seq) bool mask

    def hook(name: str):
        def record(_module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            sums[name] += inputs[0][mask[0]].sum(dim=0, dtype=wide)
        return record

    handles = [layer.register_forward_pre_hook(hook(name)) for name, layer in layers.items()]
    previous = {name: layer.gate_enabled for name, layer in layers.items()}
    tokens = 0
    try:
        for layer in layers.values():
            layer.gate_enabled = False
        # The LM head is not adapted: run the decoder only when the model exposes it.
        body = model.get_decoder() if hasattr(model, "get_decoder") else model
        for batch in batches:
            ids, attention = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            mask[:] = [attention.bool()]
            tokens += int(mask[0].sum())
            body(input_ids=ids, attention_mask=attention)
    finally:
        for handle in handles:
            handle.remove()
        for name, layer in layers.items():
            layer.gate_enabled = previous[name]
    means = {name: (total / max(tokens, 1)).to("cpu", torch.float32)
             for name, total in sums.items()}
    return means, tokens
