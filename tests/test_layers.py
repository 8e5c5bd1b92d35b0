"""The architecture shows in the imports: each layer imports only those below it (STYLE.md, rule 1).

Read statically with ``ast`` (imports inside functions included), so a lazy import cannot hide a cycle.
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
    "merge/io": {"merge.errors", "merge.keys", "merge.io"},
    "merge/ops": {"merge.errors", "merge.keys", "merge.ops"},
    "merge/reader.py": {"merge.errors", "merge.keys", "merge.io"},
    "merge/engine.py": {"merge.errors", "merge.keys", "merge.io", "merge.ops", "merge.reader", "merge.engine"},
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
