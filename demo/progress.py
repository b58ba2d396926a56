"""What the demo shows while it runs: a line per contributor (phase, step/total, loss, ETA)
read from the contributors' own progress files (`train --progress-file`), then the
coordinator's events as its log reports them (accepted, assembled, checked, live, rejected).

On a terminal the contributor lines are redrawn in place; otherwise each change is a plain
line (at most one per contributor every `every_s` seconds, and every phase change).
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path
from typing import TextIO

from contributor.progress import read_progress, read_steps

# The coordinator's log lines worth showing, and how to say them
_EVENTS = (
    (re.compile(r"expert (\w{12})\w* \(([^)]+)\) accepted from (\S+)"),
     "accepted {2}'s expert {1} ({0})"),
    (re.compile(r"refused call from \S+: (.*)"), "refused a call: {0}"),
    (re.compile(r"version (\w+) assembled: (\d+) experts \(([^)]*)\)"),
     "version {0} assembled: {1} experts ({2})"),
    (re.compile(r"version (\w+) usage check: ([\d.]+) s"), "version {0} checked in {1} s"),
    (re.compile(r"version (\w+) is current, ([\d.]+) s after"),
     "version {0} is live, {1} s after its newest expert was accepted"),
    (re.compile(r"version (\w+) rejected, .*?: (.*)"), "version {0} rejected: {1}"),
)


class FederationWatch:
    """Follows the contributors' progress files and the coordinator's log."""

    def __init__(self, progress: dict[str, Path], coordinator_log: Path,
                 out: TextIO = sys.stdout, every_s: float = 10.0) -> None:
        self.progress = progress
        self.log = coordinator_log
        self.out = out
        self.every_s = every_s
        self.tty = out.isatty()
        self._shown: dict[str, tuple[str, float]] = {}  # name -> (line, when printed)
        self._drawn = 0  # contributor lines on screen (terminal mode)
        self._offset = 0  # characters of the coordinator log already read
        self._seen: dict[str, int] = {}  # contributor -> progress lines already looked at

    def contributors(self) -> None:
        """Show each contributor's newest progress (a plain log: also the last step of each
        phase that ended since the last call, so no phase goes unseen)."""
        if self.tty:
            if self._drawn:
                self.out.write(f"\x1b[{self._drawn}F")  # back to the first contributor line
            for name, path in self.progress.items():
                self.out.write(f"\x1b[2K{_describe(name, read_progress(path))}\n")
            self._drawn = len(self.progress)
        else:
            now = time.monotonic()
            for name, path in self.progress.items():
                for step in self._new_steps(name, path):
                    line = _describe(name, step)
                    shown, when = self._shown.get(name, ("", 0.0))
                    if line != shown and (step["step"] == step["total"]
                                          or now - when >= self.every_s):
                        self.out.write(line + "\n")
                        self._shown[name] = (line, now)
        self.out.flush()

    def _new_steps(self, name: str, path: Path) -> list[dict]:
        """The steps appended to a progress file since the last look: the newest, and the
        last of every phase that ended before it."""
        steps = read_steps(path)
        seen = self._seen.get(name, 0)
        self._seen[name] = len(steps)
        new = steps[seen:]
        return [s for i, s in enumerate(new)
                if i == len(new) - 1 or s["phase"] != new[i + 1]["phase"]]

    def coordinator(self) -> None:
        """Show the coordinator's events logged since the last call."""
        self._drawn = 0  # events scroll below the contributor lines
        try:
            text = self.log.read_text(errors="replace")
        except FileNotFoundError:
            return
        new, self._offset = text[self._offset:], len(text)
        for line in new.splitlines():
            for pattern, say in _EVENTS:
                found = pattern.search(line)
                if found:
                    self.out.write(f"  coordinator: {say.format(*found.groups())}\n")
                    break
        self.out.flush()


def _describe(name: str, step: dict | None) -> str:
    if step is None:
        return f"  {name}: starting"
    eta = "" if step.get("eta_s") is None else f", ETA {step['eta_s']:.0f} s"
    return (f"  {name}: {step['phase']}: step {step['step']}/{step['total']}, "
            f"loss {step['loss']:.3f}{eta}")
