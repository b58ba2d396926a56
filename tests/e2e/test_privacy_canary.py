"""Privacy end to end: a canary in a contributor's private data, trained on with the real
contributor CLI and submitted to a real coordinator (assembly on Ray, tracking into its
embedded MLflow store), appears in no byte the coordinator or MLflow keeps."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

from contributor.cli import main as contributor_cli
from tests.contributor.conftest import FAST, write_records
from tests.harness.chaos import ChaosResult, audit_mlflow, wait_settled
from tests.harness.servers import add_token, seed_base_spec, start_coordinator


def _encodings(text: str) -> list[bytes]:
    return [text.encode("utf-8"), text.encode("utf-16-le"), text.encode("utf-16-be")]


def _files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def test_canary_never_reaches_the_coordinator_or_mlflow(tmp_path, tiny_spec, capsys):
    canary = f"CANARY-{uuid.uuid4().hex}"
    data = tmp_path / "private.jsonl"
    records = write_records(data, count=24, seed=11, marker=canary + "-")
    for record in records:  # the canary in the targets too, so the loss sees it
        record["target"] = f"{record['target']} {canary}"
    data.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    bundle = tmp_path / "bundle"
    assert contributor_cli(["train", "--base", "tiny-llama", "--data", str(data), "--out",
                            str(bundle), "--method", "lora", *FAST]) == 0
    store = tmp_path / "store"
    seed_base_spec(store, tiny_spec)
    token = add_token(store, "alice")
    server = start_coordinator(store)
    try:
        capsys.readouterr()
        assert contributor_cli(["submit", str(bundle), "--coordinator", server.address,
                                "--token", token, "--quiet"]) == 0
        expert_id = capsys.readouterr().out.strip().splitlines()[-1]
        settled = wait_settled(store, {expert_id}, timeout_s=300)
        assert settled, settled.reason
    finally:
        assert server.stop(timeout=60) == 0
    result = ChaosResult(acknowledged={"bundle": expert_id})
    audit_mlflow(store, result)  # MLflow really holds the run and the version
    assert result.problems == [] and result.audit["mlflow_runs"] == 1
    kept = _files(store) + [server.log_path]
    assert any(p.name == "mlflow.db" for p in kept)
    assert any("artifacts" in p.parts for p in kept)
    needles = _encodings(canary) + _encodings(canary.split("-")[1])
    for record in records[:5]:
        needles += _encodings(record["input"])
    for path in kept:
        blob = path.read_bytes()
        leaked = [n for n in needles if n in blob]
        assert not leaked, f"{path.relative_to(tmp_path)} holds private bytes {leaked[:1]}"
