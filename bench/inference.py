"""Inference cost of PHATGOOSE routing on SmolLM2-135M: base vs routed (8/64/512 experts) vs naive.

    python -m bench.inference            # full run, writes bench/results/inference.json
    python -m bench.inference --quick    # 8 and 64 experts, 2 rounds: < 1 minute; its JSON
                                         # goes to a temporary folder unless --out says

Experts are seeded random LoRA factors and gates (r=8 on all 210 linears, drawn like
routing.synthetic.random_bundle's), so the figures measure cost, not quality. Every round
times each configuration once, right after a forward of the base model it is compared with,
so load from other processes hits both alike; the ratio of each such pair is taken, then the
median over rounds. The naive loop is paired with the routed model of the same round. Both
wall and CPU seconds are kept: on a shared machine, `--threads 1` with CPU seconds gives the
steadiest ratios. The "best" ratios divide each configuration's fastest run by the base's
fastest: the runs least disturbed by other processes (cache and memory-bandwidth contention
inflate CPU seconds too). The load average before and after the run is recorded as well.
An untimed warm-up round runs every configuration once first (allocator, kernels, caches):
a first forward costs several times a warm one and would flatter whatever it is divided by.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from routing.base import BaseModel, load_base
from routing.layers import RoutedLinear, parameter_free_layer_norm
from routing.precision import PRECISIONS, for_scoring
from routing.router import route, unroute
from routing.stack import ModuleRouter, RouterWeights


def synthetic_router(base: BaseModel, count: int, rank: int, seed: int = 0) -> RouterWeights:
    """`count` random LoRA experts of rank `rank` on every linear, stacked directly.

    Same distributions as `routing.synthetic.random_bundle` (scaled Gaussian factors and
    gates), but drawn per module straight into the stacked tensors: 512 experts at r=8 on
    SmolLM2 are ~5 GB, and building 512 bundles first would double that and take minutes.
    Arrow prototypes are left at zero: this benchmark routes with the gates.
    """
    generator = torch.Generator().manual_seed(seed)
    names = [f"expert{e:03d}" for e in range(count)]
    modules = {}
    for module, (d_in, d_out) in base.spec().linears.items():
        modules[module] = ModuleRouter(
            name=module, d_in=d_in, d_out=d_out, experts=names, kinds=["lora"] * count,
            keys=torch.randn(count, d_in, generator=generator),
            prototypes=torch.zeros(count, d_in),
            scaling=torch.ones(count),  # alpha = r, as random_bundle's default
            lora_A=torch.randn(count, rank, d_in, generator=generator) * 0.05,
            # drawn row-major per expert, the routed layers' layout: no copy when routing
            lora_B=(torch.randn(count, rank, d_out, generator=generator) * 0.05).transpose(1, 2),
        )
    return RouterWeights(base_model=base.name, fingerprint=base.fingerprint, experts=names,
                         modules=modules)


class NaiveRoutedLinear(nn.Module):
    """Same top-k PHATGOOSE mixture, written as a Python loop over every expert."""

    def __init__(self, layer: RoutedLinear) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        out = layer.base(x)
        flat = x.reshape(-1, x.shape[-1])
        # scores in float32, as the routed layer takes them
        scores = parameter_free_layer_norm(flat.float()) @ layer.route_keys.T
        top, index = scores.topk(layer.top_k, dim=-1)
        weights = torch.zeros_like(scores).scatter_(1, index, torch.softmax(top, -1))
        weights = weights.to(out.dtype)
        delta = torch.zeros(flat.shape[0], out.shape[-1], dtype=out.dtype, device=out.device)
        for e in range(layer.lora_A.shape[0]):
            low = F.linear(flat, layer.lora_A[e])
            delta += (weights[:, e:e + 1] * layer.scaling[e]) * (low @ layer.lora_B_t[e])
        return out + delta.view_as(out)


def routed_layers(base: BaseModel, weights: RouterWeights, top_k: int,
                  **options) -> dict[str, nn.Module]:
    """Build the routed layers once (route, keep them, unroute) so rounds only swap modules."""
    model = route(base.model, weights, "phatgoose", top_k, fingerprint=base.fingerprint,
                  **options)
    layers = {name: module for name, module in model.named_modules()
              if isinstance(module, RoutedLinear)}
    unroute(model)
    return layers


def install(model: nn.Module, layers: dict[str, nn.Module], naive: bool = False) -> None:
    for name, layer in layers.items():
        model.set_submodule(name, NaiveRoutedLinear(layer) if naive else layer)


def uninstall(model: nn.Module, layers: dict[str, nn.Module]) -> None:
    for name, layer in layers.items():
        model.set_submodule(name, layer.base)


def timed_forward(model: nn.Module, tokens: torch.Tensor) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one forward pass; on a GPU the wall
    time waits for the device to finish."""
    on_gpu = tokens.device.type == "cuda"
    with torch.inference_mode():
        if on_gpu:
            torch.cuda.synchronize(tokens.device)
        wall, cpu = time.perf_counter(), time.process_time()
        model(tokens)
        if on_gpu:
            torch.cuda.synchronize(tokens.device)
        return time.perf_counter() - wall, time.process_time() - cpu


def measure(base: BaseModel, routed: dict[str, dict[str, nn.Module]], tokens: torch.Tensor,
            rounds: int, naive_rounds: int, naive_experts: int) -> tuple[dict, dict]:
    """Interleaved rounds: per round, for each configuration, a base forward then its own.

    Returns times (label -> [(wall, cpu)] per run) and paired (label -> the (wall, cpu) of
    the run its ratio divides by: the base forward just before, or for the naive loop the
    routed model of the same round).
    """
    model = base.model
    times: dict[str, list[tuple[float, float]]] = {"base": []}
    paired: dict[str, list[tuple[float, float]]] = {}
    this_round: list[str] = []

    def run(label: str, first: bool, warm_up: torch.Tensor = tokens) -> tuple[float, float]:
        if first:
            timed_forward(model, warm_up)  # allocator and kernels for these shapes
        times.setdefault(label, []).append(timed_forward(model, tokens))
        this_round.append(f"{label} {times[label][-1][1]:.2f}")
        return times[label][-1]

    timed_forward(model, tokens)  # the warm-up round: the base, then every configuration
    for layers in routed.values():
        install(model, layers)
        timed_forward(model, tokens)
        uninstall(model, layers)
    for round_index in range(rounds):
        first = round_index == 0
        for label, layers in routed.items():
            base_run = run("base", first)
            install(model, layers)
            paired.setdefault(label, []).append(base_run)
            routed_run = run(label, first)
            uninstall(model, layers)
            if label == f"routed_{naive_experts}" and round_index < naive_rounds:
                install(model, layers, naive=True)
                paired.setdefault(f"naive_{naive_experts}", []).append(routed_run)
                # warmed on one example: its first full forward measured no slower than
                # its second (11.5 vs 11.7 CPU s), and a full one would double its cost
                run(f"naive_{naive_experts}", first, warm_up=tokens[:1])
                uninstall(model, layers)
        print(f"  round {round_index + 1}/{rounds} (CPU s): " + ", ".join(this_round),
              flush=True)
        this_round.clear()
    return times, paired


def summarise(times: dict[str, list[tuple[float, float]]],
              paired: dict[str, list[tuple[float, float]]], naive_experts: int) -> dict:
    """Medians of wall and CPU time; medians of the paired ratios; ratios of the fastest runs."""
    rows = {}
    naive = f"naive_{naive_experts}"
    for label, values in times.items():
        row = {"runs": [{"wall_s": w, "cpu_s": c} for w, c in values]}
        pairs = paired.get(label)
        for slot, clock in ((0, "wall"), (1, "cpu")):
            row[f"{clock}_s"] = statistics.median(v[slot] for v in values)
            fastest_base = min(b[slot] for b in times["base"])
            row[f"{clock}_best_ratio_to_base"] = min(v[slot] for v in values) / fastest_base
            if label == naive:  # paired with the routed model; to the base run before it
                routed = times[f"routed_{naive_experts}"]
                row[f"{clock}_ratio_to_base"] = statistics.median(
                    n[slot] / b[slot] for n, b in
                    zip(values, paired[f"routed_{naive_experts}"], strict=False))
                row[f"{clock}_routed_speedup"] = statistics.median(
                    n[slot] / r[slot] for n, r in zip(values, pairs, strict=True))
                row[f"{clock}_best_routed_speedup"] = (min(n[slot] for n in values)
                                                       / min(r[slot] for r in routed))
            elif pairs is None:
                row[f"{clock}_ratio_to_base"] = 1.0
            else:
                row[f"{clock}_ratio_to_base"] = statistics.median(
                    v[slot] / b[slot] for v, b in zip(values, pairs, strict=True))
        if pairs is not None:
            for run, pair in zip(row["runs"], pairs, strict=True):
                run["paired_wall_s"], run["paired_cpu_s"] = pair
        rows[label] = row
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 and 64 experts, 2 rounds")
    parser.add_argument("--experts", type=int, nargs="+", default=None,
                        help="expert counts (default 8 64 512; quick: 8 64)")
    parser.add_argument("--naive-experts", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=None, help="default 7, quick 2")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's choice); 1 gives the steadiest "
                        "CPU-time ratios on a busy machine")
    parser.add_argument("--base", default="smollm2-135m")
    parser.add_argument("--device", default="cpu", metavar="auto|cpu|cuda[:N]|mps",
                        help="where the base and routed models run (default cpu)")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32",
                        help="weights and compute of every configuration alike; bf16 (or auto "
                        "where the CPU runs bf16 natively) casts the base model and so the "
                        "routed layers")
    parser.add_argument("--out", type=Path, default=None,
                        help="results JSON (default bench/results/inference.json; with --quick "
                        "a temporary folder, so a quick run writes nothing in the checkout)")
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = (Path(tempfile.mkdtemp(prefix="gaggle-inference-")) if args.quick
                    else Path("bench/results")) / "inference.json"
    rounds = args.rounds or (2 if args.quick else 7)
    counts = args.experts or ([8, 64] if args.quick else [8, 64, 512])
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    load_before = os.getloadavg()
    base = load_base(args.base, device=args.device)
    precision = for_scoring(base.model, args.precision, base.device.type)
    tokens = torch.randint(0, base.model.config.vocab_size, (args.batch, args.tokens),
                           generator=torch.Generator().manual_seed(0)).to(base.device)
    routed = {}
    for count in counts:
        # the RouterWeights are dropped once the layers exist: only the layers' tensors stay
        weights = synthetic_router(base, count, args.rank)
        routed[f"routed_{count}"] = routed_layers(base, weights, args.top_k)
        del weights
        print(f"built {count} experts ({time.perf_counter() - started:.0f}s)", flush=True)
    times, paired = measure(base, routed, tokens, rounds,
                            naive_rounds=1 if args.quick else 3,
                            naive_experts=args.naive_experts)
    rows = summarise(times, paired, args.naive_experts)
    print_table(rows)
    result = {"base_model": args.base, "device": str(base.device), "batch": args.batch,
              "tokens": args.tokens,
              "rank": args.rank, "top_k": args.top_k, "rounds": rounds,
              "precision": precision,
              "threads": torch.get_num_threads(), "torch": torch.__version__,
              "results": rows, "wall_s": time.perf_counter() - started,
              "load_average": {"before": load_before, "after": os.getloadavg()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print("load average (1, 5, 15 min): before " + " ".join(f"{v:.1f}" for v in load_before)
          + ", after " + " ".join(f"{v:.1f}" for v in result["load_average"]["after"]))
    print(f"wrote {args.out} ({result['wall_s']:.0f}s)")
    return 0


def print_table(rows: dict) -> None:
    print(f"\n{'configuration':<18}{'wall s':>8}{'x base':>8}{'cpu s':>8}{'x base':>8}"
          f"{'best x':>8}  note")
    for label, row in rows.items():
        note = ""
        if "cpu_routed_speedup" in row:
            note = (f"routed is {row['cpu_routed_speedup']:.1f}x faster (cpu), "
                    f"{row['cpu_best_routed_speedup']:.1f}x (cpu, best rounds), "
                    f"{row['wall_routed_speedup']:.1f}x (wall)")
        print(f"{label:<18}{row['wall_s']:>8.3f}{row['wall_ratio_to_base']:>8.2f}"
              f"{row['cpu_s']:>8.3f}{row['cpu_ratio_to_base']:>8.2f}"
              f"{row['cpu_best_ratio_to_base']:>8.2f}  {note}")


if __name__ == "__main__":
    raise SystemExit(main())
