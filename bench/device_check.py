"""A check of gaggle on a CUDA machine, printed as one table: training speed, routing cost, and
the coordinator's path.

    python -m bench.device_check            # on a machine with a CUDA GPU
    python -m bench.device_check --quick    # fewer steps, 8 and 64 experts

1. An expert (LoRA r=16 on every linear) and its gate trained on SmolLM2-135M in bf16 on the
   GPU: steps per second, and the wall time of 100 + 50 steps (target: under a minute).
2. Routing 8, 64 and 512 random experts (`bench.inference`'s synthetic router, bf16): the
   routed forward's time over the base's (targets: 1.15 at 8 experts, 1.5 at 512) and the
   naive per-expert loop's time over the routed one.
3. One LoRA expert routed top-1 against the same adapter through peft, on the GPU: in float32
   the two agree to rounding; in bf16 the routed model is checked to stray from the float32
   peft logits no further than peft in bf16 does.
4. Submitting bundles over gRPC to an in-process coordinator and assembling them on Ray, on
   the tiny model (the coordinator's own cost does not depend on the GPU; it is checked to run,
   where Ray is installed).

`--shape FOLDER` builds the base from FOLDER's config.json and tokenizer with seeded random
weights (`routing.base.random_base`): for a GPU machine the packaged SmolLM2 checkpoint cannot
reach. Speed does not depend on the weights' values, and the exactness check holds for any.
Without a CUDA device it says so and exits 0: there is nothing to check.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import random
import tempfile
import time
from pathlib import Path

import torch

TARGETS = {"routed_8": 1.15, "routed_512": 1.5}  # routed / base forward time, bf16
TRAIN_TARGET_S = 60.0  # 100 expert + 50 gate steps
LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _sync(device: torch.device) -> None:
    """Wait for the device's queued work, so wall times cover it (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _tokens(base, shape: tuple[int, int]) -> torch.Tensor:
    """Seeded random token ids of `shape` on the base's device."""
    return torch.randint(0, base.model.config.vocab_size, shape,
                         generator=torch.Generator().manual_seed(0)).to(base.device)


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

    tokens = _tokens(base, shape)
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


def exactness_check(load) -> list[tuple[str, str, str]]:
    """One LoRA expert (r=16, every linear) routed top-1 against peft; `load(dtype)` gives the
    base on the GPU in that dtype."""
    from peft import LoraConfig, get_peft_model

    from contributor.package import bundle_from_peft
    from routing.router import route, unroute

    full = load("float32")
    torch.manual_seed(3)
    config = LoraConfig(r=16, lora_alpha=32, target_modules=LINEARS, lora_dropout=0.0,
                        init_lora_weights=False)
    peft_model = get_peft_model(copy.deepcopy(full.model), config).eval()
    bundle = bundle_from_peft(peft_model, full, "check")
    gen = torch.Generator().manual_seed(4)  # one expert wins top-1 whatever its gates say
    bundle.gates = {m: torch.randn(g.shape, generator=gen) for m, g in bundle.gates.items()}
    tokens = torch.randint(0, full.model.config.vocab_size, (4, 64),
                           generator=torch.Generator().manual_seed(0)).to(full.device)

    def logits(model) -> torch.Tensor:
        with torch.inference_mode():
            return model(tokens).logits.float()

    reference = logits(peft_model)
    peft_half = logits(peft_model.to(torch.bfloat16))
    del peft_model
    base_delta = (reference - logits(full.model)).abs().max().item()
    routed = logits(route(full, [bundle], "phatgoose", top_k=1))
    unroute(full.model)
    del full
    half = load("bfloat16")
    routed_half = logits(route(half, [bundle], "phatgoose", top_k=1))
    unroute(half.model)
    scale = reference.abs().max().item()
    fp32_error = (routed - reference).abs().max().item() / scale
    peft_error = (peft_half - reference).abs().max().item()
    bf16_ratio = (routed_half - reference).abs().max().item() / peft_error
    agree = (routed_half.argmax(-1) == reference.argmax(-1)).float().mean().item()
    return [("routed - peft, fp32 (max |diff| / max |logit|)", f"{fp32_error:.1e}",
             f"< 1e-4 {'ok' if fp32_error < 1e-4 else 'OFF'}"),
            ("  the adapter's own effect (max |diff|)", f"{base_delta:.2f}", "not a no-op"),
            ("bf16 routed error / bf16 peft error", f"{bf16_ratio:.2f}",
             f"<= 2 {'ok' if bf16_ratio <= 2 else 'OFF'}"),
            ("bf16 routed top token = fp32 peft's", f"{agree:.1%}", "")]


def coordinator_check(experts: int) -> list[tuple[str, str, str]]:
    """Submit `experts` tiny-model bundles over gRPC, then assemble them on Ray."""
    if importlib.util.find_spec("ray") is None:
        return [("submit and assemble (gRPC, Ray)", "skipped", "Ray is not installed here")]
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
        store = Store(root / "store")
        result = assemble_store(store)
        store.close()
        assemble_s = time.perf_counter() - started
    return [(f"submit {experts} tiny bundles (gRPC)", f"{submit_s:.2f} s", ""),
            (f"assemble {experts} experts (Ray)", f"{assemble_s:.2f} s",
             f"version {result.version_id[:12]}")]


def profile_check(base, experts: int = 8, shape: tuple[int, int] = (16, 128)) -> None:
    """Where a forward's time goes on the GPU: kernel launches and the ops that spend the most
    host time, for the base and for `experts` routed experts (after one warm-up each)."""
    from torch.profiler import ProfilerActivity, profile

    from bench.inference import install, routed_layers, synthetic_router, uninstall

    tokens = _tokens(base, shape)
    layers = routed_layers(base, synthetic_router(base, experts, rank=8), top_k=2)
    for label, routed in (("base", False), (f"routed_{experts}", True)):
        if routed:
            install(base.model, layers)
        with torch.inference_mode():
            base.model(tokens)
            _sync(base.device)
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                base.model(tokens)
                _sync(base.device)
        if routed:
            uninstall(base.model, layers)
        events = prof.key_averages()
        launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel",
                                                           "cuLaunchKernel", "cudaLaunchKernelExC"))
        gpu_us = sum(e.self_device_time_total for e in events)
        print(f"\n{label}: {launches} kernel launches, {gpu_us / 1e3:.1f} ms of GPU time")
        print(events.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=40))


def graph_check(base, counts: list[int], shape: tuple[int, int] = (16, 128),
                replays: int = 20) -> list[tuple[str, str, str]]:
    """The forward captured once as a CUDA graph and replayed: what routing costs on the GPU
    once the host's kernel launches are taken out (a probe for a consumer-side graph mode)."""
    from bench.inference import install, routed_layers, synthetic_router, uninstall

    tokens = _tokens(base, shape)

    def replay_ms() -> float:
        with torch.inference_mode():
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    base.model(tokens, use_cache=False)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                base.model(tokens, use_cache=False)
            graph.replay()
            _sync(base.device)
            started = time.perf_counter()
            for _ in range(replays):
                graph.replay()
            _sync(base.device)
        return (time.perf_counter() - started) / replays * 1e3

    base_ms = replay_ms()
    rows = [(f"graph replay, base, {shape[0]} x {shape[1]}", f"{base_ms:.2f} ms", "")]
    for count in counts:
        layers = routed_layers(base, synthetic_router(base, count, rank=8), top_k=2)
        install(base.model, layers)
        try:
            figure = f"{replay_ms() / base_ms:.2f}"
        except RuntimeError as err:  # a host sync or a data-dependent shape inside
            figure = f"fails: {str(err).splitlines()[0][:60]}"
        finally:
            uninstall(base.model, layers)
        target = TARGETS.get(f"routed_{count}")
        rows.append((f"graph replay, routed / base, {count} experts", figure,
                     "" if target is None else f"<= {target}"))
    return rows


def print_table(title: str, rows: list[tuple[str, ...]]) -> None:
    print(f"\n{title}\n{'check':<44}{'figure':>12}  target")
    for check, figure, target in rows:
        print(f"{check:<44}{figure:>12}  {target}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="20 + 10 training steps, 8 and 64 experts, 2 rounds")
    parser.add_argument("--base", default="smollm2-135m")
    parser.add_argument("--shape", type=Path, metavar="FOLDER",
                        help="build the base from FOLDER's config.json and tokenizer with "
                             "random weights, instead of loading --base")
    parser.add_argument("--device", default="cuda", help="the CUDA device (default cuda)")
    parser.add_argument("--profile", action="store_true",
                        help="only profile one base and one routed forward (kernel launches, "
                             "host time per op) and exit")
    parser.add_argument("--graphs", action="store_true",
                        help="only time base and routed forwards replayed as CUDA graphs, "
                             "and exit")
    parser.add_argument("--json", type=Path, metavar="FILE",
                        help="also write the table to FILE as JSON")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(f"no CUDA accelerator on this machine (torch {torch.__version__}, "
              f"CUDA build {torch.version.cuda or 'none'}): nothing to check; run "
              "bench/device_check.py on a machine with a CUDA GPU")
        return 0
    from routing.base import load_base, random_base

    def load(dtype: str):
        if args.shape is not None:
            return random_base(args.shape, device=args.device, dtype=dtype)
        return load_base(args.base, device=args.device, dtype=dtype)

    base = load("bfloat16")
    if args.profile:
        profile_check(base)
        return 0
    if args.graphs:
        print_table("CUDA graphs", graph_check(base, [8, 64, 512]))
        return 0
    name = torch.cuda.get_device_name(base.device)
    described = (f"{args.shape.name} shape with random weights" if args.shape is not None
                 else args.base)
    steps, gate_steps = (20, 10) if args.quick else (100, 50)
    rows = train_check(base, steps, gate_steps)
    counts = [8, 64] if args.quick else [8, 64, 512]
    rows += routing_check(base, counts, naive=64, rounds=2 if args.quick else 5)
    del base
    rows += exactness_check(load)
    rows += coordinator_check(experts=8)
    title = f"gaggle device check: {name}, {described} in bf16, torch {torch.__version__}"
    print_table(title, rows)
    if args.json is not None:
        args.json.write_text(json.dumps({"title": title, "rows": rows}, indent=1) + "\n",
                             encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
