"""A check of gaggle on a CUDA machine, printed as one table: training speed, routing cost, and
the coordinator's path.

    python -m bench.device_check            # on a machine with a CUDA GPU
    python -m bench.device_check --quick    # fewer steps, 8 and 64 experts

1. An expert (LoRA r=16 on every linear) and its gate trained on SmolLM2-135M in bf16 on the
   GPU: steps per second, and the wall time of 100 + 50 steps (target: under a minute).
2. Routing 8, 64 and 512 random experts (`bench.inference`'s synthetic router, bf16): the
   routed forward's time over the base's (targets: 1.15 at 8 experts, 1.5 at 512) and the
   naive per-expert loop's time over the routed one.
3. Submitting bundles over gRPC to an in-process coordinator and assembling them on Ray, on
   the tiny model (the coordinator's own cost does not depend on the GPU; it is checked to run).

Without a CUDA device it says so and exits 0: there is nothing to check.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import torch

TARGETS = {"routed_8": 1.15, "routed_512": 1.5}  # routed / base forward time, bf16
TRAIN_TARGET_S = 60.0  # 100 expert + 50 gate steps


def _sync(device: torch.device) -> None:
    """Wait for the device's queued work, so wall times cover it (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_check(base, steps: int, gate_steps: int) -> list[tuple[str, str, str]]:
    """Train an expert and its gate on arithmetic records; rows of (check, figure, target)."""
    from contributor.data import Example, tokenize
    from contributor.train import TrainConfig, train_expert, train_gates

    rng = random.Random(0)
    pairs = [(rng.randint(0, 99), rng.randint(0, 99)) for _ in range(512)]
    examples = tokenize([Example(f"{a} plus {b} is", f" {a + b}") for a, b in pairs],
                        base.tokenizer, 64)
    config = TrainConfig(steps=steps, gate_steps=gate_steps, activations=False,
                         max_length=64)
    _sync(base.device)
    started = time.perf_counter()
    expert, _ = train_expert(base, examples, config)
    _sync(base.device)
    expert_s = time.perf_counter() - started
    train_gates(base, expert, examples, config)
    _sync(base.device)
    total_s = time.perf_counter() - started
    gate_s = total_s - expert_s
    verdict = "ok" if total_s < TRAIN_TARGET_S * (steps + gate_steps) / 150 else "SLOW"
    return [("expert steps/s (SmolLM2, bf16, 8 x 64)", f"{steps / expert_s:.1f}", ""),
            ("gate steps/s", f"{gate_steps / gate_s:.1f}", ""),
            (f"expert + gate, {steps} + {gate_steps} steps", f"{total_s:.1f} s",
             f"< {TRAIN_TARGET_S * (steps + gate_steps) / 150:.0f} s {verdict}")]


def routing_check(base, counts: list[int], naive: int, rounds: int,
                  shape: tuple[int, int] = (16, 128)) -> list[tuple[str, ...]]:
    """Routed / base forward time per expert count, and the naive loop / routed."""
    from bench.inference import measure, routed_layers, summarise, synthetic_router

    tokens = torch.randint(0, base.model.config.vocab_size, shape,
                           generator=torch.Generator().manual_seed(0)).to(base.device)
    routed = {}
    for count in counts:
        weights = synthetic_router(base, count, rank=8)
        routed[f"routed_{count}"] = routed_layers(base, weights, top_k=2)
        del weights
    times, paired = measure(base, routed, tokens, rounds, naive_rounds=1, naive_experts=naive)
    rows = summarise(times, paired, naive)
    table = [(f"base forward, {shape[0]} x {shape[1]} tokens",
              f"{rows['base']['wall_s'] * 1e3:.1f} ms", "")]
    for count in counts:
        ratio = rows[f"routed_{count}"]["wall_ratio_to_base"]
        target = TARGETS.get(f"routed_{count}")
        verdict = "" if target is None else f"<= {target} {'ok' if ratio <= target else 'SLOW'}"
        table.append((f"routed / base, {count} experts", f"{ratio:.2f}", verdict))
    if f"naive_{naive}" in rows:
        speedup = rows[f"naive_{naive}"]["wall_routed_speedup"]
        table.append((f"naive loop / routed, {naive} experts", f"{speedup:.1f}", ""))
    return table


def coordinator_check(experts: int) -> list[tuple[str, str, str]]:
    """Submit `experts` tiny-model bundles over gRPC, then assemble them on Ray."""
    from contributor.client import Connection, CoordinatorClient
    from coordinator.server import CoordinatorServer, ServerConfig
    from coordinator.service.auth import TokenBook
    from coordinator.store.experts import Store
    from coordinator.versions.assemble import assemble_store, ensure_ray
    from protocol.bundle import save_bundle
    from routing.base import load_base
    from routing.synthetic import random_bundle

    spec = load_base("tiny-llama").spec()
    with tempfile.TemporaryDirectory(prefix="gaggle-device-check-") as scratch:
        root = Path(scratch)
        store = Store(root / "store")
        store.cache_base_spec(spec)
        token = TokenBook(store).add("check")
        store.close()
        folders = []
        for index in range(experts):
            bundle = random_bundle(spec, f"e{index}", seed=index, scale=0.1)
            save_bundle(bundle, root / f"e{index}")
            folders.append(root / f"e{index}")
        server = CoordinatorServer(ServerConfig(store=root / "store", base="tiny-llama",
                                                port=0, assembly=False))
        server.start()
        try:
            started = time.perf_counter()
            with CoordinatorClient(Connection(f"127.0.0.1:{server.port}", token)) as client:
                for folder in folders:
                    client.submit(folder)
            submit_s = time.perf_counter() - started
        finally:
            server.stop()
        ensure_ray()
        started = time.perf_counter()
        result = assemble_store(root / "store")
        assemble_s = time.perf_counter() - started
    return [(f"submit {experts} tiny bundles (gRPC)", f"{submit_s:.2f} s", ""),
            (f"assemble {experts} experts (Ray)", f"{assemble_s:.2f} s",
             f"version {result.version_id[:12]}")]


def print_table(title: str, rows: list[tuple[str, ...]]) -> None:
    print(f"\n{title}\n{'check':<44}{'figure':>12}  target")
    for check, figure, target in rows:
        print(f"{check:<44}{figure:>12}  {target}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="20 + 10 training steps, 8 and 64 experts, 2 rounds")
    parser.add_argument("--base", default="smollm2-135m")
    parser.add_argument("--device", default="cuda", help="the CUDA device (default cuda)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(f"no CUDA accelerator on this machine (torch {torch.__version__}, "
              f"CUDA build {torch.version.cuda or 'none'}): nothing to check; run "
              "bench/device_check.py on a machine with a CUDA GPU")
        return 0
    from routing.base import load_base

    base = load_base(args.base, device=args.device, dtype="bfloat16")
    name = torch.cuda.get_device_name(base.device)
    steps, gate_steps = (20, 10) if args.quick else (100, 50)
    rows = train_check(base, steps, gate_steps)
    counts = [8, 64] if args.quick else [8, 64, 512]
    rows += routing_check(base, counts, naive=64, rounds=2 if args.quick else 5)
    rows += coordinator_check(experts=8)
    print_table(f"gaggle device check: {name}, {args.base} in bf16, torch {torch.__version__}",
                rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
