"""Upload throughput: `submit` of a ~200 MB bundle against a raw gRPC byte stream of the same size.

Both servers run as their own processes on 127.0.0.1: a real `gaggle-coordinator serve` and a
bare bench-only servicer that only counts the bytes of a client stream (no protobuf, no disk,
no hashing). Both get 1 MiB chunks over a channel opened once. `submit` is timed end to end as
a contributor sees it: declare the bundle by its expert id, stream the archive (read from the
bundle's files), and wait for the coordinator to check each file's sha256 against the
manifest, validate and commit it durably. The runs alternate
and the median of each is reported, with the ratio (target: submit >= 0.8 of raw). Each run
also counts the CPU seconds of both its processes (client and server, all threads): on a
shared machine wall time swings with the load, CPU time much less.

    python -m bench.transport [--megabytes 200] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parents[1]

RAW_METHOD = "/bench.Raw/Push"
CHUNK = 1 << 20  # the same chunk size the coordinator asks for


def serve_raw(port_file: Path) -> None:
    """The bench-only servicer: one client-streaming call that counts the bytes it gets."""
    def push(chunks, _context) -> bytes:
        return str(sum(len(chunk) for chunk in chunks)).encode()

    def push_messages(requests, _context) -> pb.UploadStatus:
        return pb.UploadStatus(committed_bytes=sum(len(r.data) for r in requests))

    from protocol.gaggle.v1 import gaggle_pb2 as pb

    handler = grpc.method_handlers_generic_handler("bench.Raw", {
        "Push": grpc.stream_unary_rpc_method_handler(push),  # bytes in, bytes out
        # The same stream framed as WriteUpload messages: protobuf's share of the cost.
        "PushMessages": grpc.stream_unary_rpc_method_handler(
            push_messages, request_deserializer=pb.WriteUploadRequest.FromString,
            response_serializer=pb.UploadStatus.SerializeToString)})
    server = grpc.server(ThreadPoolExecutor(max_workers=4), handlers=[handler])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    port_file.write_text(str(port))
    server.wait_for_termination()


def raw_upload(channel: grpc.Channel, archive: Path) -> float:
    """Seconds to stream the archive's bytes to the raw servicer."""
    def chunks():
        with open(archive, "rb") as handle:
            while data := handle.read(CHUNK):
                yield data

    push = channel.stream_unary(RAW_METHOD)
    began = time.perf_counter()
    received = int(push(chunks(), timeout=600))
    elapsed = time.perf_counter() - began
    assert received == archive.stat().st_size, (received, archive.stat().st_size)
    return elapsed


def framed_upload(channel: grpc.Channel, archive: Path) -> float:
    """Seconds to stream the archive as WriteUpload messages to the counting servicer."""
    from protocol.gaggle.v1 import gaggle_pb2 as pb

    def requests():
        offset = 0
        with open(archive, "rb") as handle:
            while data := handle.read(CHUNK):
                yield pb.WriteUploadRequest(upload_id="bench", offset=offset, data=data)
                offset += len(data)

    push = channel.stream_unary("/bench.Raw/PushMessages",
                                request_serializer=pb.WriteUploadRequest.SerializeToString,
                                response_deserializer=pb.UploadStatus.FromString)
    began = time.perf_counter()
    received = push(requests(), timeout=600).committed_bytes
    elapsed = time.perf_counter() - began
    assert received == archive.stat().st_size
    return elapsed


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU seconds of this process (None) or of process `pid` (Linux /proc)."""
    if pid is None:
        times = os.times()
        return times.user + times.system
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def measured(server_pid: int, run, *args) -> tuple[float, float, object]:
    """(wall s, CPU s of client and server, result) of `run(*args)`."""
    cpu, began = cpu_seconds() + cpu_seconds(server_pid), time.perf_counter()
    result = run(*args)
    wall = time.perf_counter() - began
    return wall, cpu_seconds() + cpu_seconds(server_pid) - cpu, result


def make_bundles(folder: Path, megabytes: int, count: int) -> tuple[list[Path], object]:
    """`count` distinct LoRA bundles of about `megabytes` each on the tiny base, and its spec."""
    from protocol.bundle import save_bundle
    from routing.base import load_base
    from routing.synthetic import random_bundle

    spec = load_base("tiny-llama").spec()
    bytes_per_rank = 4 * sum(d_in + d_out for d_in, d_out in spec.linears.values())
    rank = megabytes * 1_000_000 // bytes_per_rank
    return [save_bundle(random_bundle(spec, f"bench-{i}", rank=rank, seed=i),
                        folder / f"bundle-{i}") for i in range(count)], spec


def start_raw_server(folder: Path) -> tuple[subprocess.Popen, str]:
    port_file = folder / "raw.port"
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.transport", "--raw-server", str(port_file)], cwd=ROOT)
    deadline = time.monotonic() + 60
    while not port_file.exists() or not port_file.read_text():
        if time.monotonic() > deadline or process.poll() is not None:
            raise RuntimeError("the raw bench server did not start")
        time.sleep(0.05)
    return process, f"127.0.0.1:{port_file.read_text()}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=int, default=200, help="bundle size (MB)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each kind")
    parser.add_argument("--raw-server", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.raw_server:
        serve_raw(Path(args.raw_server))
        return 0

    from contributor.client import Connection, CoordinatorClient
    from protocol.archive import pack_bundle
    from tests.harness.servers import add_token, seed_base_spec, start_coordinator

    with tempfile.TemporaryDirectory(prefix="gaggle-bench-") as scratch:
        folder = Path(scratch)
        bundles, spec = make_bundles(folder, args.megabytes, args.repeats)
        archive = pack_bundle(bundles[0], folder / "raw.tar")
        size = archive.stat().st_size
        store = folder / "store"
        seed_base_spec(store, spec)
        config = folder / "coordinator.toml"
        config.write_text(f"max_bundle_bytes = {4 * size}\n")
        coordinator = start_coordinator(store, extra_args=("--config", str(config),
                                                          "--no-assembly"))
        raw_process, raw_address = start_raw_server(folder)
        token = add_token(store, "bench")
        runs: dict[str, list[tuple[float, float]]] = {"raw": [], "framed": [], "submit": []}
        phases = []
        try:
            with CoordinatorClient(Connection(coordinator.address, token)) as client, \
                    grpc.insecure_channel(raw_address) as raw_channel:
                for bundle in bundles:
                    for kind, push in (("raw", raw_upload), ("framed", framed_upload)):
                        wall, cpu, _ = measured(raw_process.pid, push, raw_channel, archive)
                        runs[kind].append((wall, cpu))
                    wall, cpu, result = measured(coordinator.pid, client.submit, bundle)
                    runs["submit"].append((wall, cpu))
                    assert not result.already_stored and result.bytes_sent == size
                    phases.append(result.seconds)
        finally:
            coordinator.stop()
            raw_process.terminate()
            raw_process.wait()
    report(size, runs, phases)
    return 0


def report(size: int, runs: dict[str, list[tuple[float, float]]],
           phases: list[dict[str, float]]) -> None:
    mb = size / 1e6
    wall = {kind: statistics.median(w for w, _ in rows) for kind, rows in runs.items()}
    cpu = {kind: statistics.median(c for _, c in rows) for kind, rows in runs.items()}
    print(f"archive: {mb:.1f} MB, {len(runs['raw'])} runs each, median; "
          f"{os.cpu_count()} CPUs, 127.0.0.1; load average "
          f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for kind, label in (("raw", "raw gRPC stream    "), ("framed", "WriteUpload framing"),
                        ("submit", "submit (end-to-end)")):
        print(f"{label}: {wall[kind]:6.2f} s  {mb / wall[kind]:7.1f} MB/s  "
              f"CPU {cpu[kind]:5.2f} s   (runs: "
              f"{', '.join(f'{w:.2f}' for w, _ in runs[kind])})")
    order = ["transfer", "finish"]
    names = sorted(phases[0], key=lambda n: order.index(n) if n in order else len(order))
    print("submit phases (median s): " + ", ".join(
        f"{name} {statistics.median(p[name] for p in phases):.2f}" for name in names))
    transfer = statistics.median(p["transfer"] for p in phases)
    print(f"ratio submit/raw: {wall['raw'] / wall['submit']:.2f} end to end (target >= 0.80); "
          f"{wall['raw'] / transfer:.2f} for the byte stream alone; CPU seconds raw/submit "
          f"{cpu['raw'] / cpu['submit']:.2f}")


if __name__ == "__main__":
    sys.exit(main())
