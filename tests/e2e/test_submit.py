"""Submitting experts to a real coordinator process: storage, idempotence, auth, rejections,
and many contributors at once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import torch

from coordinator.service.auth import TokenBook
from coordinator.store.experts import Store
from protocol.bundle import ADAPTER, GATES, load_bundle
from tests.harness.bundles import (
    archive_of,
    make_bundle,
    nan_first,
    raw_upload,
    set_manifest,
    spawn_contributors,
    staging_is_empty,
    store_snapshot,
    tamper,
)
from tests.harness.servers import ROOT, add_token, seed_base_spec, start_coordinator

MAX_BUNDLE = 1 << 20  # small, so the oversized case is cheap


def submit_cli(bundle, server, token: str | None, *extra: str,
               env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `gaggle-contributor submit` as its own process."""
    args = [sys.executable, "-m", "contributor.cli", "submit", str(bundle),
            "--coordinator", server.address, "--quiet", *extra]
    if token is not None:
        args += ["--token", token]
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=180,
                          env=env)


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_spec):
    root = tmp_path_factory.mktemp("coordinator")
    seed_base_spec(root / "store", tiny_spec)
    config = root / "coordinator.toml"
    config.write_text(f"max_bundle_bytes = {MAX_BUNDLE}\nmax_concurrent_uploads = 4\n")
    process = start_coordinator(root / "store",
                                extra_args=("--config", str(config), "--no-assembly"))
    yield process
    assert process.stop() == 0, process.log()


@pytest.fixture(scope="module")
def alice(server) -> str:
    return add_token(server.store, "alice")


def listed(server, token: str) -> list:
    from contributor.client import Connection, CoordinatorClient

    with CoordinatorClient(Connection(server.address, token)) as client:
        return client.list_experts()


def test_submit_stores_lists_and_resubmission_returns_same_id(server, alice, tmp_path,
                                                             tiny_spec):
    bundle = make_bundle(tmp_path / "b", tiny_spec, "first", seed=1)
    first = submit_cli(bundle, server, alice)
    assert first.returncode == 0, first.stderr
    expert_id = first.stdout.strip().splitlines()[-1]
    assert expert_id == load_bundle(bundle).expert_id
    [record] = [e for e in listed(server, alice) if e.expert_id == expert_id]
    assert (record.name, record.contributor, record.method) == ("first", "alice", "lora")
    before = store_snapshot(server.store)

    again = submit_cli(bundle, server, None, env={**os.environ, "GAGGLE_TOKEN": alice})
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip().splitlines()[-1] == expert_id
    assert "already stored" in again.stdout
    assert store_snapshot(server.store) == before


def test_contributor_is_taken_from_the_token(server, tmp_path, tiny_spec):
    bob = add_token(server.store, "bob")
    bundle = make_bundle(tmp_path / "b", tiny_spec, "alice-says-hi", seed=2, method="ia3")
    result = submit_cli(bundle, server, bob)
    assert result.returncode == 0, result.stderr
    expert_id = result.stdout.strip().splitlines()[-1]
    mine = listed(server, bob)
    assert [(e.expert_id, e.contributor) for e in mine if e.expert_id == expert_id] == \
        [(expert_id, "bob")]


@pytest.mark.parametrize("case", ["missing", "wrong", "revoked"])
def test_bad_tokens_are_unauthenticated_and_store_nothing(server, tmp_path, tiny_spec, case):
    bundle = make_bundle(tmp_path / "b", tiny_spec, f"token-{case}", seed=3)
    token = {"missing": "", "wrong": "gg_0123456789ab_" + "x" * 43}.get(case)
    if case == "revoked":
        token = add_token(server.store, "carol")
        store = Store(server.store)
        TokenBook(store).revoke("carol")
        store.close()
    before = store_snapshot(server.store)
    with server.channel() as channel:
        outcome = raw_upload(channel, token, archive_of(bundle))
    assert outcome.code == grpc.StatusCode.UNAUTHENTICATED
    assert ("revoked" if case == "revoked" else "token") in outcome.details
    assert store_snapshot(server.store) == before


def _flip_last_byte(path: Path) -> tuple[Path, dict]:
    data = path.read_bytes()
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    return path.parent, {}


def _wrong_shape(tensors: dict[str, torch.Tensor]) -> None:
    key = sorted(k for k in tensors if k.endswith("lora_A"))[0]
    tensors[key] = torch.zeros(tensors[key].shape[0] + 1, tensors[key].shape[1])


REJECTIONS = {
    # case: (how to break it, expected status, words the message must hold)
    "fingerprint": (lambda b, a: (set_manifest(b, base_model={"name": "other-model",
                                                              "fingerprint": "ab" * 32}),
                                  {}),
                    grpc.StatusCode.FAILED_PRECONDITION, ["fingerprint", "--base tiny-llama"]),
    "nan": (lambda b, a: (tamper(b, ADAPTER, nan_first), {}),
            grpc.StatusCode.INVALID_ARGUMENT, ["NaN", ADAPTER]),
    "shape": (lambda b, a: (tamper(b, ADAPTER, _wrong_shape), {}),
              grpc.StatusCode.INVALID_ARGUMENT, ["shape", "expected"]),
    "truncated": (lambda b, a: (b, {"send": a[:-1000]}),
                  grpc.StatusCode.FAILED_PRECONDITION, ["send the rest from offset"]),
    "declared-id": (lambda b, a: (b, {"declared_id": "0" * 64}),
                    grpc.StatusCode.INVALID_ARGUMENT, ["expert id", "declared"]),
    # A tensor file changed after packaging: the manifest's sha256 of it no longer holds.
    "file-sha256": (lambda b, a: _flip_last_byte(b / GATES),
                    grpc.StatusCode.INVALID_ARGUMENT, [GATES, "sha256 does not match"]),
    "oversized": (lambda b, a: (b, {"declared_size": MAX_BUNDLE + 1}),
                  grpc.StatusCode.RESOURCE_EXHAUSTED, ["limit", str(MAX_BUNDLE)]),
    "overlong": (lambda b, a: (b, {"declared_size": len(a) - 512}),
                 grpc.StatusCode.INVALID_ARGUMENT, ["past the declared size"]),
}


@pytest.mark.parametrize("case", sorted(REJECTIONS))
def test_rejected_upload_gets_its_status_and_leaves_store_unchanged(server, alice, tmp_path,
                                                                   tiny_spec, case):
    breaker, code, words = REJECTIONS[case]
    bundle = make_bundle(tmp_path / "b", tiny_spec, f"bad-{case}", seed=10)
    pristine = archive_of(bundle)
    bundle, options = breaker(bundle, pristine)
    before = store_snapshot(server.store)
    with server.channel() as channel:
        outcome = raw_upload(channel, alice, archive_of(bundle), **options)
    assert outcome.code == code, outcome
    for word in words:
        assert word in outcome.details, outcome.details
    assert store_snapshot(server.store) == before
    assert staging_is_empty(server.store)


def test_client_refuses_another_base_model_before_uploading(server, alice, tmp_path,
                                                            tiny_spec):
    bundle = set_manifest(make_bundle(tmp_path / "b", tiny_spec, "elsewhere", seed=4),
                          base_model={"name": "other-model", "fingerprint": "cd" * 32})
    store = Store(server.store)
    uploads_before = store.query("SELECT COUNT(*) FROM uploads")[0][0]
    result = submit_cli(bundle, server, alice)
    assert result.returncode == 2
    assert "fingerprint" in result.stderr and "--base tiny-llama" in result.stderr
    assert store.query("SELECT COUNT(*) FROM uploads")[0][0] == uploads_before
    store.close()


def test_sixteen_concurrent_submissions_all_land(server, tmp_path, tiny_spec):
    tokens = [add_token(server.store, f"crowd{i}") for i in range(4)]
    bundles = [make_bundle(tmp_path / f"b{i}", tiny_spec, f"crowd-{i}", seed=100 + i,
                           method="lora" if i % 2 else "ia3") for i in range(16)]
    argvs = [["submit", str(b), "--coordinator", server.address, "--quiet", "--token",
              tokens[i % 4]] for i, b in enumerate(bundles)]
    results = spawn_contributors(argvs, tmp_path)
    assert [code for code, _ in results] == [0] * 16, [out for _, out in results]
    ids = {out.strip().splitlines()[-1] for _, out in results}
    assert ids == {load_bundle(b).expert_id for b in bundles}

    store = Store(server.store)
    indexed = {e.expert_id: e for e in store.list_experts()}
    folders = {p.name for p in (server.store / "experts").iterdir()}
    assert ids <= set(indexed)
    assert folders == set(indexed)  # the index and the files agree
    for expert_id in ids:
        assert load_bundle(store.bundle_folder(expert_id)).expert_id == expert_id
    store.close()


def test_status_shows_the_base_model_and_only_the_callers_experts(server, tmp_path,
                                                                  tiny_spec):
    dana = add_token(server.store, "dana")
    bundle = make_bundle(tmp_path / "b", tiny_spec, "danas-expert", seed=42)
    expert_id = submit_cli(bundle, server, dana).stdout.strip().splitlines()[-1]
    result = subprocess.run(
        [sys.executable, "-m", "contributor.cli", "status", "--coordinator", server.address],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "GAGGLE_TOKEN": dana})
    assert result.returncode == 0, result.stderr
    assert f"fingerprint {tiny_spec.fingerprint}" in result.stdout
    assert "you are dana: 1 expert(s)" in result.stdout
    assert expert_id in result.stdout and "danas-expert" in result.stdout
