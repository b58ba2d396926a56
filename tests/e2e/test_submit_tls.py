"""TLS (and client certificates), health and reflection on a real coordinator process."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from contributor.client import Connection, CoordinatorClient
from protocol.errors import Unauthenticated, Unavailable
from tests.harness.bundles import make_bundle
from tests.harness.servers import add_token, seed_base_spec, start_coordinator


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(subject: str, key, issuer_name: x509.Name, issuer_key, *, ca: bool,
                 server: bool = False) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(_name(subject))
               .issuer_name(issuer_name).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(folder: Path, stem: str, cert: x509.Certificate, key) -> tuple[Path, Path]:
    cert_path, key_path = folder / f"{stem}.pem", folder / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def make_pki(folder: Path, stem: str) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all as PEM files."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = _certificate(f"{stem} CA", ca_key, _name(f"{stem} CA"), ca_key, ca=True)
    server_key, client_key = ec.generate_private_key(ec.SECP256R1()), \
        ec.generate_private_key(ec.SECP256R1())
    server_cert = _certificate("localhost", server_key, ca_cert.subject, ca_key, ca=False,
                               server=True)
    client_cert = _certificate("contributor", client_key, ca_cert.subject, ca_key, ca=False)
    ca_path, _ = _write(folder, f"{stem}-ca", ca_cert, ca_key)
    server_cert_path, server_key_path = _write(folder, f"{stem}-server", server_cert,
                                               server_key)
    client_cert_path, client_key_path = _write(folder, f"{stem}-client", client_cert,
                                               client_key)
    return {"ca": ca_path, "server_cert": server_cert_path, "server_key": server_key_path,
            "client_cert": client_cert_path, "client_key": client_key_path}


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    return make_pki(tmp_path_factory.mktemp("pki"), "gaggle")


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory, pki, tiny_spec):
    store = tmp_path_factory.mktemp("tls") / "store"
    seed_base_spec(store, tiny_spec)
    credentials = grpc.ssl_channel_credentials(root_certificates=pki["ca"].read_bytes())
    server = start_coordinator(store, credentials=credentials, extra_args=(
        "--tls-cert", str(pki["server_cert"]), "--tls-key", str(pki["server_key"]),
        "--no-assembly"))
    yield server
    assert server.stop() == 0, server.log()  # SIGTERM drains and exits cleanly


def test_tls_client_without_the_ca_fails_and_with_it_succeeds(tls_server, pki, tmp_path,
                                                              tiny_spec):
    token = add_token(tls_server.store, "alice")
    other_ca = make_pki(tmp_path / "other", "other")["ca"]
    for tls_ca in (None, other_ca):
        with CoordinatorClient(Connection(tls_server.address, token, tls_ca=tls_ca,
                                          timeout_s=10)) as client:
            with pytest.raises(Unavailable):
                client.federation()
    with CoordinatorClient(Connection(tls_server.address, token, tls_ca=pki["ca"])) as client:
        assert client.federation().contributor == "alice"
        result = client.submit(make_bundle(tmp_path / "b", tiny_spec, "over-tls"))
        assert [e.expert_id for e in client.list_experts()] == [result.expert_id]


def test_health_answers_serving_without_a_token(tls_server):
    with tls_server.channel() as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "gaggle.v1.Coordinator"):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def _list_services(channel: grpc.Channel, metadata: tuple) -> list[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    replies = stub.ServerReflectionInfo(iter([request]), metadata=metadata, timeout=10)
    return [s.name for reply in replies for s in reply.list_services_response.service]


def test_reflection_lists_the_service_for_authenticated_callers(tls_server):
    token = add_token(tls_server.store, "reflector")
    with tls_server.channel() as channel:
        names = _list_services(channel, (("authorization", f"Bearer {token}"),))
        assert "gaggle.v1.Coordinator" in names
        assert "grpc.health.v1.Health" in names
        with pytest.raises(grpc.RpcError) as refused:
            _list_services(channel, ())
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_client_certificate_is_required_when_the_server_names_a_client_ca(tmp_path, pki,
                                                                         tiny_spec):
    store = tmp_path / "store"
    seed_base_spec(store, tiny_spec)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=pki["ca"].read_bytes(),
        private_key=pki["client_key"].read_bytes(),
        certificate_chain=pki["client_cert"].read_bytes())
    server = start_coordinator(store, credentials=credentials, extra_args=(
        "--tls-cert", str(pki["server_cert"]), "--tls-key", str(pki["server_key"]),
        "--tls-client-ca", str(pki["ca"]), "--no-assembly"))
    try:
        token = add_token(store, "alice")
        anonymous = Connection(server.address, token, tls_ca=pki["ca"], timeout_s=10)
        with CoordinatorClient(anonymous) as client, pytest.raises(Unavailable):
            client.federation()
        known = Connection(server.address, token, tls_ca=pki["ca"],
                           tls_cert=pki["client_cert"], tls_key=pki["client_key"])
        with CoordinatorClient(known) as client:
            assert client.federation().base_model == "tiny-llama"
        with CoordinatorClient(Connection(server.address, "gg_0123456789ab_" + "y" * 43,
                                          tls_ca=pki["ca"], tls_cert=pki["client_cert"],
                                          tls_key=pki["client_key"])) as client:
            with pytest.raises(Unauthenticated):
                client.federation()  # a certificate does not replace the token
    finally:
        assert server.stop() == 0, server.log()
