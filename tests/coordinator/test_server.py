"""Server settings from flags and TOML, and the `experts` listing."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.cli import build_parser
from coordinator.cli import main as coordinator_main
from coordinator.intake.uploads import Uploads
from coordinator.server import ServerConfig
from coordinator.store.experts import Store
from protocol.errors import InvalidArgument
from tests.harness.bundles import archive_id, archive_of, make_bundle


def config_from(argv: list[str]) -> ServerConfig:
    return ServerConfig.from_args(build_parser().parse_args(["serve", *argv]))


def test_flags_override_the_toml_file(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('store = "from-file"\nbase = "tiny-llama"\nport = 6000\n'
                    'max-bundle-bytes = 1234\nstore_quota_bytes = 99999\n')
    config = config_from(["--config", str(toml), "--port", "7000"])
    assert config.store == Path("from-file") and config.base == "tiny-llama"
    assert config.port == 7000  # the flag wins
    assert (config.limits.max_bundle_bytes, config.limits.quota_bytes) == (1234, 99999)
    assert config.host == "127.0.0.1"  # loopback unless asked otherwise
    assert config.assembly and not config_from(["--config", str(toml), "--no-assembly"]).assembly


@pytest.mark.parametrize("argv, words", [
    (["--base", "tiny-llama"], "--store"),
    (["--store", "s", "--base", "b", "--tls-cert", "c.pem"], "--tls-key"),
    (["--store", "s", "--base", "b", "--tls-client-ca", "ca.pem"], "--tls-cert"),
    (["--store", "s", "--base", "b", "--port", "70000"], "out of range"),
])
def test_incomplete_settings_are_refused_with_the_missing_flag(argv, words):
    with pytest.raises(InvalidArgument, match=words):
        config_from(argv)


def test_unknown_toml_setting_is_named(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('store = "s"\nbase = "b"\nmax_bundel_bytes = 1\n')
    with pytest.raises(InvalidArgument, match="max_bundel_bytes"):
        config_from(["--config", str(toml)])


def test_experts_command_lists_stored_experts(tmp_path, tiny_spec, capsys):
    store = Store(tmp_path / "store")
    uploads = Uploads(store, tiny_spec, ServerConfig(store=tmp_path, base="x").limits)
    archive = archive_of(make_bundle(tmp_path / "b", tiny_spec, "listed-one"))
    state = uploads.start("alice", len(archive), archive_id(archive), "listed-one")
    with uploads.writer(state.upload_id, "alice") as writer:
        writer.append(0, archive)
    record = uploads.finish(state.upload_id, "alice").expert
    store.close()
    assert coordinator_main(["experts", "--store", str(tmp_path / "store")]) == 0
    out = capsys.readouterr().out
    assert record.expert_id[:16] in out and "listed-one" in out and "alice" in out
    assert "1 experts" in out


def test_a_busy_port_is_refused_with_a_clear_error(tmp_path, tiny_spec):
    from coordinator.server import CoordinatorServer
    from protocol.errors import Unavailable

    Store(tmp_path / "store").cache_base_spec(tiny_spec)
    first = CoordinatorServer(ServerConfig(store=tmp_path / "store", base="tiny-llama", port=0))
    try:
        with pytest.raises(Unavailable, match="another server"):
            CoordinatorServer(ServerConfig(store=tmp_path / "store", base="tiny-llama",
                                           port=first.port))
    finally:
        first.stop()
