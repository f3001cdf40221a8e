"""The architecture of docs/ARCHITECTURE.md, checked: dependencies point one way, inference does not
pull in training, and the training code stays in small functions."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "milhema"

# Each room of the package and the rooms it may import from (besides itself). Read bottom-up, this
# is the data flow: a room never reaches up to a later step. A new import that breaks this is a
# design change: change docs/ARCHITECTURE.md with it.
ALLOWED = {
    "milhema": {"milhema.version", "milhema.api"},   # `milhema.load_run`, loaded on first use
    "milhema.version": set(),
    "milhema.errors": set(),
    "milhema.io": {"milhema.errors"},
    "milhema.device": {"milhema.errors"},
    "milhema.privacy": {"milhema.errors", "milhema.io"},
    "milhema.settings": set(),
    "milhema.models": {"milhema.errors"},
    "milhema.config": {"milhema.errors", "milhema.models", "milhema.settings"},
    "milhema.data": {"milhema.errors", "milhema.io"},
    "milhema.bags": {"milhema.version", "milhema.errors", "milhema.io"},
    # Importers write manifests for public layouts: they list images (slides) and read feature files (bags).
    "milhema.importers": {"milhema.errors", "milhema.io", "milhema.data", "milhema.slides", "milhema.bags"},
    "milhema.tracking": {"milhema.errors", "milhema.privacy", "milhema.settings"},
    "milhema.slides": {"milhema.errors", "milhema.io", "milhema.data"},
    # The simulator writes the files the readers read (manifest, crop folders, scans with truth).
    "milhema.synth": {"milhema.version", "milhema.errors", "milhema.io", "milhema.slides"},
    "milhema.embed": {"milhema.version", "milhema.errors", "milhema.io", "milhema.device", "milhema.data", "milhema.bags",
                      "milhema.slides"},
    # The differential count from a cell classifier's probabilities in the bags (and the patient features from it).
    "milhema.differential": {"milhema.errors", "milhema.data", "milhema.bags"},
    "milhema.train": {"milhema.version", "milhema.errors", "milhema.io", "milhema.device", "milhema.settings", "milhema.config",
                      "milhema.models", "milhema.data", "milhema.bags", "milhema.tracking", "milhema.differential"},
    # Cell-level learning on the bags' frozen features; reuses train's calibration, metrics and bag helpers.
    "milhema.cells": {"milhema.version", "milhema.errors", "milhema.io", "milhema.device", "milhema.settings",
                      "milhema.config", "milhema.data", "milhema.bags", "milhema.train", "milhema.differential"},
    "milhema.explain": {"milhema.errors", "milhema.io", "milhema.device", "milhema.data", "milhema.bags",
                        "milhema.slides", "milhema.train", "milhema.differential"},
    "milhema.demo": {"milhema.errors", "milhema.config", "milhema.data", "milhema.embed", "milhema.explain", "milhema.io",
                     "milhema.synth", "milhema.tracking", "milhema.train"},
    "milhema.cli": {"milhema.version", "milhema.errors", "milhema.settings", "milhema.config", "milhema.data", "milhema.importers",
                    "milhema.synth", "milhema.embed", "milhema.train", "milhema.explain", "milhema.tracking",
                    "milhema.demo", "milhema.cells"},
    "milhema.__main__": {"milhema.cli"},
    # The notebook API: a run folder as an object (inference, cell tables, figures).
    "milhema.api": {"milhema.errors", "milhema.device", "milhema.settings", "milhema.bags", "milhema.slides",
                    "milhema.train", "milhema.explain", "milhema.data", "milhema.differential"},
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, int]]:
    """Every milhema module ``path`` imports, at any depth (module level, inside functions, or
    under ``TYPE_CHECKING``), with its line."""
    found = []
    module = _module_name(path)
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = module.split(".")[: len(module.split(".")) - node.level + (path.stem == "__init__")]
                base = ".".join([*anchor, *([base] if base else [])])
            found += [(f"{base}.{alias.name}", node.lineno) for alias in node.names]
    return [(name, line) for name, line in found if name == "milhema" or name.startswith("milhema.")]


def _room(module: str) -> str:
    """The package a module belongs to: ``milhema.train.cv`` -> ``milhema.train``; top-level modules are rooms."""
    parts = module.split(".")
    return ".".join(parts[:2])


def _existing(module: str) -> str | None:
    """``module`` if it is a file of the package (``from milhema.train import cv`` names a module,
    ``from milhema.train.cv import run_cv`` a function), else its parent module."""
    parts = module.split(".")
    while parts:
        candidate = PACKAGE.parent.joinpath(*parts)
        if candidate.with_suffix(".py").is_file() or (candidate / "__init__.py").is_file():
            return ".".join(parts)
        parts.pop()
    return None


def _edges() -> dict[tuple[str, str], list[str]]:
    """Room -> room dependencies, each with the places (file:line) that make it."""
    edges: dict[tuple[str, str], list[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        source = _room(_module_name(path))
        for name, line in _imports(path):
            target = _existing(name)
            if target is None:
                continue
            room = _room(target)
            if room != source:
                edges.setdefault((source, room), []).append(f"{path.relative_to(PACKAGE.parent)}:{line}")
    return edges


def test_every_room_is_known() -> None:
    rooms = {_room(_module_name(p)) for p in PACKAGE.rglob("*.py")}
    assert rooms == set(ALLOWED), "a new module or package: give it a place in ALLOWED and docs/ARCHITECTURE.md"


def test_dependencies_point_one_way() -> None:
    wrong = [f"{a} imports {b} ({', '.join(where)})" for (a, b), where in _edges().items() if b not in ALLOWED[a]]
    assert wrong == []


def test_no_import_cycle_between_rooms() -> None:
    graph: dict[str, set[str]] = {}
    for a, b in _edges():
        graph.setdefault(a, set()).add(b)
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join([*path[path.index(nxt):], nxt]))
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for room in sorted(graph):
        if room not in state:
            visit(room, [room])


def test_train_never_imports_explain() -> None:
    lazy = [f"{path.name}:{line} {name}" for path in (PACKAGE / "train").rglob("*.py")
            for name, line in _imports(path) if name.startswith("milhema.explain")]
    assert lazy == []


def test_the_allowed_map_is_itself_acyclic() -> None:
    """So the rules above can never permit a cycle, whatever imports are added within them."""
    order: list[str] = []
    pending = {room: set(deps) for room, deps in ALLOWED.items()}
    while pending:
        ready = sorted(room for room, deps in pending.items() if deps <= set(order))
        assert ready, f"ALLOWED has a cycle among {sorted(pending)}"
        order += ready
        for room in ready:
            del pending[room]


def _loaded_after(statement: str) -> set[str]:
    """The milhema modules a fresh interpreter has loaded after ``statement``."""
    code = f"import sys; {statement}; print('\\n'.join(m for m in sys.modules if m.startswith('milhema')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_predict_and_explain_do_not_load_the_training_orchestration() -> None:
    training = {"milhema.train.run", "milhema.train.cv", "milhema.train.loop", "milhema.train.resume"}
    assert _loaded_after("import milhema.train.predict") & training == set()
    assert _loaded_after("import milhema.explain.run") & training == set()
    assert "milhema.explain.scores" not in _loaded_after("import milhema.train.cv")


def test_training_functions_are_short() -> None:
    """No function of milhema/train over 60 lines (its docstring not counted): a fold, an aggregation
    and a writer each get a name, as in scikit-learn's cross_validate."""
    long = []
    for path in sorted((PACKAGE / "train").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = node.body[0]
                doc = (first.end_lineno - first.lineno + 1) if (
                    isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                    and isinstance(first.value.value, str)) else 0
                length = node.end_lineno - node.lineno + 1 - doc
                if length > 60:
                    long.append(f"{path.name}:{node.lineno} {node.name} ({length} lines)")
    assert long == []
