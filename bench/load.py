"""Load: 32 concurrent contributors each submitting 3 bundles of at least 2 MiB to a real
coordinator process; prints errors, throughput and p50/p99 submission latency.

Each contributor is a thread with its own token and channel (tests/harness/loadgen.py); a
submission is timed end to end as a contributor sees it (pack, hash, stream, verify, commit).
The coordinator runs with --no-assembly unless --assembly is given, so that what is measured
is the submission path, not Ray and MLflow sharing the same two cores.

    python -m bench.load [--contributors 32] [--bundles 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from routing.base import load_base
from tests.harness.bundles import store_snapshot
from tests.harness.loadgen import RANK_FOR_2MB, make_bundles, run_load
from tests.harness.servers import seed_base_spec, start_coordinator

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--contributors", type=int, default=32)
    parser.add_argument("--bundles", type=int, default=3, help="bundles per contributor")
    parser.add_argument("--rank", type=int, default=RANK_FOR_2MB,
                        help="LoRA rank of the synthetic bundles (sets their size)")
    parser.add_argument("--assembly", action="store_true",
                        help="let the coordinator assemble and track versions meanwhile")
    args = parser.parse_args()
    spec = load_base("tiny-llama").spec()
    workdir = Path(tempfile.mkdtemp(prefix="gaggle-load-"))
    try:
        bundles = make_bundles(spec, workdir / "bundles", args.contributors, args.bundles,
                               args.rank)
        size = min((b / "adapter.safetensors").stat().st_size for row in bundles for b in row)
        seed_base_spec(workdir / "store", spec)
        extra = () if args.assembly else ("--no-assembly",)
        server = start_coordinator(workdir / "store", extra_args=extra)
        try:
            result = run_load(server, bundles)
        finally:
            server.stop()
        rows, _ = store_snapshot(workdir / "store")
        print(f"load: {args.contributors} contributors x {args.bundles} bundles "
              f"(adapter >= {size / 2**20:.2f} MiB each), {os.cpu_count()} CPUs, "
              f"load average {os.getloadavg()[0]:.1f}")
        print(f"  {result.summary()}")
        print(f"  stored experts: {len(rows)} (expected {args.contributors * args.bundles})")
        for error in result.errors[:3]:
            print(f"  error: {error}")
        ok = not result.errors and len(rows) == args.contributors * args.bundles
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
