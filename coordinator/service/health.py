"""The standard gRPC health service, open without a token, and its probe:
`python -m coordinator.service.health HOST:PORT` exits 0 when the coordinator answers SERVING
(used by container health checks).
"""

from __future__ import annotations

import sys

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from protocol.names import preview


class CoordinatorHealth(health.HealthServicer):
    """grpc's health servicer, answering Watch only for the services this server names.

    Anyone may call it (probes carry no token). grpcio-health-checking keeps a table entry per
    service name ever watched (a watch that ends empties its entry but never removes it), so
    watches on made-up names would grow the server's memory without bound. Watch therefore
    refuses a name the server does not serve, with NOT_FOUND as Check answers it.
    """

    def __init__(self, services: tuple[str, ...]) -> None:
        super().__init__()
        self.services = frozenset(("", *services))

    def Watch(self, request, context, send_response_callback=None):  # noqa: N802 (grpc name)
        if request.service not in self.services:
            context.abort(grpc.StatusCode.NOT_FOUND,
                          f"this server has no service {preview(request.service)}; watch "
                          + " or ".join(repr(s) for s in sorted(self.services)))
        return super().Watch(request, context, send_response_callback)


def check(address: str, timeout: float = 5.0) -> bool:
    """True when the server at `address` reports SERVING for the overall service."""
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m coordinator.service.health HOST:PORT", file=sys.stderr)
        return 2
    healthy = check(args[0])
    print("SERVING" if healthy else "NOT SERVING")
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
