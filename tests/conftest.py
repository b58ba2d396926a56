"""Shared fixtures: the tiny base model and synthetic bundles built from it."""

from __future__ import annotations

import os

import pytest

# Keep Ray on loopback and quiet for every test process (see the project's ENV notes).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture(scope="session")
def tiny_base():
    """The seeded random 2-layer Llama (`tiny-llama`) with its tokenizer and fingerprint."""
    from routing.base import load_base

    return load_base("tiny-llama")


@pytest.fixture(scope="session")
def tiny_spec(tiny_base):
    return tiny_base.spec()
