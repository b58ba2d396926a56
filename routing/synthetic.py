"""Random but well-formed expert bundles, for tests and benchmarks that need many experts.

They carry no knowledge: LoRA factors and gates are seeded noise of a realistic size. Real
experts come from `contributor.train`.
"""

from __future__ import annotations

import torch

from protocol.bundle import BaseSpec, Bundle, Manifest, ModuleSpec

# peft's default (IA)^3 targets for Llama: k and v projections scale their output, the
# feed-forward down projection scales its input.
IA3_OUTPUT_MODULES = ("k_proj", "v_proj")
IA3_INPUT_MODULES = ("down_proj",)


def random_bundle(
    base: BaseSpec,
    name: str,
    *,
    method: str = "lora",
    rank: int = 4,
    alpha: float | None = None,
    seed: int = 0,
    modules: list[str] | None = None,
    with_activations: bool = False,
    scale: float = 0.1,
) -> Bundle:
    """A seeded random bundle adapting `modules` (default: every linear the method targets)."""
    generator = torch.Generator().manual_seed(seed)

    def noise(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * scale

    specs = _module_specs(base, method, modules)
    adapter: dict[str, torch.Tensor] = {}
    for spec in specs:
        if spec.kind == "lora":
            adapter[f"{spec.name}.lora_A"] = noise(rank, spec.d_in)
            adapter[f"{spec.name}.lora_B"] = noise(spec.d_out, rank)
        else:
            size = spec.d_out if spec.kind == "ia3_out" else spec.d_in
            adapter[f"{spec.name}.ia3"] = 1.0 + noise(size)
    gates = {spec.name: noise(spec.d_in) * 10 for spec in specs}
    activations = {spec.name: noise(spec.d_in) * 10 for spec in specs} \
        if with_activations else None
    alpha = float(rank) if alpha is None else alpha
    peft = ({"rank": rank, "alpha": alpha, "scaling": alpha / rank,
             "target_modules": sorted({s.name.rsplit(".", 1)[-1] for s in specs})}
            if method == "lora" else
            {"target_modules": sorted({s.name.rsplit(".", 1)[-1] for s in specs}),
             "feedforward_modules": list(IA3_INPUT_MODULES)})
    manifest = Manifest(
        name=name, base_model=base.name, base_fingerprint=base.fingerprint, method=method,
        peft=peft, modules=specs, training={"expert_steps": 0, "gate_steps": 0},
    )
    return Bundle(manifest=manifest, adapter=adapter, gates=gates, activations=activations)


def _module_specs(base: BaseSpec, method: str, modules: list[str] | None) -> list[ModuleSpec]:
    names = modules if modules is not None else [
        n for n in base.linears
        if method == "lora" or n.rsplit(".", 1)[-1] in IA3_OUTPUT_MODULES + IA3_INPUT_MODULES
    ]
    specs = []
    for name in names:
        d_in, d_out = base.linears[name]
        if method == "lora":
            kind = "lora"
        else:
            kind = "ia3_in" if name.rsplit(".", 1)[-1] in IA3_INPUT_MODULES else "ia3_out"
        specs.append(ModuleSpec(name=name, kind=kind, d_in=d_in, d_out=d_out))
    return specs
