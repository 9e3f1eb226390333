"""The daemon's layers, read from its import statements: the domain core knows no
gRPC, asyncio or other part of the daemon but its limits; the application knows no
adapter (transport, state, metrics, the daemon); and no package imports back up into
one that imports it (no cycle among the top-level packages and modules)."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

SERVER = Path(__file__).resolve().parents[2] / "server" / "pagetrackd"


def _imports() -> dict[str, set[str]]:
    """Top-level part of pagetrackd (package or module) -> what it imports at run time:
    other parts of pagetrackd, and third-party roots as ``ext:<name>``. Imports under
    ``if TYPE_CHECKING:`` are types only and do not count."""
    out: dict[str, set[str]] = defaultdict(set)
    for path in SERVER.rglob("*.py"):
        if path.name.endswith("_pb2.py") or path.name.endswith("_pb2_grpc.py"):
            continue
        part = path.relative_to(SERVER).parts[0].removesuffix(".py")
        tree = ast.parse(path.read_text())
        skip: set[int] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                skip.update(id(n) for n in ast.walk(node))
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            names: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                bits = name.split(".")
                if bits[0] != "pagetrackd":
                    out[part].add(f"ext:{bits[0]}")
                elif len(bits) > 1 and bits[1] != part:
                    out[part].add(bits[1])
    return out


def test_the_domain_core_imports_no_transport_and_no_other_layer() -> None:
    domain = _imports()["domain"]
    assert {i for i in domain if not i.startswith("ext:")} <= {"limits"}, domain
    assert not domain & {"ext:grpc", "ext:asyncio", "ext:pagetrack"}, domain


def test_the_application_imports_no_adapter() -> None:
    application = _imports()["application"]
    adapters = {"transport", "state", "metrics", "app", "ext:grpc"}
    assert not application & adapters, application & adapters


def test_no_cycle_among_the_daemons_parts() -> None:
    graph = {k: {d for d in v if not d.startswith("ext:")} for k, v in _imports().items()}

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            node = todo.pop()
            for nxt in graph.get(node, ()):
                if nxt == goal:
                    return True
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return False

    cycles = sorted(f"{a} -> {b} -> ... -> {a}" for a in graph for b in graph[a]
                    if reaches(b, a))
    assert not cycles, cycles
