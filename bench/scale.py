"""Growth to thousands of real-size experts, end to end on this machine.

    python -m bench.scale                          # 64, 256, 512 and 1,000 experts: hours
    python -m bench.scale --experts 8,16 --quick   # the same measurements, minutes; writes
                                                   # nothing under bench/results

Every expert is what a contributor's defaults ship: LoRA rank 16 on all 210 linears of
SmolLM2-135M with gates and mean activations (routing.synthetic.random_bundle, seeded, 20.8 MB).
They arrive one at a time at a real `gaggle-coordinator serve` process tracking into its
embedded MLflow: each is submitted over gRPC when the previous one's version is current and
its usage check has run, so every arrival makes a version. Per arrival it records the seconds
from acceptance to the version being current and to its check being done. At each checkpoint
(after N arrivals, tracking caught up) it records:
- the bytes the store and MLflow's artifacts hold (a file hard-linked into both counted
  once), against the archive bytes sent;
- the coordinator process's peak resident memory (VmHWM);
- a consumer process loading the current version, from the store and through MLflow
  (`models:/gaggle-router@latest`): seconds and resident memory over the loaded base; up to
  256 experts, its logits and top-k choices against the all-in-memory router's;
- at 512 and more: routed/base forward time in float32 and bf16 (8 x 64 tokens, median of
  paired rounds), paged within the default bound and within one that holds every expert,
  and at 512 the all-in-memory router too (the paging cost).

Restartable: the work folder (--work) keeps the store, `arrivals.jsonl` and each finished
checkpoint, so a rerun continues where the last one stopped.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from tests.harness.servers import wait_for

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINTS = (64, 256, 512, 1000)
BASE = "smollm2-135m"
RANK = 16
CONTRIBUTORS = 8  # arrivals are spread over this many contributors' tokens
FORWARD_SHAPE = (8, 64)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", default=",".join(map(str, CHECKPOINTS)),
                        help="checkpoints: measure after this many arrivals (comma-separated)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/gaggle-scale"),
                        help="store, bundles and progress (about 22 MB per expert)")
    parser.add_argument("--out", type=Path, help="results folder (default bench/results/scale;"
                        " with --quick, WORK/results)")
    parser.add_argument("--quick", action="store_true",
                        help="one forward round, no MLflow consumer: a smoke run")
    parser.add_argument("--report-only", action="store_true",
                        help="write --out from the checkpoints the work folder holds so far")
    parser.add_argument("--base", default=BASE, help=argparse.SUPPRESS)
    parser.add_argument("--consumer", nargs=3, metavar=("MODE", "STORE", "OUT"),
                        help=argparse.SUPPRESS)  # a child process: store | mlflow | forward
    args = parser.parse_args(argv)
    args.checkpoints = sorted({int(n) for n in args.experts.split(",")})
    args.out = args.out or (args.work / "results" if args.quick else
                            ROOT / "bench" / "results" / "scale")
    return args


# ----- the arrivals ------------------------------------------------------------------------

def arrive(args: argparse.Namespace) -> None:
    """Submit experts one at a time up to the last checkpoint, measuring at each."""
    from contributor.client import Connection, CoordinatorClient
    from routing.base import load_base
    from tests.harness.servers import add_token, seed_base_spec, start_coordinator

    work = args.work
    store = work / "store"
    done = _read_lines(work / "arrivals.jsonl")
    spec = load_base(args.base).spec()
    seed_base_spec(store, spec)
    tokens = {f"c{i:02d}": add_token(store, f"c{i:02d}") for i in range(CONTRIBUTORS)}
    server = start_coordinator(store, base=args.base, log_path=work / "serve.log",
                               timeout=600)
    try:
        for index in range(len(done), args.checkpoints[-1]):
            contributor = f"c{index % CONTRIBUTORS:02d}"
            with CoordinatorClient(Connection(f"127.0.0.1:{server.port}",
                                              tokens[contributor])) as client:
                record = _one_arrival(client, spec, store, work, index)
            record["load"] = os.getloadavg()[0]
            _append(work / "arrivals.jsonl", record)
            print(f"[scale {time.strftime('%H:%M:%S')}] expert {index + 1}: current "
                  f"{record['current_s']:.1f} s, checked {record['checked_s']:.1f} s after "
                  "acceptance", flush=True)
            if index + 1 in args.checkpoints:
                checkpoint(args, server, index + 1)
    finally:
        server.stop(timeout=120)


def _one_arrival(client, spec, store: Path, work: Path, index: int) -> dict:
    from protocol.bundle import save_bundle
    from routing.synthetic import random_bundle

    folder = work / "outbox" / f"e{index:04d}"
    shutil.rmtree(folder, ignore_errors=True)
    bundle = random_bundle(spec, f"e{index:04d}", rank=RANK, seed=index, scale=0.01,
                           with_activations=True)
    save_bundle(bundle, folder)
    started = time.monotonic()
    result = client.submit(folder)
    accepted = time.monotonic()
    shutil.rmtree(folder)
    version = wait_for(lambda: _current_with(store, result.expert_id), 1800, "its version")
    current = time.monotonic()
    wait_for(lambda: (store / "versions" / version / "usage.json").is_file(), 1800, "its check")
    return {"index": index, "expert_id": result.expert_id, "bytes": result.size_bytes,
            "upload_s": accepted - started, "current_s": current - accepted,
            "checked_s": time.monotonic() - accepted, "version": version}


def _current_with(store: Path, expert_id: str) -> str | None:
    from coordinator.store.versions import VersionStore

    try:
        versions = VersionStore(store)
        current = versions.current_id()
        return current if current and expert_id in versions.manifest(current).expert_ids \
            else None
    except (OSError, ValueError):  # a pointer being replaced: look again
        return None


# ----- a checkpoint --------------------------------------------------------------------------

def checkpoint(args: argparse.Namespace, server, experts: int) -> None:
    """Measure storage, the coordinator's memory and a consumer, once tracking caught up."""
    from coordinator.tracking.queue import OpQueue

    path = args.work / "checkpoints" / f"{experts}.json"
    if path.is_file():
        return
    store = args.work / "store"
    queue = OpQueue(store / "tracking")
    wait_for(lambda: queue.counts()["pending"] == 0, 3600, "tracking to catch up")
    arrivals = _read_lines(args.work / "arrivals.jsonl")[:experts]
    result = {"experts": experts, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "sent_bytes": sum(a["bytes"] for a in arrivals),
              "failed_tracking_calls": queue.counts()["failed"],
              **storage(store), "coordinator_peak_rss_mb": _peak_rss_mb(server.pid),
              "latency": _latency(arrivals)}
    result["stored_over_sent"] = result["unique_bytes"] / result["sent_bytes"]
    modes = ["store"] + ([] if args.quick else ["mlflow"])
    if experts >= 512 or args.quick:
        modes.append("forward")
    for mode in modes:
        result[mode] = _child(args, mode, store)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1), flush=True)


def storage(store: Path) -> dict:
    """Bytes under the store (without its MLflow folder) and under MLflow's, a hard-linked
    file counted once, in the store."""
    seen: set[tuple[int, int]] = set()

    def walk(folder: Path, skip: Path | None = None) -> tuple[int, int]:
        unique = apparent = 0
        for path in folder.rglob("*"):
            if skip is not None and skip in path.parents or not path.is_file():
                continue
            stat = path.stat()
            apparent += stat.st_size
            if (stat.st_dev, stat.st_ino) not in seen:
                seen.add((stat.st_dev, stat.st_ino))
                unique += stat.st_size
        return unique, apparent

    store_bytes, _ = walk(store, skip=store / "mlflow")
    mlflow_unique, mlflow_apparent = walk(store / "mlflow")
    kinds = {kind: sum(p.stat().st_size for p in (store / kind).rglob("*") if p.is_file())
             for kind in ("experts", "keys", "versions")}
    return {"store_bytes": store_bytes, "mlflow_bytes_apparent": mlflow_apparent,
            "mlflow_bytes_added": mlflow_unique, "unique_bytes": store_bytes + mlflow_unique,
            "store_kinds": kinds}


def _latency(arrivals: list[dict]) -> dict:
    last = arrivals[-min(8, len(arrivals)):]  # the newest arrivals: the federation at size
    return {"current_s_median_last8": statistics.median(a["current_s"] for a in last),
            "checked_s_median_last8": statistics.median(a["checked_s"] for a in last),
            "checked_s_max": max(a["checked_s"] for a in arrivals)}


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _child(args: argparse.Namespace, mode: str, store: Path) -> dict:
    """Run one consumer measurement in a fresh process (its memory is its own)."""
    out = args.work / "checkpoints" / f"{mode}.tmp.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    command = [sys.executable, "-m", "bench.scale", "--consumer", mode, str(store), str(out),
               "--base", args.base] + (["--quick"] if args.quick else [])
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})
    if done.returncode != 0:
        return {"error": (done.stderr or done.stdout).strip().splitlines()[-3:]}
    return json.loads(out.read_text())


# ----- the consumer side (child processes) --------------------------------------------------

def consumer(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(2)
    mode, store, out = args.consumer
    measure = {"store": consumer_store, "mlflow": consumer_mlflow, "forward": forward}[mode]
    Path(out).write_text(json.dumps(measure(Path(store), args)))


def consumer_store(store: Path, args: argparse.Namespace) -> dict:
    """Load the current version from the store and route the base with it; up to 256
    experts, compare with the all-in-memory router."""
    import torch

    from coordinator.store.versions import VersionStore
    from routing.base import load_base
    from routing.router import route, unroute

    base = load_base(args.base)
    tokens = _tokens(base)
    with torch.inference_mode():  # the forward's own memory belongs to the base's share
        base.model(tokens)
    before = _rss_mb()
    started = time.perf_counter()
    versions = VersionStore(store)
    version_id = os.environ.get("GAGGLE_SCALE_VERSION") or versions.current_id()
    weights = versions.router(version_id)
    route(base, weights)
    loaded = time.perf_counter() - started
    paged, paged_choices = _run(base.model, tokens)
    result = {"experts": len(weights.experts), "load_s": loaded,
              "rss_over_base_mb": _rss_mb() - before,
              "keys_mb": sum(m.keys.numel() * 4 for m in weights.modules.values()) / 2**20,
              "paging_bound_mb": weights.adapters.max_bytes / 2**20}
    unroute(base.model)
    if len(weights.experts) <= 256:
        eager = _in_memory(versions, version_id)
        route(base, eager)
        expected, choices = _run(base.model, tokens)
        unroute(base.model)
        result["max_abs_logit_diff"] = float((paged - expected).abs().max())
        result["same_top_k"] = all(torch.equal(paged_choices[m], choices[m]) for m in choices)
        differ = sum(int((paged_choices[m] != choices[m]).any(-1).sum()) for m in choices)
        total = sum(choices[m].shape[0] for m in choices)
        result["top_k_differ_share"] = differ / max(total, 1)  # near-ties in float32
    return result


def consumer_mlflow(store: Path, args: argparse.Namespace) -> dict:
    """`mlflow.pyfunc.load_model("models:/gaggle-router@latest")` on the embedded MLflow."""
    import mlflow

    from coordinator.tracking.tracker import default_tracking_uri
    from routing.base import load_base

    load_base(args.base)  # the base is not what is measured: loaded first, and cached
    uri = default_tracking_uri(store)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    before = _rss_mb()
    started = time.perf_counter()
    model = mlflow.pyfunc.load_model("models:/gaggle-router@latest")
    loaded = time.perf_counter() - started
    texts = model.predict(["The movie was"], params={"max_new_tokens": 4})
    return {"load_s": loaded, "rss_over_base_mb": _rss_mb() - before, "answer": texts[0],
            "note": "RSS includes a second copy of the base model: the pyfunc loads its own"}


def forward(store: Path, args: argparse.Namespace) -> dict:
    """routed/base forward seconds, float32 and bf16: paged in the default bound, paged in a
    bound holding every expert, and (up to 512 experts) the all-in-memory router."""
    import torch

    from coordinator.store.versions import VersionStore
    from routing.base import load_base
    from routing.paging import DEFAULT_MAX_BYTES

    versions = VersionStore(store)
    version_id = versions.current_id()
    count = len(versions.manifest(version_id).experts)
    every = int(count * 21.5e6)  # bytes of every expert's factors (as float32), with room
    rounds = 1 if args.quick else 3
    result = {"experts": count, "tokens": list(FORWARD_SHAPE), "rounds": rounds,
              "cpu": _cpu(), "threads": torch.get_num_threads()}
    for precision in ("float32", "bfloat16"):
        base = load_base(args.base, dtype=precision)
        tokens = _tokens(base)
        row = {}
        for label, build in (
                ("paged_default", lambda: versions.router(version_id,
                                                          max_adapter_bytes=DEFAULT_MAX_BYTES)),
                ("paged_all", lambda: versions.router(version_id, max_adapter_bytes=every)),
                ("in_memory", lambda p=precision: _in_memory(versions, version_id, p))):
            need = every * (1 if label == "paged_all" else 2 if precision == "float32" else 1)
            if label != "paged_default" and need > 0.6 * _available_bytes():
                row[label] = {"skipped": f"needs ~{need / 1e9:.0f} GB of memory"}
                continue
            row[label] = _timed(base, build(), tokens, rounds)
            gc.collect()
        result[precision] = row
        del base
    return result


def _timed(base, weights, tokens, rounds: int) -> dict:
    """Median over rounds of routed/base, each round a base forward then a routed one; the
    first routed forward (paging every picked expert in) is timed apart as the cold one."""
    import torch

    from routing.router import route, unroute

    def once(model) -> float:
        started = time.perf_counter()
        with torch.inference_mode():
            model(tokens)
        return time.perf_counter() - started

    once(base.model)  # warm-up of the base
    route(base, weights)
    cold = once(base.model)
    ratios, routed_s, base_s = [], [], []
    for _ in range(rounds):
        unroute(base.model)
        base_s.append(once(base.model))
        route(base, weights)
        routed_s.append(once(base.model))
        ratios.append(routed_s[-1] / base_s[-1])
    unroute(base.model)
    return {"routed_over_base": statistics.median(ratios), "routed_s": min(routed_s),
            "base_s": min(base_s), "cold_routed_s": cold}


def _in_memory(versions, version_id: str, precision: str = "float32"):
    """Every expert stacked in memory (routing.stack), as versions were before paging."""
    import torch

    from protocol.bundle import load_bundle
    from routing.stack import stack_experts

    manifest = versions.manifest(version_id)
    bundles = [load_bundle(versions.objects.local_folder("experts", i), mapped=True)
               for i in manifest.expert_ids]
    weights = stack_experts(bundles, names=manifest.names)
    del bundles
    if precision != "float32":  # cast module by module: never a second full copy
        dtype = getattr(torch, precision)
        for module in weights.modules.values():
            module.lora_A = module.lora_A.to(dtype)
            module.lora_B = module.lora_B.transpose(1, 2).contiguous().to(dtype).transpose(1, 2)
    return weights


def _run(model, tokens):
    import torch

    from routing.trace import capture_routing

    with torch.inference_mode(), capture_routing(model) as trace:
        logits = model(tokens).logits.float()
    return logits, {m: trace.choices(m) for m in trace.records}


def _tokens(base):
    import torch

    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, len(base.tokenizer), FORWARD_SHAPE, generator=generator)


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


# ----- helpers and the report ------------------------------------------------------------------

def _read_lines(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _append(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def report(args: argparse.Namespace) -> None:
    """results.json (every checkpoint and arrival) and results.md (the table) in --out."""
    points = [json.loads((args.work / "checkpoints" / f"{n}.json").read_text())
              for n in args.checkpoints if (args.work / "checkpoints" / f"{n}.json").is_file()]
    args.out.mkdir(parents=True, exist_ok=True)
    arrivals = _read_lines(args.work / "arrivals.jsonl")
    (args.out / "results.json").write_text(json.dumps(
        {"cpu": _cpu(), "base": args.base, "rank": RANK, "checkpoints": points,
         "arrivals": arrivals}, indent=1))
    lines = ["| experts | stored / sent | store GB | MLflow adds GB | current after accept (s) "
             "| checked after accept (s) | coordinator peak RSS (GB) | consumer load (s) "
             "| consumer RSS over base (GB) | via MLflow load (s) |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for p in points:
        store, mlf = p.get("store", {}), p.get("mlflow", {})
        lines.append(
            f"| {p['experts']} | {p['stored_over_sent']:.3f} | {p['store_bytes'] / 1e9:.2f} "
            f"| {p['mlflow_bytes_added'] / 1e9:.3f} "
            f"| {p['latency']['current_s_median_last8']:.1f} "
            f"| {p['latency']['checked_s_median_last8']:.1f} "
            f"| {p['coordinator_peak_rss_mb'] / 1024:.2f} "
            f"| {store.get('load_s', float('nan')):.1f} "
            f"| {store.get('rss_over_base_mb', float('nan')) / 1024:.2f} "
            f"| {mlf.get('load_s', float('nan')):.1f} |")
    for p in points:
        for precision in ("float32", "bfloat16"):
            row = p.get("forward", {}).get(precision)
            if row:
                cells = ", ".join(f"{k} {v['routed_over_base']:.2f}" for k, v in row.items())
                lines.append(f"\n{p['experts']} experts, {precision}, routed/base: {cells}")
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.consumer:
        consumer(args)
        return 0
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    args.work.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        arrive(args)
    report(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
