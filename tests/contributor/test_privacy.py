"""Privacy: no text of the training data, nor its canaries, ends up in any bundle file."""

from __future__ import annotations

import json
import uuid

from tests.contributor.conftest import FAST, write_records


def _encodings(text: str) -> list[bytes]:
    return [text.encode("utf-8"), text.encode("utf-16-le"), text.encode("utf-16-be")]


def test_bundle_carries_no_canary_or_record_text(cli, tmp_path, method):
    canary = f"CANARY-{uuid.uuid4().hex}-"
    data = tmp_path / "private.jsonl"
    # Every record carries a unique canary (canary prefix + record number), in the prompt and
    # in the target, so the expert's loss sees it too.
    records = write_records(data, count=24, seed=5, marker=canary)
    for record in records:
        record["target"] = f"{record['target']} {record['input'][:len(canary) + 4]}"
    data.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    out = tmp_path / "bundle"
    code, stdout, err = cli("train", "--base", "tiny-llama", "--data", data, "--out", out,
                            "--method", method, *FAST)
    assert code == 0, err
    files = sorted(out.iterdir())
    assert {f.name for f in files} >= {"manifest.json", "adapter.safetensors", "gates.safetensors"}
    needles = _encodings(canary) + _encodings(canary.strip("-").split("-")[1])
    for record in records:
        needles += _encodings(record["input"]) + _encodings(record["target"].strip())
    for file in files:
        blob = file.read_bytes()
        leaked = [n for n in needles if n in blob]
        assert not leaked, f"{file.name} holds data bytes {leaked[:2]}"
    assert canary not in stdout
