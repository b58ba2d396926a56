"""One contract for every `Objects` implementation (the store's content-addressed objects):
add an implementation to IMPLEMENTATIONS and it runs the same suite."""

from __future__ import annotations

import pytest

from coordinator.store.objects import DiskObjects, Objects
from protocol.errors import InvalidArgument, NotFound

IMPLEMENTATIONS = {"disk": DiskObjects}
ID = "ab" * 32
OTHER = "cd" * 32


@pytest.fixture(params=sorted(IMPLEMENTATIONS))
def objects(request, tmp_path) -> Objects:
    return IMPLEMENTATIONS[request.param](tmp_path / "store")


def test_put_then_get_returns_the_same_files(objects):
    files = {"manifest.json": b"{}", "adapter.safetensors": bytes(range(256)) * 40}
    assert objects.put("experts", ID, files)
    assert objects.get("experts", ID) == files
    assert objects.exists("experts", ID) and not objects.exists("keys", ID)
    assert objects.size("experts", ID) == sum(len(v) for v in files.values())
    folder = objects.local_folder("experts", ID)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == files


def test_an_object_is_immutable_once_put(objects):
    assert objects.put("keys", ID, {"keys.safetensors": b"first"})
    assert not objects.put("keys", ID, {"keys.safetensors": b"second"})
    assert objects.get("keys", ID) == {"keys.safetensors": b"first"}


def test_put_folder_stores_a_staged_folder(objects, tmp_path):
    staged = tmp_path / "staged"
    staged.mkdir()
    (staged / "gates.safetensors").write_bytes(b"g" * 10)
    assert objects.put_folder("experts", ID, staged)
    assert objects.get("experts", ID) == {"gates.safetensors": b"g" * 10}


def test_list_and_delete(objects):
    for object_id in (OTHER, ID):
        objects.put("experts", object_id, {"f": object_id.encode()})
    assert objects.list("experts") == sorted([ID, OTHER]) and objects.list("keys") == []
    assert objects.delete("experts", ID) == len(ID)
    assert objects.list("experts") == [OTHER] and not objects.exists("experts", ID)
    assert objects.delete("experts", ID) == 0  # deleting again frees nothing
    with pytest.raises(NotFound, match="pruned"):
        objects.get("experts", ID)
    with pytest.raises(NotFound):
        objects.local_folder("experts", ID)


@pytest.mark.parametrize("kind, object_id", [("versions", ID), ("experts", "../etc"),
                                             ("experts", ""), ("experts", "ABC")])
def test_kinds_and_ids_outside_the_contract_are_refused(objects, kind, object_id):
    with pytest.raises(InvalidArgument):
        objects.put(kind, object_id, {"f": b"x"})
    with pytest.raises(InvalidArgument):
        objects.exists(kind, object_id)


def test_a_refused_put_leaves_no_trace(objects):
    with pytest.raises(InvalidArgument, match="plain name"):
        objects.put("experts", ID, {"ok": b"1", "../escape": b"2"})
    assert not objects.exists("experts", ID) and objects.list("experts") == []
    objects.clean_staging()
    assert objects.put("experts", ID, {"ok": b"1"})
