"""Crash safety: 50 submissions while the coordinator is killed with SIGKILL at random moments
and restarted, then an audit; prints the counts.

The coordinator runs as in production (assembly on Ray after each accepted expert, tracking
into its embedded MLflow store). The audit (tests/harness/chaos.py): every acknowledged expert is
indexed and its folder verifies; no staging, upload or version-staging leftovers and no
unindexed expert folder; after the coordinator catches up, MLflow holds exactly one finished
run per stored expert and one model version (with usage.* tags) per version folder, and the
tracking queue has nothing pending or failed.

    python -m bench.chaos [--submissions 50] [--kills 10] [--seed 0] [--no-assembly]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from routing.base import load_base
from tests.harness.chaos import run_chaos

ROOT = Path(__file__).resolve().parents[1]
# Ray reads these when it starts (in the coordinator processes), not when it is imported.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--submissions", type=int, default=50)
    parser.add_argument("--kills", type=int, default=10, help="SIGKILLs at most")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--window", type=float, nargs=2, default=(1.0, 8.0),
                        metavar=("MIN_S", "MAX_S"),
                        help="a kill lands this many seconds after the server is up")
    parser.add_argument("--no-assembly", dest="assembly", action="store_false",
                        help="store only: no Ray assembly, no MLflow (faster restarts)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()
    spec = load_base("tiny-llama").spec()
    workdir = Path(tempfile.mkdtemp(prefix="gaggle-chaos-"))
    began = time.monotonic()
    try:
        result = run_chaos(workdir, spec, args.submissions, args.kills, args.seed,
                           kill_window_s=tuple(args.window), assembly=args.assembly,
                           settle_timeout_s=900)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"chaos: {args.submissions} submissions, {result.kills} SIGKILLs "
          f"(at {result.kill_moments} s after each start), "
          f"{time.monotonic() - began:.0f} s, assembly {'on' if args.assembly else 'off'}")
    print(f"  acknowledged experts: {len(result.acknowledged)}; submits started again after "
          f"failing (server down before the upload began): {result.client_retries}; "
          f"restarts waiting for the port: {result.port_waits}")
    print("  audit: " + ", ".join(f"{k} {v}" for k, v in result.audit.items())
          + f"; caught up {result.settle_s:.0f} s after the last submission")
    print(f"  problems: {len(result.problems)}"
          + "".join(f"\n    {p}" for p in result.problems))
    if args.keep:
        print(f"  work folder: {workdir}")
    return 0 if not result.problems else 1


if __name__ == "__main__":
    sys.exit(main())
