"""Training progress as JSON lines (`--progress-file`), for a program to follow: one line per
optimiser step, `{"phase", "step", "total", "loss", "eta_s", "at"}`; `read_progress` gives
the newest line. The terminal keeps its tqdm bars."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path


def write_progress(path: str | os.PathLike, phase: str, step: int, total: int, loss: float,
                   eta_s: float | None) -> None:
    """Append one step's line (a follower may read while this appends: whole lines only)."""
    line = json.dumps({"phase": phase, "step": step, "total": total, "loss": round(loss, 5),
                       "eta_s": None if eta_s is None else round(eta_s, 1),
                       "at": round(time.time(), 3)})
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(line + "\n")


def read_steps(path: str | os.PathLike) -> list[dict]:
    """Every complete line of a progress file, oldest first ([] when there is none yet)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    steps = []
    for line in text.splitlines():
        try:
            steps.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line being written: the rest comes next time
    return steps


def read_progress(path: str | os.PathLike) -> dict | None:
    """The newest complete line of a progress file, or None when there is none yet."""
    steps = read_steps(path)
    return steps[-1] if steps else None
