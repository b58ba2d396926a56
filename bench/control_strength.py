"""How strong is the `random_experts` control's adapter next to the trained one it replaces?

The control (routing.controls.random_experts) draws each LoRA factor at random with the
trained factor's Frobenius norm. Random factors are not aligned with each other nor with the
inputs the module sees, so their product moves the module's output less than the trained
product does. For each LoRA module of each bundle this prints, over the modules, the median and
the 10th-90th percentiles of two ratios, random over trained:

- ||B' A'||_F / ||B A||_F, the size of the weight change;
- ||B' A' mu|| / ||B A mu||, the change of the output on the expert's own mean activation
  `mu` (the activations file every bundle ships).

    python -m bench.control_strength BUNDLE_DIR [BUNDLE_DIR ...] [--seed 0]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from protocol.bundle import load_bundle
from routing.controls import random_like


def ratios(bundle, seed: int = 0) -> dict[str, list[float]]:
    """Per LoRA module of `bundle`: the weight-change and output-change ratios."""
    generator = torch.Generator().manual_seed(seed)
    weight, output = [], []
    for key, a in sorted(bundle.adapter.items()):
        if not key.endswith(".lora_A"):
            continue
        module = key[: -len(".lora_A")]
        b = bundle.adapter[f"{module}.lora_B"]
        # the control's own draw, one expert's row at a time (dim 0 is the expert there)
        a_random = random_like(a.unsqueeze(0), generator)[0]
        b_random = random_like(b.unsqueeze(0), generator)[0]
        trained, random = b @ a, b_random @ a_random
        weight.append(float(random.norm() / trained.norm()))
        if bundle.activations is not None and module in bundle.activations:
            mu = bundle.activations[module].float().flatten()
            output.append(float((random @ mu).norm() / (trained @ mu).norm()))
    return {"weight": weight, "output": output}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bundles", nargs="+", help="bundle folders (a LoRA expert each)")
    parser.add_argument("--seed", type=int, default=0, help="the random draw's seed")
    args = parser.parse_args(argv)
    for path in args.bundles:
        bundle = load_bundle(path)
        found = ratios(bundle, args.seed)
        if not found["weight"]:
            print(f"{bundle.name}: no LoRA modules")
            continue
        cells = []
        for what, values in found.items():
            if values:
                p10, median, p90 = np.percentile(values, [10, 50, 90])
                cells.append(f"{what} {median:.3f} [{p10:.3f}, {p90:.3f}]")
        print(f"{bundle.name} ({len(found['weight'])} modules): " + "; ".join(cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
