"""Fuzz the coordinator's upload path with hostile uploads and print the counts.

Most cases run in-process through the very functions the servicer calls (Uploads.start,
the upload writer, finish: archive unpack, load_bundle, store commit); the rest go through a
real `gaggle-coordinator serve` process with the bare gRPC stub. For every case: the answer
must be a client-error status (or a stored, verifying expert when the mutation left the bundle
valid), the store's expert files and index rows must be unchanged by a refusal, and no case
may take longer than --hang-seconds. The server must be alive and SERVING at the end.

    python -m bench.fuzz [--cases 10000] [--server-cases 500] [--seed 0]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

from hypothesis import HealthCheck, given, seed, settings

from coordinator.intake.uploads import UploadLimits, Uploads
from coordinator.store.experts import Store
from routing.base import load_base
from tests.harness.bundles import staging_is_empty, store_snapshot
from tests.harness.hostile import (
    CLIENT_ERRORS,
    check_stored,
    hostile_cases,
    run_in_process,
    run_over_grpc,
    valid_files,
)
from tests.harness.servers import add_token, seed_base_spec, start_coordinator, wait_serving

ROOT = Path(__file__).resolve().parents[1]

ACCEPTED = ("OK", "ALREADY_STORED")


class Tally:
    """Counts per outcome and per mutation, and the failures (with one example each)."""

    def __init__(self) -> None:
        self.outcomes: Counter[str] = Counter()
        self.mutations: Counter[str] = Counter()
        self.failures: Counter[str] = Counter()
        self.examples: dict[str, str] = {}
        self.slowest = 0.0

    def fail(self, kind: str, case, detail: str) -> None:
        self.failures[kind] += 1
        self.examples.setdefault(kind, f"{case!r}: {detail[-1500:]}")


def fuzz(run, store_root: Path, base, cases: int, rng_seed: int, hang_s: float,
         material, tally: Tally) -> None:
    """Run `cases` hostile cases through `run(case) -> status`, checking each."""
    @seed(rng_seed)
    @settings(max_examples=cases, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=hostile_cases(material))
    def one(case):
        before = store_snapshot(store_root)
        began = time.monotonic()
        try:
            outcome = run(case)
        except Exception:
            outcome = "CRASH"
            tally.fail("crash (unexpected exception: INTERNAL)", case, traceback.format_exc())
        took = time.monotonic() - began
        tally.slowest = max(tally.slowest, took)
        tally.outcomes[outcome] += 1
        tally.mutations[f"{case.layer}/{case.what.split('+')[0]}"] += 1
        if took > hang_s:
            tally.fail("hang", case, f"{took:.1f} s")
        if outcome in ACCEPTED:
            try:
                check_stored(store_root, base)
            except Exception:
                tally.fail("stored expert does not verify", case, traceback.format_exc())
        elif outcome != "CRASH":
            if outcome not in CLIENT_ERRORS:
                tally.fail(f"non-client status {outcome}", case, outcome)
            if store_snapshot(store_root) != before:
                tally.fail("store changed by a refusal", case, outcome)
        if not staging_is_empty(store_root):
            tally.fail("staging left behind", case, outcome)

    one()


def run_server_cases(args, base, material, tally: Tally, workdir: Path) -> bool:
    """The server share; True when the server is still alive and SERVING afterwards."""
    config = workdir / "serve.toml"
    config.write_text("max_concurrent_uploads = 1000000\nmax_bundle_bytes = 8388608\n")
    seed_base_spec(workdir / "server-store", base.spec())
    server = start_coordinator(workdir / "server-store",
                               extra_args=("--no-assembly", "--config", str(config)))
    try:
        token = add_token(server.store, "fuzzer")
        with server.channel() as channel:
            fuzz(lambda case: run_over_grpc(channel, token, case, timeout=args.hang_seconds),
                 server.store, base.spec(), args.server_cases, args.seed + 1, args.hang_seconds,
                 material, tally)
        alive = server.process.poll() is None
        wait_serving(server, timeout=10)
        if "Traceback" in server.log():
            tally.fail("traceback in server log", "server", server.log()[-1500:])
        return alive
    except Exception:
        tally.fail("server stopped answering", "server", traceback.format_exc())
        return False
    finally:
        server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=10_000, help="cases in all")
    parser.add_argument("--server-cases", type=int, default=500,
                        help="of those, how many go through a real server process")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hang-seconds", type=float, default=30.0,
                        help="a case slower than this counts as a hang")
    args = parser.parse_args()
    base = load_base("tiny-llama")
    shm = Path("/dev/shm")
    workdir = Path(tempfile.mkdtemp(prefix="gaggle-fuzz-", dir=shm if shm.is_dir() else None))
    began = time.monotonic()
    try:
        material = valid_files(base.spec(), workdir / "valid")
        store = Store(workdir / "store")
        store.cache_base_spec(base.spec())
        uploads = Uploads(store, base.spec(), UploadLimits(max_bundle_bytes=8 << 20))
        in_process = Tally()
        fuzz(lambda case: run_in_process(uploads, case), store.root, base.spec(),
             args.cases - args.server_cases, args.seed, args.hang_seconds, material, in_process)
        store.close()
        over_grpc = Tally()
        alive = run_server_cases(args, base, material, over_grpc, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report(in_process, over_grpc, alive, time.monotonic() - began)
    return 0 if alive and not (in_process.failures or over_grpc.failures) else 1


def report(in_process: Tally, over_grpc: Tally, alive: bool, seconds: float) -> None:
    total = sum(in_process.outcomes.values()) + sum(over_grpc.outcomes.values())
    print(f"fuzz: {total} hostile uploads in {seconds:.0f} s "
          f"({sum(in_process.outcomes.values())} in-process, "
          f"{sum(over_grpc.outcomes.values())} through a server process)")
    for title, tally in (("in-process", in_process), ("server", over_grpc)):
        outcomes = ", ".join(f"{k} {v}" for k, v in tally.outcomes.most_common())
        print(f"  {title:<10} outcomes: {outcomes}; slowest case {tally.slowest:.2f} s")
    mutations = in_process.mutations + over_grpc.mutations
    layers = Counter()
    for key, count in mutations.items():
        layers[key.split("/")[0]] += count
    print("  by layer: " + ", ".join(f"{k} {v}" for k, v in layers.most_common()))
    print("  by mutation: " + ", ".join(f"{k} {v}" for k, v in sorted(mutations.items())))
    failures = in_process.failures + over_grpc.failures
    print(f"  server alive and SERVING at the end: {'yes' if alive else 'NO'}")
    print(f"  failures: {sum(failures.values())}"
          + "".join(f"\n    {k}: {v}" for k, v in failures.items()))
    for kind, example in {**in_process.examples, **over_grpc.examples}.items():
        print(f"  first {kind}: {example}")


if __name__ == "__main__":
    sys.exit(main())
