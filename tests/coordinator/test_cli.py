"""`gaggle-coordinator`: commands on an existing store refuse a --store that holds none, and
create nothing there; only `serve` and `token add` start a new store."""

from __future__ import annotations

import pytest

from coordinator.cli import main
from coordinator.store.layout import INDEX

# Every command that reads or operates an existing store, with its other arguments.
EXISTING_STORE_COMMANDS = {
    "experts": ["experts"],
    "versions": ["versions"],
    "diff": ["diff", "aaaa", "bbbb"],
    "promote": ["promote", "aaaa"],
    "export": ["export", "aaaa", "--out", "{tmp}/exported"],
    "evaluate": ["evaluate", "aaaa", "--eval-config", "{tmp}/eval.toml"],
    "assemble": ["assemble"],
    "prune": ["prune", "--dry-run"],
    "status": ["status"],
    "token list": ["token", "list"],
    "token revoke": ["token", "revoke", "alice"],
}


def _run(capsys, argv: list[str], tmp_path) -> tuple[int, list[str]]:
    capsys.readouterr()
    code = main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.strip()]


@pytest.mark.parametrize("command", sorted(EXISTING_STORE_COMMANDS))
@pytest.mark.parametrize("where", ["missing folder", "folder without index"])
def test_a_store_that_does_not_exist_is_refused_and_nothing_is_created(tmp_path, capsys,
                                                                        command, where):
    store = tmp_path / "sotre"  # the typo an operator makes
    if where == "folder without index":
        store.mkdir()
    code, lines = _run(capsys, [*EXISTING_STORE_COMMANDS[command], "--store", str(store)],
                       tmp_path)
    assert code == 2
    assert len(lines) == 1
    assert lines[0].startswith(f"error: no gaggle store at {store} (")
    assert f"check --store, or start one with gaggle-coordinator serve --store {store}" \
        in lines[0]
    expected = [] if where == "missing folder" else ["sotre"]
    assert [p.name for p in tmp_path.iterdir()] == expected
    if store.exists():
        assert list(store.iterdir()) == []


def test_token_add_starts_a_store_that_the_other_commands_then_open(tmp_path, capsys):
    store = tmp_path / "store"
    code, lines = _run(capsys, ["token", "add", "alice", "--store", str(store)], tmp_path)
    assert code == 0 and lines == []
    assert (store / INDEX).is_file()
    capsys.readouterr()
    assert main(["experts", "--store", str(store)]) == 0
    assert capsys.readouterr().out == f"no experts in {store}\n"
    assert main(["token", "list", "--store", str(store)]) == 0
    assert capsys.readouterr().out.startswith("alice")


def test_serve_help_names_every_setting_with_its_true_default():
    # Every ServerConfig field is a flag or listed, with ServerConfig's default, in the
    # --help text of settings only the --config file holds.
    from dataclasses import MISSING, fields

    from coordinator.cli import build_parser
    from coordinator.commands.serve import FILE_ONLY
    from coordinator.server import ServerConfig

    parser = build_parser()
    serve = next(a for a in parser._subparsers._actions if a.choices).choices["serve"]
    flags = {action.dest for action in serve._actions}
    listed = {name: default for name, default, _ in FILE_ONLY}
    for field in fields(ServerConfig):
        assert (field.name in flags) != (field.name in listed), field.name
        if field.name in listed:
            default = "none" if field.default is None else str(field.default)
            assert field.default is not MISSING and listed[field.name] == default, field.name
    text = serve.format_help()
    assert all(f"{name} = {default}" in text for name, default in listed.items())
