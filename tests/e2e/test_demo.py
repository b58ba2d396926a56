"""`make demo ARGS=--tiny`: the whole local federation on the tiny model, as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_tiny_demo_prints_the_summary_and_stops_every_process(tmp_path):
    workdir = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "-m", "demo", "--tiny", "--workdir", str(workdir)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    out = result.stdout
    assert "gaggle local federation: summary" in out
    for contributor in ("alice", "bob", "carol"):
        assert f"| {contributor} |" in out
    assert "MLflow UI: http://127.0.0.1:" in out
    # Three experts arrived one after another: the newest version holds all three.
    version_rows = [line for line in out.splitlines() if "latest" in line]
    assert version_rows and version_rows[-1].split("|")[2].strip() == "3"
    accuracy_rows = [line for line in out.splitlines() if line.startswith(("| base", "| PHAT"))]
    assert len(accuracy_rows) == 2
    assert all(0.0 <= float(row.split("|")[2]) <= 1.0 for row in accuracy_rows)
    # Every process the demo started is gone.
    pids = json.loads((workdir / "logs" / "pids.json").read_text())
    assert len(pids) >= 5
    assert not [pid for pid in pids if _alive(pid)]
