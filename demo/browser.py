"""The MLflow UI as a person sees it: pages rendered by headless Chromium (Debian's `chromium`
package), as DOM text for tests or as PNG screenshots for the docs.

The MLflow UI is a single-page app: Chromium runs its JavaScript for a budget of virtual time
before the DOM is dumped or the picture taken. The `workflowType=machine_learning` parameter
opens the UI's model-training view (runs, charts, models) instead of its GenAI default.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

INSTALL_HINT = "install it with `apt-get install chromium` (Debian) to see the MLflow UI pages"
WINDOW = "1400,1000"
_VIEW = "workflowType=machine_learning"


def chromium() -> str | None:
    """The Chromium executable, or None where it is not installed."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


def page_urls(tracking_uri: str, experiment_id: str, run_id: str, model: str,
              version: str) -> dict[str, str]:
    """The pages worth a look: the run list, an expert run's charts, a version's card."""
    return {
        "runs": f"{tracking_uri}/#/experiments/{experiment_id}?{_VIEW}",
        "expert_run": f"{tracking_uri}/#/experiments/{experiment_id}/runs/{run_id}/"
                      f"model-metrics?{_VIEW}",
        "version": f"{tracking_uri}/#/models/{model}/versions/{version}?{_VIEW}",
    }


def _run(flags: list[str], url: str, timeout: float) -> str:
    executable = chromium()
    if executable is None:
        raise RuntimeError(f"Chromium is not installed: {INSTALL_HINT}")
    argv = [executable, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            f"--window-size={WINDOW}", "--virtual-time-budget=30000", *flags, url]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"chromium failed on {url}: {done.stderr[-500:]}")
    return done.stdout


def render_text(url: str, timeout: float = 120) -> str:
    """The page's DOM after its scripts ran, as HTML."""
    return _run(["--dump-dom"], url, timeout)


def screenshot(url: str, path: Path, timeout: float = 120) -> Path:
    """A PNG of the page as a 1400 x 1000 window shows it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _run([f"--screenshot={path.resolve()}"], url, timeout)
    return path
