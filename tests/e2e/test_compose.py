"""docker-compose.yml, checked statically (no Docker engine runs here).

Every service's command must be a real CLI invocation whose flags parse, and the ports,
volumes and dependencies named across services must agree.
"""

from __future__ import annotations

import importlib.util
import shlex
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _argv(service: dict) -> list[str]:
    command = service["command"]
    return command if isinstance(command, list) else shlex.split(command)


def _flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def _parse(argv: list[str]):
    """Parse a service command with the real CLI it names; return the parsed arguments."""
    program, args = argv[0], argv[1:]
    if program == "gaggle-coordinator":
        from coordinator.cli import build_parser

        return build_parser().parse_args(args)
    if program == "gaggle-contributor":
        from contributor.cli import build_parser

        return build_parser().parse_args(args)
    if program == "mlflow":
        from mlflow.cli import cli

        return cli.make_context("mlflow", list(args), resilient_parsing=False)
    if program == "ray":
        from ray.scripts.scripts import cli

        return cli.make_context("ray", list(args), resilient_parsing=False)
    raise AssertionError(f"unexpected program {program!r} in docker-compose.yml")


def test_expected_services_exist(compose):
    services = set(compose["services"])
    assert {"mlflow", "ray-head", "coordinator"} <= services
    contributors = {s for s in services if s.endswith("-submit")}
    assert len(contributors) >= 2


def test_every_command_parses_with_the_real_cli(compose):
    for name, service in compose["services"].items():
        argv = _argv(service)
        try:
            _parse(argv)
        except SystemExit as err:  # argparse exits on a bad flag
            raise AssertionError(f"service {name}: {' '.join(argv)} does not parse") from err


def test_subcommands_are_the_documented_ones(compose):
    commands = {name: _argv(s)[:2] for name, s in compose["services"].items()}
    assert commands["coordinator"] == ["gaggle-coordinator", "serve"]
    assert commands["mlflow"] == ["mlflow", "server"]
    assert commands["ray-head"] == ["ray", "start"]
    for name, argv in commands.items():
        if name.endswith("-train"):
            assert argv == ["gaggle-contributor", "train"]
        if name.endswith("-submit"):
            assert argv == ["gaggle-contributor", "submit"]


def _published(service: dict) -> set[int]:
    return {int(str(p).split(":")[-1]) for p in service.get("ports", [])}


def test_ports_and_addresses_agree(compose):
    services = compose["services"]
    coordinator = _argv(services["coordinator"])
    port = int(_flag(coordinator, "--port"))
    assert port in _published(services["coordinator"])
    tracking = urlparse(_flag(coordinator, "--tracking-uri"))
    assert tracking.hostname in services
    assert tracking.port == int(_flag(_argv(services[tracking.hostname]), "--port"))
    assert tracking.port in _published(services[tracking.hostname])
    ray_host, ray_port = _flag(coordinator, "--ray-address").split(":")
    assert int(ray_port) == int(_flag(_argv(services[ray_host]), "--port"))
    for name, service in services.items():
        if name.endswith("-submit"):
            host, submit_port = _flag(_argv(service), "--coordinator").split(":")
            assert host == "coordinator" and int(submit_port) == port


def test_volumes_are_declared_and_used(compose):
    declared = set(compose["volumes"])
    used = set()
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith((".", "/")):
                assert source in declared, f"volume {source} is not declared"
                used.add(source)
    assert used == declared


def test_submit_reads_what_train_wrote(compose):
    services = compose["services"]
    for name, service in services.items():
        if not name.endswith("-submit"):
            continue
        train = services[name.replace("-submit", "-train")]
        bundle = _argv(service)[2]
        out = _flag(_argv(train), "--out")
        assert bundle == out
        shared = {v.split(":")[0] for v in service["volumes"]} & \
            {v.split(":")[0] for v in train["volumes"]}
        assert shared, f"{name} and its train step share no volume"
        assert "GAGGLE_TOKEN" in service["environment"]


def test_dependencies_exist_and_have_health_checks(compose):
    services = compose["services"]
    for name, service in services.items():
        for dependency, rule in service.get("depends_on", {}).items():
            assert dependency in services, f"{name} depends on unknown {dependency}"
            if rule["condition"] == "service_healthy":
                assert "healthcheck" in services[dependency], dependency
    for name in ("mlflow", "ray-head", "coordinator"):
        assert "healthcheck" in services[name]


def test_health_check_commands_exist(compose):
    test = compose["services"]["coordinator"]["healthcheck"]["test"]
    assert test[1:3] == ["python", "-m"]
    assert importlib.util.find_spec(test[3]) is not None


def test_dockerfile_copies_every_package():
    dockerfile = (ROOT / "Dockerfile").read_text()
    for package in ("protocol", "routing", "contributor", "coordinator"):
        assert f"COPY {package} {package}" in dockerfile
