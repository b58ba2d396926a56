"""Every command README.md shows is run: here, from the README's own text, or by the test or
demo that ELSEWHERE names.

The README is parsed into commands: each line of a ```bash block, each inline code span that
starts with a program (`gaggle-coordinator ...`, `mlflow ...`, `python ...`), and each
```python block whole. The walk-through runs those texts in a scratch folder with real values
put in for the placeholders (STORE, HOST, the ports, VERSION, ...) and the tiny base model for
SmolLM2, so an edited README command is the one that runs. A command no entry of RUN_HERE or
ELSEWHERE claims fails `test_every_readme_command_is_run_here_or_elsewhere`.
"""

from __future__ import annotations

import ast
import importlib
import json
import os
import re
import shlex
import subprocess
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from demo.processes import free_port, http_ok
from tests.contributor.conftest import write_records
from tests.e2e import readme_commands
from tests.e2e.readme_commands import ReadmeCommand, Walkthrough, parse_readme
from tests.harness.servers import ROOT, CommandProcess

README = ROOT / "README.md"
TINY_TRAINING = ("--steps", "2", "--gate-steps", "2", "--batch-size", "4", "--max-length", "32")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EXPERT_ID = re.compile(r"^[0-9a-f]{64}$")

# ----- which README command runs where -----

# marker -> the fixture or test of this module that runs the README command it marks. A
# shell marker is the start of the command (after any VAR=value), a Python marker a piece of
# the block's text. Each must mark exactly one README command.
RUN_HERE = {
    "gaggle-coordinator token add": "federation",
    "gaggle-coordinator serve": "federation",
    "gaggle-contributor train": "federation",
    "gaggle-contributor gate": "federation",
    "gaggle-contributor inspect": "federation",
    "gaggle-contributor submit": "federation",
    "gaggle-contributor status": "federation",
    "gaggle-coordinator token list": "operated",
    "gaggle-coordinator experts": "operated",
    "gaggle-coordinator diff": "operated",
    "gaggle-coordinator export": "operated",
    "gaggle-coordinator evaluate": "operated",
    "gaggle-coordinator promote": "operated",
    "gaggle-coordinator versions": "operated",
    "gaggle-coordinator token revoke": "operated",
    "mlflow ui": "operated",
    "mlflow models serve": "test_consumer_code_and_model_serving",
    "curl": "test_consumer_code_and_model_serving",
    "mlflow.pyfunc.load_model(": "test_consumer_code_and_model_serving",
    "load_router(": "test_consumer_code_and_model_serving",
    "python -m bench.inference": "test_benchmark_commands",
    "python -m bench.transport": "test_benchmark_commands",
    "python -m bench.expert_gain": "test_benchmark_commands",
    "python -m bench.gate_shares": "test_benchmark_commands",
}


@dataclass(frozen=True)
class Elsewhere:
    """A README command too long or too big for this module, and what runs it instead."""

    where: str  # file (relative to the repository) that runs it
    evidence: str  # text that file holds where it runs it, so a stale entry fails
    why: str  # why it does not run here
    make_prints: str | None = None  # make targets: the last line `make -n ...` must print
    parser: str | None = None  # "module:function" parsing the README's arguments, if any


ELSEWHERE = {
    "make demo": Elsewhere(
        "tests/e2e/test_demo.py", '"-m", "demo", "--tiny"',
        "SmolLM2-135M for ~15 minutes; the test runs the same program with --tiny",
        make_prints=".venv/bin/python -m demo"),
    "make demo ARGS=--tiny": Elsewhere(
        "tests/e2e/test_demo.py", '"-m", "demo", "--tiny"', "the demo test runs it (~2 min)",
        make_prints=".venv/bin/python -m demo --tiny"),
    "make test": Elsewhere(
        "pyproject.toml", 'testpaths = ["tests"]', "the whole suite, this module included",
        make_prints=".venv/bin/python -m pytest -q"),
    "ray start --head": Elsewhere(
        "tests/harness/raycluster.py", '"start", "--head"',
        "a cluster of its own processes; the two-node cluster test starts the same head"),
    "ray start --address": Elsewhere(
        "tests/harness/raycluster.py", '"start", f"--address=',
        "a second node in its own mount namespace; the two-node cluster test starts it"),
    "mlflow server": Elsewhere(
        "tests/coordinator/test_tracking.py", "postgres.PostgresServer().start()",
        "needs a PostgreSQL server; the tracking tests start one and this server on it"),
    "make venv": Elsewhere(
        "Makefile", "venv: $(STAMP)", "the set-up every make target runs first"),
    "python -m tasks list": Elsewhere(
        "tests/tasks/test_export.py", '"-m", "tasks", "list"', "the task CLI's test runs it"),
    "gaggle-coordinator experts release": Elsewhere(
        "tests/e2e/test_version_checks.py", '"experts", "release"',
        "needs a quarantined expert: the version-check test makes one, then releases it"),
    "gaggle-coordinator status": Elsewhere(
        "tests/e2e/test_metrics.py", '"status", "--store"',
        "the metrics test compares it with what a real serve exported"),
    "gaggle-coordinator prune": Elsewhere(
        "tests/coordinator/test_prune.py", '"prune", "--keep-last", "1", "--dry-run"',
        "needs a history of versions to prune; the prune tests build one"),
    "python -m bench.scale": Elsewhere(
        "tests/bench/test_scale.py", "from bench.scale import main",
        "real-size experts for hours; the slow test runs the same main() on the tiny model",
        parser="bench.scale:parse_args"),
    "python -m bench.zeroshot": Elsewhere(
        "tests/bench/test_zeroshot_tiny.py", "from bench.zeroshot.__main__ import main",
        "SmolLM2 for tens of minutes; the slow test runs the same main() with --tiny",
        parser="bench.zeroshot.__main__:parse_args"),
}



def claim_of(command: ReadmeCommand) -> str | None:
    """The RUN_HERE or ELSEWHERE marker that claims the command (the longest), or None."""
    return readme_commands.claim_of(command, (*RUN_HERE, *ELSEWHERE))


@pytest.fixture(scope="module")
def readme() -> list[ReadmeCommand]:
    return parse_readme(README.read_text(encoding="utf-8"))[0]


# ----- the static checks -----

def test_parser_reads_shell_lines_python_blocks_and_command_spans():
    text = ("Run `gaggle-coordinator experts --store S` or see `gaggle-contributor`.\n"
            "```bash\n# a comment\nFOO=1 mlflow ui --port 5000  # the UI\n"
            "gaggle-coordinator diff A B \\\n  --store S\n```\n"
            "```python\nimport mlflow\nprint(1)\n```\n```text\nmake demo\n```\n")
    commands, spans = parse_readme(text)
    assert [(c.kind, c.text, c.line) for c in commands] == [
        ("shell", "FOO=1 mlflow ui --port 5000", 4),
        ("shell", "gaggle-coordinator diff A B --store S", 5),
        ("python", "import mlflow\nprint(1)", 9),
        ("shell", "gaggle-coordinator experts --store S", 1)]
    assert commands[0].key == "mlflow ui --port 5000" and commands[0].matches("mlflow ui")
    assert spans == [(1, "gaggle-contributor")]  # a program's name alone is no command
    with pytest.raises(ValueError, match="tag it bash"):
        parse_readme("```\nmake demo\n```\n")


def test_every_readme_command_is_run_here_or_elsewhere(readme):
    unclaimed = [str(c) for c in readme if claim_of(c) is None]
    assert not unclaimed, ("README commands nothing runs; run them in this module (RUN_HERE) "
                           "or name the test that runs them (ELSEWHERE):\n" + "\n".join(unclaimed))
    for marker in RUN_HERE:
        marked = [str(c) for c in readme if claim_of(c) == marker]
        assert len(marked) == 1, f"RUN_HERE marker {marker!r} must mark one command: {marked}"
    for marker, entry in ELSEWHERE.items():
        assert any(claim_of(c) == marker for c in readme), f"stale ELSEWHERE entry {marker!r}"
        source = (ROOT / entry.where).read_text(encoding="utf-8")
        assert entry.evidence in source, f"{entry.where} no longer runs {marker!r}"


def test_commands_run_elsewhere_are_what_those_tests_run(readme):
    """`make -n` prints what each make target runs; other commands parse with their parser."""
    for command in readme:
        entry = ELSEWHERE.get(claim_of(command) or "")
        if entry is None:
            continue
        if entry.make_prints is not None:
            # CI runs this suite under `make test`; a nested make would otherwise print
            # "Entering/Leaving directory" lines around the recipe.
            env = {k: v for k, v in os.environ.items()
                   if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
            dry = subprocess.run(["make", "-n", "--no-print-directory",
                                  *shlex.split(command.key)[1:]], cwd=ROOT, env=env,
                                 capture_output=True, text=True, timeout=60)
            assert dry.returncode == 0, dry.stderr
            assert dry.stdout.strip().splitlines()[-1].strip() == entry.make_prints, command
        if entry.parser is not None:
            module, function = entry.parser.split(":")
            words = [w.strip("[]") for w in shlex.split(command.key)]
            args = words[3:] if words[1] == "-m" else words[2:]
            getattr(importlib.import_module(module), function)(args)  # exits 2 if they don't


def test_options_named_in_readme_prose_exist():
    """Flags the prose names (`--force`, `serve --eval-config eval.toml`) are options of the
    two CLIs, of the demo, or of a README command (those run, so their flags are real)."""
    from contributor.cli import build_parser as contributor_parser
    from coordinator.cli import build_parser as coordinator_parser
    from demo.__main__ import build_parser as demo_parser

    commands, spans = parse_readme(README.read_text(encoding="utf-8"))
    known = _options(contributor_parser()) | _options(coordinator_parser())
    known |= _options(demo_parser())
    known |= {flag for c in commands for flag in re.findall(r"--[a-z][\w-]*", c.text)}
    named = {(line, flag) for line, span in spans for flag in re.findall(r"--[a-z][\w-]*", span)}
    unknown = sorted(f"README.md:{line}: {flag}" for line, flag in named if flag not in known)
    assert not unknown, "options neither CLI has:\n" + "\n".join(unknown)


def _options(parser) -> set[str]:
    found = set()
    for action in parser._actions:
        found |= {o for o in action.option_strings if o.startswith("--")}
        if isinstance(action.choices, dict):  # a subcommand's parsers
            for sub in action.choices.values():
                found |= _options(sub)
    return found



@pytest.fixture(scope="module")
def walk(tmp_path_factory, readme):
    workdir = tmp_path_factory.mktemp("readme")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "RAY_AUTH_MODE": "disabled",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        env.pop(key, None)  # where to track is the README's to say
    values = {"HOST": "127.0.0.1", "STORE": str(workdir / "store"),
              "smollm2-135m": "tiny-llama",  # tests never load SmolLM2
              "50051": str(free_port()), "5000": str(free_port()), "5001": str(free_port())}
    walk = Walkthrough(readme, RUN_HERE, (*RUN_HERE, *ELSEWHERE), workdir, env, values)
    yield walk
    print("\nREADME commands, wall seconds from start until collected:")  # with -s
    for shown, seconds in walk.timings:
        print(f"{seconds:6.1f}  {shown[:150]}")


@dataclass
class Federation:
    """The coordinator the README's commands started, and what the contributor sent it."""

    server: CommandProcess
    store: Path
    outputs: dict[str, subprocess.CompletedProcess]  # what each command printed
    expert_ids: dict[str, str]  # bundle folder -> expert id
    versions: tuple[str, str]  # (one expert, both experts), oldest first


# A recycled adapter: peft initialises LoRA's B at zero, which would leave the gate nothing to
# learn from, so the factors are perturbed as training would have moved them.
_PEFT_ADAPTER = """
import sys, torch
from peft import LoraConfig, get_peft_model
from routing.base import load_base
model = get_peft_model(load_base("tiny-llama").model,
                       LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
torch.manual_seed(3)
with torch.no_grad():
    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.add_(0.1 * torch.randn_like(parameter))
model.save_pretrained(sys.argv[1])
"""


@pytest.fixture(scope="module")
def federation(walk):
    """The contributor's and the operator's first commands: a token, the coordinator, two
    experts (one trained, one a recycled peft adapter) submitted, each assembled into a
    version of its own."""
    from coordinator.service.health import check
    from coordinator.store.versions import VersionStore
    from tests.harness.chaos import wait_settled  # both experts assembled and tracked

    out: dict[str, subprocess.CompletedProcess] = {}
    store = Path(walk.values["STORE"])
    out["token add"] = walk.run("gaggle-coordinator token add")
    walk.env["TOKEN"] = out["token add"].stdout.strip().splitlines()[-1]
    server = walk.launch("gaggle-coordinator serve")  # Ray starts while the expert trains
    try:
        adapter = subprocess.Popen([sys.executable, "-c", _PEFT_ADAPTER, "peft-adapter"],
                                   cwd=walk.workdir, env=walk.env)
        write_records(walk.workdir / "private.jsonl")
        out["train"] = walk.run("gaggle-contributor train", *TINY_TRAINING)
        assert adapter.wait(timeout=300) == 0
        gate = walk.spawn("gaggle-contributor gate", *TINY_TRAINING[2:],
                          values={"PEFT_DIR": "peft-adapter", "DIR": "recycled"})
        inspect = walk.spawn("gaggle-contributor inspect")
        address = f"127.0.0.1:{walk.values['50051']}"
        server.wait_ready(lambda: check(address, timeout=1), 180, "gaggle-coordinator serve")
        out["submit"] = walk.run("gaggle-contributor submit")
        ids = {"my-expert": out["submit"].stdout.strip().splitlines()[-1]}
        # The first version must exist before the second expert arrives, or one version
        # could hold both.
        server.wait_ready(lambda: _current_holds(store, ids["my-expert"]), 240,
                          "a version holding my-expert")
        out["gate"], out["inspect"] = gate.result(), inspect.result()
        out["submit recycled"] = walk.run("gaggle-contributor submit",
                                          values={"my-expert": "recycled"})
        ids["recycled"] = out["submit recycled"].stdout.strip().splitlines()[-1]
        status = walk.spawn("gaggle-contributor status")
        settled = wait_settled(store, set(ids.values()), timeout_s=240)
        assert settled, f"{settled.reason}\n{server.log()[-3000:]}"
        out["status"] = status.result()
        versions = tuple(m.version_id for m in VersionStore(store).all())
        walk.check_ran("federation")
        yield Federation(server, store, out, ids, versions)
    finally:
        code = server.stop()
    assert code == 0, server.log()[-3000:]


def _current_holds(store: Path, expert_id: str) -> bool:
    """Whether the coordinator's current version holds `expert_id`."""
    from coordinator.store.versions import VersionStore

    versions = VersionStore(store)
    try:
        current = versions.current_id()
        return bool(current) and expert_id in versions.manifest(current).expert_ids
    except (OSError, ValueError):  # a pointer or manifest being replaced: look again
        return False


@dataclass
class Operated:
    """What the operator's commands did after the federation settled."""

    outputs: dict[str, subprocess.CompletedProcess]
    means: dict[str, float]  # version -> mean accuracy from `evaluate`
    best: str  # promoted first
    champion: str  # refused as worse, then promoted with --force
    exported: Path  # exported/VERSION of the newest version
    ui: CommandProcess  # `mlflow ui`, started last (it may still be booting)
    ui_url: str


@pytest.fixture(scope="module")
def operated(walk, federation):
    """The operator's commands: `evaluate` while the read-only ones, export, `token revoke`
    and a revoked `status` run (then the coordinator is told to stop); then `promote` (the
    better version, then the other: refused as worse, and with --force); then `mlflow ui`
    starts while `versions` runs."""
    old, new = federation.versions
    (walk.workdir / "eval.toml").write_text('tasks = ["imdb-sentiment"]\nexamples_per_task = 4\n'
                                            "batch_size = 4\nmax_length = 64\n")
    evaluate = walk.spawn("gaggle-coordinator evaluate", values={"OLD": old, "NEW": new})
    background = {
        "token list": walk.spawn("gaggle-coordinator token list"),
        "experts": walk.spawn("gaggle-coordinator experts"),
        "diff": walk.spawn("gaggle-coordinator diff", values={"OLD": old, "NEW": new}),
        "export": walk.spawn("gaggle-coordinator export", values={"VERSION": new}),
    }
    out = {name: pending.result() for name, pending in background.items()}
    out["token revoke"] = walk.run("gaggle-coordinator token revoke")
    out["status revoked"] = walk.run("gaggle-contributor status", expect=2)
    out["evaluate"] = evaluate.result()
    federation.server.terminate()  # nothing below needs it; its teardown checks the exit
    means = {v: float(m) for v, m in
             re.findall(r"version (\w+): .*accuracy=([0-9.]+)", out["evaluate"].stdout)}
    assert set(means) == {old, new}, out["evaluate"].stdout
    best, other = sorted((old, new), key=lambda v: -means[v])  # a tie keeps NEW second
    out["promote"] = walk.run("gaggle-coordinator promote", values={"VERSION": best})
    # A negative allowed drop: `other` would have to beat `best` by 0.5, and it is no better.
    out["refused"] = walk.run("gaggle-coordinator promote", "--max-drop", "-0.5",
                              values={"VERSION": other}, expect=2)
    out["forced"] = walk.run("gaggle-coordinator promote", "--force", values={"VERSION": other})
    ui = walk.launch("mlflow ui")
    try:
        out["versions"] = walk.run("gaggle-coordinator versions")
        walk.check_ran("operated")
        yield Operated(out, means, best, other, walk.workdir / "exported" / new, ui,
                       f"http://127.0.0.1:{walk.values['5000']}")
    finally:
        ui.stop()


# ----- the walk-through -----

def test_contributor_commands(federation):
    """train, gate (recycling a peft adapter), inspect, submit and status, as written."""
    out, ids = federation.outputs, federation.expert_ids
    assert "wrote my-expert: lora expert 'my-expert'" in out["train"].stdout
    assert "wrote recycled: lora expert 'recycled', 4 modules" in out["gate"].stdout
    assert "validates: yes" in out["inspect"].stdout
    assert f"expert id: {ids['my-expert']}" in out["inspect"].stdout
    assert all(EXPERT_ID.match(i) for i in ids.values()) and len(set(ids.values())) == 2
    assert "my-expert: accepted" in out["submit"].stdout
    status = out["status"].stdout
    assert "base model: tiny-llama" in status and "you are alice: 2 expert(s)" in status
    assert all(i in status for i in ids.values())
    assert len(federation.versions) == 2


def test_operator_commands(federation, operated):
    """token list, experts, diff, evaluate, promote (refused, then --force), export, versions
    and token revoke, as written, against the running coordinator's store."""
    old, new = federation.versions
    out = operated.outputs
    assert "alice" in out["token list"].stdout
    assert all(word in out["experts"].stdout for word in ("my-expert", "recycled", "2 experts"))
    assert f"diff {old} -> {new}" in out["diff"].stdout and "+ alice/recycled" in out["diff"].stdout
    assert f"exported version {new} (2 experts" in out["export"].stdout
    assert (operated.exported / "version.json").is_file()

    assert f"champion -> {operated.best}" in out["promote"].stdout
    assert "pass --force" in out["refused"].stderr
    assert f"champion -> {operated.champion}" in out["forced"].stdout
    rows = {line.split()[0]: line for line in out["versions"].stdout.splitlines()[1:]}
    assert set(rows) == {old, new}
    assert "latest" in rows[new] and "champion" in rows[operated.champion]
    assert all(f"accuracy={operated.means[v]:.4g}" in rows[v] for v in rows)

    assert "revoked 1 token(s) of alice" in out["token revoke"].stdout
    assert "revoked" in out["status revoked"].stderr


def test_consumer_code_and_model_serving(walk, operated):
    """The MLflow UI answers with the registry; the consumer's Python runs as written against
    it; `mlflow models serve` answers the README's curl request."""
    url = operated.ui_url
    operated.ui.wait_ready(lambda: http_ok(f"{url}/health"), 180, "mlflow ui")
    serving = walk.launch("mlflow models serve")  # boots while the rest runs
    try:
        loading = walk.spawn_python("mlflow.pyfunc.load_model(")
        routing = walk.spawn_python("load_router(", values={"VERSION": operated.exported.name})
        assert http_ok(url)  # the UI page itself
        with urllib.request.urlopen(f"{url}/api/2.0/mlflow/registered-models/alias"
                                    "?name=gaggle-router&alias=champion", timeout=30) as reply:
            promoted = json.loads(reply.read())["model_version"]
        tags = {t["key"]: t["value"] for t in promoted.get("tags", [])}
        assert tags.get("gaggle.version_id") == operated.champion, promoted

        [completion] = ast.literal_eval(loading.result().stdout.strip().splitlines()[-1])
        assert isinstance(completion, str)
        routing.result()
        assert (walk.workdir / "usage.png").read_bytes().startswith(PNG_MAGIC)

        port = walk.values["5001"]
        serving.wait_ready(lambda: http_ok(f"http://127.0.0.1:{port}/ping"), 240,
                           "mlflow models serve")
        [served] = json.loads(walk.run("curl").stdout)["predictions"]
        assert isinstance(served, str)
    finally:
        serving.stop()
    walk.check_ran("test_consumer_code_and_model_serving")


def test_benchmark_commands(walk, tmp_path, tiny_spec):
    """The README's benchmark commands, shrunk to the tiny model and a few seconds by
    arguments appended after the README's own (later flags win)."""
    from protocol.bundle import save_bundle
    from routing.synthetic import random_bundle

    experts = tmp_path / "experts"
    for seed, task in enumerate(("tweet-sentiment", "boolq")):
        save_bundle(random_bundle(tiny_spec, task, seed=seed, with_activations=True),
                    experts / task)
    gain = walk.spawn("python -m bench.expert_gain", "--base", "tiny-llama", "--train-examples",
                      "16", "--test-examples", "4", cwd=ROOT)
    shares = walk.spawn("python -m bench.gate_shares", "--base", "tiny-llama", "--examples", "3",
                        values={"DIR": str(experts)}, cwd=ROOT)
    inference = walk.spawn("python -m bench.inference", "--base", "tiny-llama", "--experts", "8",
                           "--naive-experts", "8", "--rounds", "1", "--out",
                           str(tmp_path / "inference.json"), cwd=ROOT)
    transport = walk.spawn("python -m bench.transport", "--repeats", "1", values={"200": "1"},
                           cwd=ROOT)
    assert "routed_8" in inference.result().stdout
    assert (tmp_path / "inference.json").is_file()
    assert "ratio submit/raw" in transport.result().stdout
    gained = gain.result(300).stdout
    assert "16 train examples, 4 test examples" in gained and "expert accuracy" in gained
    table = shares.result().stdout
    assert "all tokens / scored positions" in table and "average_activation" in table
    assert {line.split()[0] for line in table.splitlines()[2:4]} == {"boolq", "tweet-sentiment"}
    walk.check_ran("test_benchmark_commands")
