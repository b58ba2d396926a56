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
