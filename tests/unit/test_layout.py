"""The engine's house: packages by concept, imports only downwards, no circles, rooms of a size a
newcomer can read (docs/architecture.md, "The rooms")."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENGINE = ROOT / "projector"
# The floors, lowest first: a module may import from its own floor and the floors below.
FLOORS = [
    {"projector.errors", "projector.redaction", "projector.metrics", "projector.messages",
     "projector.kafka"},
    {"projector.clickhouse"},
    {"projector.config"},
    {"projector.commit"},
    {"projector.replicas", "projector.read_models"},
    {"projector.operations"},
    {"projector.run"},
    {"projector.cli"},
]  # fmt: skip
MAX_LINES, MAX_METHODS = 600, 20
# Rooms larger than the rule, each with its reason.
LARGER: dict[str, str] = {}


def _modules() -> dict[str, Path]:
    found = {}
    for path in ENGINE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imports(path: Path) -> set[str]:
    """Every module this one imports, at the top or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _floor(module: str) -> int:
    for index, floor in enumerate(FLOORS):
        if any(module == room or module.startswith(room + ".") for room in floor):
            return index
    raise AssertionError(f"{module} is on no floor of the house: add it to FLOORS")


MODULES = _modules()
GRAPH = {
    name: {target for target in _imports(path) if target in MODULES and target != name}
    for name, path in MODULES.items()
}


def test_every_import_runs_down_or_along_a_floor() -> None:
    upward = [
        f"{name} (floor {_floor(name)}) imports {target} (floor {_floor(target)})"
        for name, targets in GRAPH.items()
        if name != "projector"
        for target in targets
        if target != "projector" and _floor(target) > _floor(name)
    ]
    assert upward == []


def test_no_module_imports_itself_round_a_circle() -> None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    circles: list[list[str]] = []

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for target in sorted(GRAPH[name]):
            if state.get(target) == 1:
                circles.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target, [*path, target])
        state[name] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])
    assert circles == []


def test_the_engine_never_imports_the_dev_tools_and_only_its_commands_the_query_side() -> None:
    wrong = [
        f"{name} imports {target}"
        for name, path in MODULES.items()
        for target in _imports(path)
        if target.split(".")[0] == "devstack"
        or (target.split(".")[0] == "queries" and not name.startswith("projector.cli"))
    ]
    assert wrong == []


ROOMS = sorted(
    path
    for package in ("projector", "queries", "devstack", "schemas", "connectors")
    for path in (ROOT / package).rglob("*.py")
)


@pytest.mark.parametrize("path", ROOMS, ids=lambda p: str(p.relative_to(ROOT)))
def test_a_room_is_a_size_a_newcomer_reads(path: Path) -> None:
    relative = str(path.relative_to(ROOT))
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES or relative in LARGER, f"{relative}: {lines} lines"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ClassDef):
            methods = [
                n for n in node.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)
            ]
            assert len(methods) <= MAX_METHODS, (
                f"{relative}: {node.name} has {len(methods)} methods"
            )
