"""The house's import directions, read from the source with `ast`: every import counts, also one
inside a function or under `if TYPE_CHECKING:`, because each is a dependency a reader must know.

Three rules, each a table below that a change of architecture edits on purpose:
- packages import only the packages below them (`PACKAGES`), and the core stays free of the
  heavy services it does not need (`FORBIDDEN`);
- the coordinator's rooms import only the rooms listed for them (`ROOMS`);
- no module imports, directly or through others, a module that imports it back.

`python -m pytest tests/test_import_directions.py -q` checks them; on failure the message names
the importing file and line.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Each package of ours -> the packages of ours it may import. `tests.harness` is listed apart
# from the rest of tests/: it is the library the benchmarks share with the tests.
PACKAGES: dict[str, set[str]] = {
    "protocol": set(),
    "routing": {"protocol"},
    "tasks": {"protocol"},
    "contributor": {"protocol", "routing"},
    "coordinator": {"protocol", "routing", "tasks"},
    "demo": {"protocol", "routing", "tasks", "contributor", "coordinator"},
    "tests.harness": {"protocol", "routing", "tasks", "contributor", "coordinator", "demo"},
    "bench": {"protocol", "routing", "tasks", "contributor", "coordinator", "demo",
              "tests.harness"},
}

# Third-party packages a package must not import: routing is the math and runs anywhere torch
# does; the wire contract and the contributor know nothing of the coordinator's Ray or MLflow.
FORBIDDEN: dict[str, set[str]] = {
    "protocol": {"ray", "mlflow", "peft", "transformers", "matplotlib"},
    "routing": {"grpc", "ray", "mlflow"},
    "tasks": {"grpc", "ray", "mlflow", "torch"},
    "contributor": {"ray", "mlflow"},
}

# The coordinator's rooms -> the rooms they may import (the package's own __init__ holds only
# a docstring). Read bottom-up: the store and the Ray set-up need nothing; commands and the CLI
# sit on top.
ROOMS: dict[str, set[str]] = {
    "metrics": set(),  # named once, updated from the rooms where things happen
    "store": set(),
    "ray_cluster": set(),
    "intake": {"store", "metrics"},
    "tracking": {"store", "metrics"},
    "checks": {"store", "ray_cluster"},
    "versions": {"store", "ray_cluster", "tracking", "checks", "metrics"},
    "service": {"store", "intake", "tracking", "versions", "metrics"},
    # the server owns its Ray (started and stopped with it) and reads the evaluation config
    "server": {"store", "intake", "service", "versions", "ray_cluster", "checks", "metrics",
               "tracking"},
    "commands": {"store", "tracking", "checks", "versions", "service", "server", "ray_cluster"},
    "cli": {"commands", "store"},
}


@dataclass(frozen=True)
class Import:
    source: str  # the importing module, dotted
    target: str  # what it names, dotted (a module, or a module's attribute)
    where: str  # path:line, for the failure message


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(folder: str) -> Iterator[Import]:
    for path in sorted((ROOT / folder).rglob("*.py")):
        source = module_name(path)
        package = source if path.name == "__init__.py" else source.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Import):
                for alias in node.names:
                    yield Import(source, alias.name, where)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: resolve against the importing package
                    parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join([*parent, *([base] if base else [])])
                for alias in node.names:
                    yield Import(source, f"{base}.{alias.name}", where)


def owner(name: str) -> str:
    """The PACKAGES key a dotted name belongs to ('' for third-party and the standard library)."""
    if name.startswith("tests.harness"):
        return "tests.harness"
    top = name.split(".")[0]
    return top if top in PACKAGES or top == "tests" else ""


def test_packages_import_only_the_packages_below_them():
    wrong = []
    for folder in ("protocol", "routing", "tasks", "contributor", "coordinator", "demo",
                   "tests/harness", "bench"):
        for imp in imports(folder):
            mine, theirs = owner(imp.source), owner(imp.target)
            if theirs and theirs != mine and theirs not in PACKAGES[mine]:
                wrong.append(f"{imp.where}: {mine} imports {imp.target}")
    assert not wrong, "imports against the direction of PACKAGES:\n" + "\n".join(wrong)


def test_the_core_stays_free_of_services_it_does_not_need():
    wrong = [f"{imp.where}: {folder} imports {imp.target}"
             for folder, banned in FORBIDDEN.items() for imp in imports(folder)
             if imp.target.split(".")[0] in banned]
    assert not wrong, "\n".join(wrong)


def room(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if parts[0] == "coordinator" and len(parts) > 1 else None


def test_the_coordinators_rooms_import_only_the_rooms_below_them():
    rooms = {module_name(p).split(".")[1] for p in (ROOT / "coordinator").iterdir()
             if p.suffix == ".py" and p.stem != "__init__" or (p / "__init__.py").exists()}
    assert rooms == set(ROOMS), "a room was added or removed: list it in ROOMS"
    wrong = []
    for imp in imports("coordinator"):
        mine, theirs = room(imp.source), room(imp.target)
        if mine is None:  # coordinator/__init__.py
            assert theirs is None, f"{imp.where}: the package's __init__ imports {imp.target}"
        elif theirs is not None and theirs != mine and theirs not in ROOMS[mine]:
            wrong.append(f"{imp.where}: {mine} imports {imp.target}")
    assert not wrong, "imports against the direction of ROOMS:\n" + "\n".join(wrong)


def module_graph(folders: tuple[str, ...]) -> dict[str, set[str]]:
    """Module -> the modules of ours it imports (a `from package import name` counts as the
    submodule when `name` is one, else as the package)."""
    modules = {module_name(p) for folder in folders for p in (ROOT / folder).rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for folder in folders:
        for imp in imports(folder):
            target = imp.target
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != imp.source:
                graph[imp.source].add(target)
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_module_imports_itself_through_others():
    graph = module_graph(("protocol", "routing", "tasks", "contributor", "coordinator", "demo"))
    assert len(graph) > 80  # the walk found the code
    assert not circles(graph), f"import circles: {circles(graph)}"


def test_the_circle_finder_finds_a_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert circles(graph) == [["a", "b", "c"]]
