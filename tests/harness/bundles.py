"""Bundles and uploads for coordinator tests: valid, tampered, and sent by hand.

`raw_upload` talks to the coordinator with the bare generated stub, bypassing the client's
own checks, so tests can send what a hostile or broken client would.
"""

from __future__ import annotations

import hashlib
import io
import json
import sqlite3
import tarfile
from dataclasses import dataclass
from pathlib import Path

import grpc
import torch
from safetensors.torch import load_file, save_file

from protocol.archive import pack_bundle_bytes
from protocol.bundle import MANIFEST, BaseSpec, Manifest, save_bundle, sha256_file
from protocol.gaggle.v1 import gaggle_pb2 as pb
from protocol.gaggle.v1 import gaggle_pb2_grpc
from routing.synthetic import random_bundle


def make_bundle(folder: Path, spec: BaseSpec, name: str, *, seed: int = 0,
                method: str = "lora", rank: int = 4) -> Path:
    """A valid random bundle folder for `spec`."""
    return save_bundle(random_bundle(spec, name, method=method, seed=seed, rank=rank), folder)


def tamper(bundle_dir: Path, file: str, edit) -> Path:
    """Rewrite one safetensors file with `edit(tensors)` and refresh the manifest's hash,
    so only the tensor check (not the hash check) can catch the change."""
    path = bundle_dir / file
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)
    manifest = json.loads((bundle_dir / MANIFEST).read_text())
    manifest["files"][file] = sha256_file(path)
    (bundle_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return bundle_dir


def set_manifest(bundle_dir: Path, **changes) -> Path:
    """Change top-level manifest fields (e.g. base_model) by hand."""
    manifest = json.loads((bundle_dir / MANIFEST).read_text())
    manifest.update(changes)
    (bundle_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return bundle_dir


def nan_first(tensors: dict[str, torch.Tensor]) -> None:
    key = sorted(tensors)[0]
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] = float("nan")


@dataclass
class RawOutcome:
    code: grpc.StatusCode  # OK when the expert was stored
    details: str
    expert_id: str = ""


def raw_upload(channel: grpc.Channel, token: str, archive: bytes, *,
               declared_size: int | None = None, declared_id: str | None = None,
               send: bytes | None = None, chunk: int = 1 << 20) -> RawOutcome:
    """Start, write (`send`, default the archive) and finish an upload with the bare stub."""
    stub = gaggle_pb2_grpc.CoordinatorStub(channel)
    metadata = (("authorization", f"Bearer {token}"),)
    data = archive if send is None else send
    try:
        start = stub.StartUpload(pb.StartUploadRequest(
            size_bytes=len(archive) if declared_size is None else declared_size,
            expert_id=declared_id or archive_id(archive), name=archive_name(archive)),
            metadata=metadata, timeout=30)
        if start.HasField("existing"):
            return RawOutcome(grpc.StatusCode.OK, "existing", start.existing.expert_id)
        requests = (pb.WriteUploadRequest(upload_id=start.upload_id, offset=i,
                                          data=data[i:i + chunk])
                    for i in range(0, len(data), chunk))
        if data:
            stub.WriteUpload(requests, metadata=metadata, timeout=30)
        done = stub.FinishUpload(pb.FinishUploadRequest(upload_id=start.upload_id),
                                 metadata=metadata, timeout=60)
    except grpc.RpcError as err:
        return RawOutcome(err.code(), err.details() or "")
    return RawOutcome(grpc.StatusCode.OK, "stored", done.expert.expert_id)


def archive_of(bundle_dir: Path) -> bytes:
    return pack_bundle_bytes(bundle_dir)


def archive_manifest(archive: bytes) -> Manifest | None:
    """The manifest inside `archive`, or None when it has no readable one."""
    try:
        with tarfile.open(fileobj=io.BytesIO(archive), mode="r:") as tar:
            member = tar.extractfile(MANIFEST)
            return Manifest.from_json(json.load(member))
    except Exception:  # any hostile or truncated archive
        return None


def archive_id(archive: bytes) -> str:
    """The expert id an honest client declares for `archive`: its manifest's. An archive
    without a readable manifest gets a stand-in (its sha256), which the coordinator refuses
    at finish all the same."""
    manifest = archive_manifest(archive)
    return hashlib.sha256(archive).hexdigest() if manifest is None else manifest.expert_id


def archive_name(archive: bytes) -> str:
    """The expert name an honest client declares for `archive`: its manifest's (a stand-in
    when it has none)."""
    manifest = archive_manifest(archive)
    return "raw" if manifest is None else manifest.name


def store_snapshot(store: Path) -> tuple[list, list]:
    """What a rejected upload must not change: the experts' index rows and their files."""
    with sqlite3.connect(store / "index.sqlite") as conn:
        rows = sorted(conn.execute("SELECT expert_id, name, contributor, size_bytes "
                                   "FROM experts").fetchall())
    files = sorted(str(p.relative_to(store)) for p in (store / "experts").rglob("*"))
    return rows, files


def staging_is_empty(store: Path) -> bool:
    return not any((store / "staging").iterdir())


def run_contributor_cli(argv: list[str], output: str) -> None:
    """Run `gaggle-contributor ARGV` in this (child) process, writing stdout and stderr to
    `output`, and exit with its code. Target of multiprocessing workers."""
    import contextlib
    import os

    from contributor.cli import main

    with open(output, "w") as sink, contextlib.redirect_stdout(sink), \
            contextlib.redirect_stderr(sink):
        code = main(argv)
    os._exit(code)


def spawn_contributors(argvs: list[list[str]], folder: Path,
                       timeout: float = 240) -> list[tuple[int, str]]:
    """Run each ARGV in its own process at once; [(exit code, output)].

    The processes fork from a server process that imported the client once, so sixteen of
    them start in milliseconds instead of each importing torch again.
    """
    import multiprocessing

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["contributor.client", "contributor.cli"])
    outputs = [folder / f"contributor-{i}.out" for i in range(len(argvs))]
    processes = [context.Process(target=run_contributor_cli, args=(argv, str(out)))
                 for argv, out in zip(argvs, outputs, strict=True)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout)
    return [(p.exitcode, out.read_text()) for p, out in zip(processes, outputs, strict=True)]


# ----- experts built to attack the router --------------------------------------------------

def mean_activations(base, prompts: list[str], max_tokens: int) -> dict[str, torch.Tensor]:
    """(d_in,) mean input of every linear layer of a loaded base over the prompts' tokens."""
    from torch import nn

    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []
    linears = base.spec().linears
    for name, module in base.model.named_modules():
        if isinstance(module, nn.Linear) and name in linears:
            def record(_module, inputs, name=name):
                flat = inputs[0].reshape(-1, inputs[0].shape[-1])
                sums[name] = sums.get(name, 0) + flat.sum(0)
                counts[name] = counts.get(name, 0) + flat.shape[0]
            hooks.append(module.register_forward_pre_hook(record))
    try:
        with torch.inference_mode():
            for prompt in prompts:
                ids = base.tokenizer(prompt, add_special_tokens=False,
                                     return_tensors="pt")["input_ids"][:, :max_tokens]
                base.model(input_ids=ids)
    finally:
        for hook in hooks:
            hook.remove()
    return {name: sums[name] / counts[name] for name in sums}


def capture_bundle(base, name: str, prompts: list[str], *, seed: int = 99):
    """An expert whose gates point along each module's mean input on `prompts`: it wins the
    router's first choice for most tokens of ordinary text (routing capture)."""
    bundle = random_bundle(base.spec(), name, seed=seed)
    means = mean_activations(base, prompts, 64)
    bundle.gates = {module: 1000.0 * means[module] for module in bundle.gates}
    return bundle


def huge_bundle(spec: BaseSpec, name: str, *, seed: int = 98, value: float = 1e10):
    """An expert with +-`value` in every adapter entry: finite, so it passes a finiteness
    check, yet any token routed to it overflows."""
    bundle = random_bundle(spec, name, seed=seed)
    bundle.adapter = {key: torch.where(tensor >= 0, value, -value).float()
                      for key, tensor in bundle.adapter.items()}
    return bundle
