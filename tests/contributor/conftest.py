"""Helpers for the contributor tests: small JSONL files and running the CLI in-process."""

from __future__ import annotations

import json
import random

import pytest

from contributor.cli import main

GATE_FAST = ["--gate-steps", "3", "--batch-size", "4", "--max-length", "32"]
FAST = ["--steps", "3", *GATE_FAST]


def write_records(path, count: int = 16, seed: int = 0, marker: str = "") -> list[dict]:
    """Little arithmetic records ("3 plus 4 is" -> " 7"), optionally carrying a marker."""
    rng = random.Random(seed)
    records = []
    for index in range(count):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        tag = f"{marker}{index:04d} " if marker else ""
        records.append({"input": f"{tag}{a} plus {b} is", "target": f" {a + b}"})
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return records


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "data.jsonl"
    write_records(path)
    return path


@pytest.fixture
def cli(capsys):
    """Run gaggle-contributor in this process; return (exit code, stdout, stderr)."""
    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()  # drop what the test printed while preparing
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err
    return run


@pytest.fixture(params=["lora", "ia3"])
def method(request) -> str:
    return request.param
