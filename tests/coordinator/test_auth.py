"""Contributor tokens: issued once, stored as hashes, revocable; and the token CLI."""

from __future__ import annotations

import pytest

from coordinator.cli import main as coordinator_main
from coordinator.service.auth import TokenBook, bearer_token
from coordinator.store.experts import Store
from protocol.errors import AlreadyExists, InvalidArgument, NotFound, Unauthenticated


@pytest.fixture
def book(tmp_path) -> TokenBook:
    store = Store(tmp_path / "store")
    yield TokenBook(store)
    store.close()


def test_token_verifies_to_its_contributor_and_only_its_hash_is_stored(book):
    token = book.add("alice")
    identity = book.verify(token)
    assert (identity.contributor, identity.role) == ("alice", "contributor")
    book.store.close()
    on_disk = b"".join(p.read_bytes() for p in book.store.root.glob("index.sqlite*"))
    assert token.encode() not in on_disk
    secret = token[len("gg_0123456789ab_"):]  # the secret itself may contain "_"
    assert len(secret) == 43 and secret.encode() not in on_disk


@pytest.mark.parametrize("forged", [
    "", "nonsense", "gg_0123456789ab_" + "A" * 43, "Bearer gg_x",
])
def test_malformed_or_unknown_tokens_are_refused(book, forged):
    book.add("alice")
    with pytest.raises(Unauthenticated, match="not valid"):
        book.verify(forged)


def test_right_id_with_wrong_secret_is_refused(book):
    token = book.add("alice")
    forged = token[:-1] + ("A" if token[-1] != "A" else "B")
    with pytest.raises(Unauthenticated):
        book.verify(forged)


def test_a_valid_token_with_a_trailing_newline_is_refused(book):
    token = book.add("alice")
    with pytest.raises(Unauthenticated):
        book.verify(token + "\n")


def test_revoked_tokens_are_refused_and_new_ones_work(book):
    old = book.add("alice")
    assert book.revoke("alice") == 1
    with pytest.raises(Unauthenticated, match="revoked"):
        book.verify(old)
    with pytest.raises(AlreadyExists, match="--rotate"):
        book.add("alice")
    new = book.add("alice", rotate=True)
    assert book.verify(new).contributor == "alice"
    assert book.list() == [("alice", "contributor", 1, 1)]


def test_bad_names_and_unknown_contributors_are_named_in_the_error(book):
    with pytest.raises(InvalidArgument, match="not allowed"):
        book.add("../etc")
    with pytest.raises(NotFound, match="token list"):
        book.revoke("nobody")


@pytest.mark.parametrize("metadata, expected", [
    ((("authorization", "Bearer abc"),), "abc"),
    ((("authorization", "bearer  abc "),), "abc"),
    ((("authorization", "Basic abc"),), None),
    ((("x-other", "Bearer abc"),), None),
    ((), None),
])
def test_bearer_token_reads_only_bearer_authorization(metadata, expected):
    assert bearer_token(metadata) == expected


def test_token_cli_prints_the_token_once_and_lists_contributors(tmp_path, capsys):
    store = str(tmp_path / "store")
    assert coordinator_main(["token", "add", "alice", "--store", store]) == 0
    token = capsys.readouterr().out.strip().splitlines()[-1]
    handle = Store(store)
    assert TokenBook(handle).verify(token).contributor == "alice"
    assert coordinator_main(["token", "list", "--store", store]) == 0
    assert "alice" in capsys.readouterr().out and token not in capsys.readouterr().out
    assert coordinator_main(["token", "revoke", "alice", "--store", store]) == 0
    with pytest.raises(Unauthenticated):
        TokenBook(handle).verify(token)
    assert coordinator_main(["token", "revoke", "nobody", "--store", store]) == 2
    handle.close()


def test_a_role_changes_only_by_its_command_and_a_rotation_says_what_stays_valid(tmp_path,
                                                                                 capsys):
    store = ["--store", str(tmp_path / "store")]
    assert coordinator_main(["token", "add", "bob", *store]) == 0
    first = capsys.readouterr().out.strip().splitlines()[-1]
    assert coordinator_main(["token", "add", "bob", "--admin", *store]) == 2  # not by add
    assert coordinator_main(["token", "role", "bob", "admin", *store]) == 0
    assert "bob: contributor -> admin" in capsys.readouterr().out
    book = TokenBook(Store(tmp_path / "store"))
    assert book.verify(first).role == "admin"  # the old token carries the new role

    assert coordinator_main(["token", "add", "bob", "--rotate", *store]) == 0
    out = capsys.readouterr().out
    assert "1 older token(s) of bob stay valid" in out
    second = out.strip().splitlines()[-1]
    assert book.verify(first).contributor == book.verify(second).contributor == "bob"
    assert coordinator_main(["token", "add", "bob", "--rotate", "--revoke-others", *store]) == 0
    out = capsys.readouterr().out
    assert "2 older token(s) of bob revoked" in out
    third = out.strip().splitlines()[-1]
    for old in (first, second):
        with pytest.raises(Unauthenticated, match="revoked"):
            book.verify(old)
    assert book.verify(third).role == "admin"
