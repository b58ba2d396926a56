"""Load on a coordinator: many contributors submitting multi-megabyte bundles at once.

Each contributor is a thread with its own token and its own channel, submitting its bundles
one after another through `CoordinatorClient.submit` (pack, hash, stream, finish), all
starting together. Used by tests/e2e/test_load.py and bench/load.py.
"""

from __future__ import annotations

import statistics
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from contributor.client import Connection, CoordinatorClient, RetryPolicy
from protocol.bundle import BaseSpec, save_bundle
from routing.synthetic import random_bundle
from tests.harness.servers import ServerProcess, add_token

RANK_FOR_2MB = 520  # LoRA rank at which a tiny-llama bundle (all linears) passes 2 MiB


@dataclass
class LoadResult:
    latencies: list[float] = field(default_factory=list)  # seconds per submission
    errors: list[str] = field(default_factory=list)
    bytes_sent: int = 0  # archive bytes accepted
    expert_ids: list[str] = field(default_factory=list)
    wall_s: float = 0.0

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        if not ordered:
            return float("nan")
        return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]

    def summary(self) -> str:
        count = len(self.latencies)
        return (f"{count} submissions, {len(self.errors)} errors, "
                f"{self.bytes_sent / 2**20:.1f} MiB in {self.wall_s:.1f} s: "
                f"{count / self.wall_s:.2f} submissions/s, "
                f"{self.bytes_sent / 2**20 / self.wall_s:.1f} MiB/s; latency p50 "
                f"{self.percentile(0.5):.2f} s, p99 {self.percentile(0.99):.2f} s, "
                f"mean {statistics.fmean(self.latencies) if count else float('nan'):.2f} s")


def make_bundles(spec: BaseSpec, folder: Path, contributors: int, per_contributor: int,
                 rank: int = RANK_FOR_2MB) -> list[list[Path]]:
    """Distinct seeded bundle folders: [contributor][bundle]."""
    out = []
    for c in range(contributors):
        row = []
        for b in range(per_contributor):
            bundle = random_bundle(spec, f"load-{c}-{b}", rank=rank, seed=1000 * c + b)
            row.append(save_bundle(bundle, folder / f"c{c}" / f"b{b}"))
        out.append(row)
    return out


def run_load(server: ServerProcess, bundles: list[list[Path]],
             timeout_s: float = 300.0) -> LoadResult:
    """Every contributor (a thread with its own token) submits its bundles; all start at once."""
    tokens = [add_token(server.store, f"load{c}") for c in range(len(bundles))]
    result = LoadResult()
    lock = threading.Lock()
    barrier = threading.Barrier(len(bundles) + 1)

    def contributor(index: int) -> None:
        connection = Connection(server.address, tokens[index], timeout_s=timeout_s)
        with CoordinatorClient(connection) as client:
            barrier.wait()
            for folder in bundles[index]:
                began = time.perf_counter()
                try:
                    submitted = client.submit(folder, retry=RetryPolicy(attempts=1))
                except Exception:
                    with lock:
                        result.errors.append(traceback.format_exc(limit=3))
                    continue
                with lock:
                    result.latencies.append(time.perf_counter() - began)
                    result.bytes_sent += submitted.size_bytes
                    result.expert_ids.append(submitted.expert_id)

    threads = [threading.Thread(target=contributor, args=(i,)) for i in range(len(bundles))]
    for thread in threads:
        thread.start()
    barrier.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join(timeout_s)
    result.wall_s = time.perf_counter() - began
    return result
