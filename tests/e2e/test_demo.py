"""`make demo ARGS=--tiny`: the whole local federation on the tiny model, as a user runs it."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from demo.browser import INSTALL_HINT, chromium, render_text

ROOT = Path(__file__).resolve().parents[2]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> tuple[Path, str]:
    """One tiny demo for the module: its workdir and what it printed."""
    workdir = tmp_path_factory.mktemp("demo")
    result = subprocess.run(
        [sys.executable, "-m", "demo", "--tiny", "--workdir", str(workdir)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return workdir, result.stdout


def test_tiny_demo_prints_the_summary_and_stops_every_process(demo_run):
    workdir, out = demo_run
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


def test_the_demo_shows_each_contributors_progress_then_the_coordinators_events(demo_run):
    """Plain lines (the output is not a terminal): every contributor's training steps before
    the first acceptance, then the coordinator's events as they happened."""
    _, out = demo_run
    lines = out.splitlines()
    first_accepted = next(i for i, line in enumerate(lines)
                          if line.startswith("  coordinator: accepted"))
    for contributor in ("alice", "bob", "carol"):
        progress = [i for i, line in enumerate(lines)
                    if line.startswith(f"  {contributor}: expert: step ")]
        assert progress and progress[0] < first_accepted, contributor
        assert any(line.startswith(f"  {contributor}: gate: step 4/4, loss ")
                   for line in lines), contributor
    events = [line for line in lines if line.startswith("  coordinator: ")]
    assert sum(e.startswith("  coordinator: accepted") for e in events) == 3
    assert any("is live" in e for e in events) and any("assembled" in e for e in events)
    assert not any("\x1b[" in line for line in lines)  # no terminal codes in a plain log


@contextmanager
def browse_later(out: str) -> Iterator[str]:
    """The summary's "browse it later" command, run as printed (on a free port); its URL."""
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
        yield uri
    finally:
        group.stop_all()


def test_browse_later_command_serves_the_demo_runs(demo_run):
    """The demo's MLflow data outlives it: the registered router model, its champion and
    the champion history are there."""
    with browse_later(demo_run[1]) as uri, urllib.request.urlopen(
            f"{uri}/api/2.0/mlflow/registered-models/get?name=gaggle-router",
            timeout=30) as reply:
        model = json.loads(reply.read())["registered_model"]
    assert model["name"] == "gaggle-router" and model.get("latest_versions")
    assert "## Champion history" in model["description"]
    assert [a["alias"] for a in model.get("aliases", [])] == ["champion"]


@pytest.mark.skipif(chromium() is None, reason=f"Chromium is not installed: {INSTALL_HINT}")
def test_mlflow_ui_shows_the_version_card_and_the_loss_charts_in_a_browser(demo_run):
    """A person's view: the champion's version page and an expert's run page, rendered by a
    real headless Chromium from the demo's MLflow server."""
    out = demo_run[1]
    with browse_later(out) as uri:
        def printed(label: str) -> str:
            [line] = [line for line in out.splitlines() if label in line]
            old = line.split(": ", 1)[1].split("/#/")[0]
            return line.split(": ", 1)[1].replace(old, uri)

        version_page = render_text(printed("the champion's version page"))
        # The run's overview lists every metric; its charts tab draws only what is in view.
        run_page = render_text(printed("an expert's run").replace("/model-metrics", ""))
    # The version's model card: the experts table and the evaluation behind the promotion.
    assert "alice/alice-tweet-sentiment" in version_page and "carol/carol-boolq" in version_page
    assert "Evaluation" in version_page and "imdb-sentiment" in version_page
    assert "@ champion" in version_page or "champion" in version_page
    # The expert's run: its loss curve is a chart of its own.
    assert "expert_loss_curve" in run_page and "gate_loss_curve" in run_page
