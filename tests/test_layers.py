"""The architecture shows in the imports: each layer imports only those below it (STYLE.md, rule 1).

Read statically with ``ast`` (imports inside functions, and under ``if TYPE_CHECKING:``, included), so
neither a lazy import nor a type-only one can hide a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# What each bottom layer may import from papa-merge; everything above may import these.
ALLOWED = {
    "merge/errors.py": set(),
    "merge/keys.py": set(),
    "merge/params.py": {"merge.errors"},
    "merge/backend": {"merge.backend"},
    "merge/io": {"merge.errors", "merge.keys", "merge.backend", "merge.io"},
    "merge/ops": {"merge.errors", "merge.keys", "merge.params", "merge.backend", "merge.ops"},
    "merge/reader.py": {"merge.errors", "merge.keys", "merge.backend", "merge.io"},
    "merge/engine.py": {"merge.errors", "merge.keys", "merge.backend", "merge.io", "merge.ops", "merge.reader",
                        "merge.engine"},
}


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names if node.module == "merge")
    return found


def _files(layer: str) -> list[Path]:
    p = ROOT / layer
    return sorted(p.rglob("*.py")) if p.is_dir() else [p]


def _ours(name: str) -> bool:
    return name == "merge" or name.startswith(("merge.", "cli"))


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_bottom_layers_import_only_what_is_below(layer: str) -> None:
    bad = []
    for f in _files(layer):
        for name in _imports(f):
            if _ours(name) and not any(name == a or name.startswith(a + ".") for a in ALLOWED[layer]):
                bad.append(f"{f.relative_to(ROOT)} imports {name}")
    assert not bad, "\n".join(bad)


def test_the_library_never_imports_the_cli_or_click() -> None:
    bad = [f"{f.relative_to(ROOT)} imports {n}" for f in _files("merge") for n in _imports(f)
           if n == "click" or n.startswith(("click.", "cli"))]
    assert not bad, "\n".join(bad)


def test_metadata_keys_are_spelled_in_one_module() -> None:
    spelled = [f.relative_to(ROOT) for f in _files("merge") if f.name != "keys.py"
               for node in ast.walk(ast.parse(f.read_text()))
               if isinstance(node, ast.Constant) and isinstance(node.value, str)
               and node.value.startswith("papa_merge.") and " " not in node.value]
    assert not spelled, f"papa_merge.* keys spelled outside merge/keys.py: {spelled}"


# --- the whole library: no import cycle, no module reaching into another's private names ------------------


def _module_of(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _graph() -> dict[str, set[str]]:
    """Module -> the modules of ``merge`` it imports (a package's ``__init__`` is the package's module;
    importing ``merge.a.b`` counts as importing that module, not its parents' ``__init__``)."""
    files = {_module_of(f): f for f in _files("merge")}
    graph: dict[str, set[str]] = {}
    for mod, f in files.items():
        targets = set()
        for name in _imports(f):
            # ``from merge.x import y`` is listed as merge.x and (for the merge package) merge.x.y: keep
            # the longest name that is a module.
            while name and name not in files:
                name = name.rpartition(".")[0]
            if name and name != mod:
                targets.add(name)
        graph[mod] = targets
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_anywhere_in_the_library() -> None:
    graph = _graph()
    assert "merge.train.registry" in graph and "merge.ops.registry" in graph  # the graph reads the packages
    cycles = _cycles(graph)
    assert not cycles, "import cycles (imports inside functions count):\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_no_module_imports_another_modules_private_names() -> None:
    bad = []
    for f in _files("merge") + _files("cli"):
        mod = _module_of(f)
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(("merge", "cli")) \
                    and node.module != mod:
                private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                # A package's private helper module (merge/backend/lazy.py) exists to be imported by its package.
                if private and not node.module.rpartition(".")[2].startswith("_"):
                    bad.append(f"{f.relative_to(ROOT)}: from {node.module} import {', '.join(private)}")
    assert not bad, "private names used across modules (make them public or keep them home):\n" + "\n".join(bad)
