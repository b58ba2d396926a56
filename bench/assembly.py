"""Assembly time against the number of experts: 10, 100, 1,000 and 10,000 experts.

Tiny base (`tiny-llama`), gate-style synthetic experts (rank-1 LoRA on one or two modules, as
experts that adapt few modules), tracking off, local Ray with 2 CPUs. The bundles are made once
into a cache folder ($GAGGLE_CACHE/bench-assembly, minutes for 10,000) and only the assembly is
timed: re-verification and loading of every bundle as Ray tasks, per-module stacking as Ray
tasks, and the atomic write of the version folder. Each size assembles into a fresh versions
folder, so no run can reuse an earlier version. Target: 10,000 experts in under 30 s, linear.

With --ray-address the assembly runs on that cluster instead, the bundle bytes travelling
through its object store; --two-node starts a two-node cluster of separate processes on
127.0.0.1 (tests/harness/raycluster.py) whose worker node cannot see the bundle cache, and uses it.

    python -m bench.assembly [--sizes 10 100 1000 10000] [--repeats 1] [--json out.json]
                             [--ray-address HOST:PORT | ray://HOST:10001]
                             [--ray-resource NAME=AMOUNT] [--two-node]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from coordinator.ray_cluster import ensure_ray, parse_resources
from coordinator.versions.assemble import AssemblyConfig, assemble
from protocol.bundle import MANIFEST, Manifest, save_bundle
from routing.base import cache_dir, load_base
from routing.synthetic import random_bundle

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class CachedExpert:
    """The fields of a store ExpertRecord that assembly reads."""

    expert_id: str
    name: str
    contributor: str
    method: str
    created_at: float
    path: Path


def cached_experts(count: int, spec) -> list[CachedExpert]:
    """`count` synthetic expert bundles in the cache folder, made on first use."""
    folder = cache_dir() / "bench-assembly" / spec.fingerprint[:12]
    folder.mkdir(parents=True, exist_ok=True)
    modules = sorted(spec.linears)
    experts = []
    started = time.perf_counter()
    for i in range(count):
        path = folder / f"e{i:05d}"
        if not (path / MANIFEST).exists():
            # Expert i adapts one module, every third expert a second one: many experts per
            # module, as in a large federation of narrow experts.
            chosen = [modules[i % len(modules)]]
            if i % 3 == 0:
                chosen.append(modules[(i * 7 + 3) % len(modules)])
            bundle = random_bundle(spec, f"e{i:05d}", rank=1, seed=i,
                                   modules=sorted(set(chosen)))
            save_bundle(bundle, path, overwrite=True)
            if i % 1000 == 999:
                print(f"  made {i + 1} bundles ({time.perf_counter() - started:.0f} s)",
                      flush=True)
        manifest = Manifest.from_json(json.loads((path / MANIFEST).read_text()))
        experts.append(CachedExpert(manifest.expert_id, manifest.name, "bench",
                                    manifest.method, float(i), path))
    return experts


def _warm_worker() -> int:
    """Ray task: import what assembly tasks import, and hold the worker a moment so that the
    next one goes to another worker."""
    import os

    import protocol.bundle  # noqa: F401
    import routing.stack  # noqa: F401

    time.sleep(0.5)
    return os.getpid()


def warm_up(config: AssemblyConfig) -> int:
    """Start and warm every Ray worker (a cold one spends seconds importing torch)."""
    import ray

    workers = int(ray.cluster_resources().get("CPU", config.num_cpus))
    task = ray.remote(_warm_worker).options(**config.ray_options())
    return len(set(ray.get([task.remote() for _ in range(2 * workers)])))


def time_assembly(experts: list[CachedExpert], fingerprint: str, repeats: int,
                  config: AssemblyConfig) -> dict:
    """Best-of-`repeats` assembly of `experts` into fresh version folders."""
    best: dict | None = None
    for _ in range(repeats):
        with tempfile.TemporaryDirectory(prefix="gaggle-bench-") as root:
            result = assemble(root, experts, config, fingerprint)
            row = {"experts": len(experts), "seconds": result.seconds,
                   "modules": result.manifest["modules"], **result.stages}
        if best is None or row["seconds"] < best["seconds"]:
            best = row
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000, 10000])
    parser.add_argument("--repeats", type=int, default=1, help="best of this many runs")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--ray-address", help="assemble on this Ray cluster")
    parser.add_argument("--ray-resource", action="append", metavar="NAME=AMOUNT",
                        help="custom resource the assembly tasks ask for (repeatable)")
    parser.add_argument("--two-node", action="store_true",
                        help="start a two-node loopback cluster (needs root for its mount "
                             "namespace) and assemble there")
    args = parser.parse_args(argv)

    spec = load_base("tiny-llama").spec()
    print(f"preparing {max(args.sizes)} cached bundles ...", flush=True)
    experts = cached_experts(max(args.sizes), spec)
    cluster = None
    if args.two_node:
        from tests.harness.raycluster import RESOURCE, LocalCluster

        cluster = LocalCluster(experts[0].path.parent, resource_units=64).start()
        args.ray_address, args.ray_resource = cluster.address, [f"{RESOURCE}=1"]
        print(f"two-node cluster at {cluster.address}", flush=True)
    try:
        rows = run_sizes(args, experts, spec.fingerprint)
    finally:
        if cluster is not None:
            cluster.stop()
    print_rows(rows, args)
    return 0


def run_sizes(args: argparse.Namespace, experts: list[CachedExpert],
              fingerprint: str) -> list[dict]:
    config = AssemblyConfig(ray_address=args.ray_address,
                            resources=parse_resources(args.ray_resource))
    ensure_ray(config)
    print(f"warmed {warm_up(config)} Ray workers", flush=True)
    time_assembly(experts[:10], fingerprint, 1, config)
    rows = []
    for size in sorted(args.sizes):
        rows.append(time_assembly(experts[:size], fingerprint, args.repeats, config))
        print(f"  {size} experts: {rows[-1]['seconds']:.2f} s", flush=True)
    return rows


def print_rows(rows: list[dict], args: argparse.Namespace) -> None:
    print("\n| experts | assembly (s) | read + object store + Ray tasks (s) | join (s) "
          "| save (s) | ms / expert |")
    print("|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['experts']:,} | {row['seconds']:.2f} | {row['tasks']:.2f} | "
              f"{row['join']:.2f} | {row['save']:.2f} | "
              f"{1000 * row['seconds'] / row['experts']:.2f} |")
    print(f"\n(load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} "
          "cores)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    sys.exit(main())
