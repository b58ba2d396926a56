"""Shared fixtures: the tiny base model and synthetic bundles built from it."""

from __future__ import annotations

import os

import pytest

# Ray binds the machine's non-loopback address by default; this setting keeps every test
# process's Ray on 127.0.0.1, and the auth mode silences a token warning.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture(autouse=True)
def _restore_mlflow_env():
    """`mlflow.set_tracking_uri` / `set_registry_uri` also set MLFLOW_* environment variables,
    which every later subprocess would inherit (a README walk-through once sent its registry
    calls to another test's stopped server): put them back after each test."""
    keys = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    before = {key: os.environ.get(key) for key in keys}
    yield
    for key, value in before.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def tiny_base():
    """The seeded random 2-layer Llama (`tiny-llama`) with its tokenizer and fingerprint."""
    from routing.base import load_base

    return load_base("tiny-llama")


@pytest.fixture(scope="session")
def tiny_spec(tiny_base):
    return tiny_base.spec()


@pytest.fixture(scope="session")
def ray_local():
    """The process's local Ray (started once, 2 CPUs, on loopback)."""
    from coordinator.ray_cluster import ensure_ray

    ensure_ray()
    yield
