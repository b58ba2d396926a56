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
    # The operator evaluated every version and promoted one: the UI shows a champion.
    assert sum("champion" in line for line in out.splitlines() if line.startswith("| ")) == 1
    assert "the champion's version page: http://127.0.0.1:" in out
    assert "/#/models/gaggle-router/versions/" in out and "/runs/" in out
    accuracy_rows = [line for line in out.splitlines() if line.startswith(("| base", "| PHAT"))]
    assert len(accuracy_rows) == 2
    assert all(0.0 <= float(row.split("|")[2]) <= 1.0 for row in accuracy_rows)
    # Every process the demo started is gone.
    pids = json.loads((workdir / "logs" / "pids.json").read_text())
    assert len(pids) >= 5
    assert not [pid for pid in pids if _alive(pid)]
    _browse_later_command_serves_the_demo_runs(out)


def _browse_later_command_serves_the_demo_runs(out: str) -> None:
    """The summary's "browse it later" command, run as printed (on a free port), serves the
    demo's MLflow data: the experiment and the registered router model are there."""
    import shlex
    import urllib.request

    from demo.processes import ProcessGroup, free_port, http_ok, wait_until

    [line] = [line for line in out.splitlines() if line.strip().startswith("mlflow server")]
    argv = shlex.split(line)
    port = str(free_port())
    argv[argv.index("--port") + 1] = port
    group = ProcessGroup(Path(argv[argv.index("--artifacts-destination") + 1]).parent / "later")
    try:
        process = group.start("mlflow-later", [str(Path(sys.executable).with_name("mlflow")),
                                               *argv[1:]])
        uri = f"http://127.0.0.1:{port}"
        wait_until(lambda: http_ok(f"{uri}/health"), 120, "mlflow server", process)
        with urllib.request.urlopen(f"{uri}/api/2.0/mlflow/registered-models/get"
                                    "?name=gaggle-router", timeout=30) as reply:
            model = json.loads(reply.read())["registered_model"]
        assert model["name"] == "gaggle-router" and model.get("latest_versions")
        assert "## Champion history" in model["description"]
        assert [a["alias"] for a in model.get("aliases", [])] == ["champion"]
    finally:
        group.stop_all()
