"""Every command in README.md and docs/*.md runs as printed, so none goes stale.

Each page's fenced code blocks are walked in order in one scratch folder, as a reader would follow it:

- a ```bash block runs in ``bash -e`` with the project's ``.venv/bin`` first on PATH and the repository's
  ``examples/`` reachable from the folder (a link), so ``papa-merge run examples/recipes/ties.yml`` works;
- a ```python block is executed in this process, in the same folder, in a fresh namespace (so it must
  carry its own imports);
- a block tagged ``norun`` (```bash norun, ```python norun) is not run: for bash, each command's
  executable or script must exist and its subcommand must accept ``--help`` (``make`` targets must be in
  the Makefile); for Python, the block must compile. Kept for the few commands that take tens of minutes
  (benchmarks, ``make quickstart``), need a GPU or several processes, or change the reader's shell;
- other languages (```text, ```yaml) are shown, not run.

Hub commands run against the local Hub server of the tests (``tests/hubserver.py``); each page pushes
the repos it later pulls. The walks train tiny models (digits, a few
hundred images, one or two epochs) and are marked slow. The fast tests check the README's length, its
links into docs/, and that its methods tables list exactly the registered operators and training methods.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
VENV_BIN = ROOT / ".venv" / "bin"
if not VENV_BIN.is_dir():  # the suite run from another environment: its own bin folder holds papa-merge
    VENV_BIN = Path(sys.executable).parent

_FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.M | re.S)
_RUN = {"bash", "python"}
# A bash walk this long means something hangs; the whole doc test takes a few minutes.
_BLOCK_TIMEOUT = 600


@dataclass(frozen=True)
class Block:
    page: str
    line: int
    lang: str
    tags: frozenset[str]
    code: str

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


def blocks(page: Path) -> list[Block]:
    """The fenced code blocks of a page, in order."""
    text = page.read_text()
    out = []
    for m in _FENCE.finditer(text):
        info = m.group(1).split()
        lang = info[0] if info else ""
        line = text.count("\n", 0, m.start()) + 1
        out.append(Block(page.relative_to(ROOT).as_posix(), line, lang, frozenset(info[1:]), m.group(2)))
    return out


def commands(code: str) -> list[list[str]]:
    """The shell commands of a bash block: continuation lines joined, comments dropped, split on ; && |."""
    joined = re.sub(r"\\\n\s*", " ", code)
    out = []
    for line in joined.splitlines():
        words = shlex.split(line, comments=True)
        cmd: list[str] = []
        for w in [*words, ";"]:
            if w in {";", "&&", "||", "|"}:
                if cmd:
                    out.append(cmd)
                cmd = []
            else:
                cmd.append(w)
    return out


# ------------------------------------------------------------------------------------------------------
# Fast checks: the README's size, its links, and its methods tables against the registries.


def test_readme_is_at_most_250_lines() -> None:
    n = len(README.read_text().splitlines())
    assert n <= 250, f"README.md has {n} lines; keep it to 250 and move detail to docs/"


def test_links_to_docs_resolve() -> None:
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if re.match(r"[a-z]+://", target):
                continue
            assert (page.parent / target).exists(), f"{page.relative_to(ROOT)} links to {target}, which does not exist"
    linked = set(re.findall(r"\]\((docs/[^)#]+\.md)", README.read_text()))
    assert linked == {p.relative_to(ROOT).as_posix() for p in PAGES[1:]}, "README.md links every docs/ page"


def _table_names(text: str, header: str) -> set[str]:
    """The backticked names in the first column of the markdown table whose first header cell is ``header``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(rf"\|\s*{re.escape(header)}\s*\|", line))
    names: set[str] = set()
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        names.update(re.findall(r"`([^`]+)`", line.split("|")[1]))
    return names


def test_methods_tables_match_the_registries() -> None:
    import merge.ops
    import merge.train

    text = README.read_text()
    operators = _table_names(text, "operator")
    registered = set(merge.ops.list_operators())
    assert registered <= operators, f"operators missing from README's table: {sorted(registered - operators)}"
    assert operators <= registered | set(merge.ops.ALIASES), (
        f"README's table names unregistered operators: {sorted(operators - registered - set(merge.ops.ALIASES))}")
    methods = _table_names(text, "training method")
    assert methods == set(merge.train.list_methods()), (
        f"README's training table {sorted(methods)} != registered {sorted(merge.train.list_methods())}")


def test_pages_hold_no_development_history_or_machine_details() -> None:
    for page in PAGES:
        text = page.read_text()
        for pattern in (r"flock", r"papa-cpu\.lock", r"\bissue \d+", r"/work/"):
            assert not re.search(pattern, text), f"{page.relative_to(ROOT)} mentions {pattern!r}: keep it to CHANGELOG.md or out"


def test_every_recipe_in_examples_is_run_by_the_docs() -> None:
    text = "\n".join(b.code for page in PAGES for b in blocks(page) if b.lang in _RUN and "norun" not in b.tags)
    for recipe in sorted((ROOT / "examples" / "recipes").glob("*.yml")):
        assert f"examples/recipes/{recipe.name}" in text, f"no page runs examples/recipes/{recipe.name}"


def test_code_blocks_are_tagged_as_the_walk_expects() -> None:
    for page in PAGES:
        for b in blocks(page):
            assert b.lang, f"{b.where}: a code block needs a language (bash, python, text, yaml)"
            assert b.tags <= {"norun"}, f"{b.where}: unknown tags {sorted(b.tags)}"
            if b.lang == "python" and "norun" not in b.tags:
                assert "..." not in b.code.replace('"..."', ""), f"{b.where}: '...' is not runnable Python"


# ------------------------------------------------------------------------------------------------------
# The walks.


def _env(tmp_path: Path, hub) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0", HF_HUB_DISABLE_XET="1",
               HF_HUB_CACHE=str(tmp_path / "hf-cache"), PYTHONPATH=str(ROOT))
    env.pop("PAPA_MERGE_DEBUG", None)
    return env


def _check_norun_bash(block: Block, env: dict[str, str]) -> None:
    makefile = (ROOT / "Makefile").read_text()
    for cmd in commands(block.code):
        exe, args = cmd[0], cmd[1:]
        if exe == "make":
            for target in args:
                assert re.search(rf"^{re.escape(target)}:", makefile, re.M), f"{block.where}: no Makefile target {target}"
            continue
        if exe == "source":
            assert (ROOT / args[0]).exists(), f"{block.where}: {args[0]} does not exist"
            continue
        if exe == "torchrun":  # torchrun [options] --no-python papa-merge SUB ...
            assert (VENV_BIN / "torchrun").exists(), f"{block.where}: torchrun is not installed"
            exe, args = args[args.index("--no-python") + 1], args[args.index("--no-python") + 2:]
        if exe in {"pip", "python", "python3"} or exe.endswith(("/pip", "/python", "/python3")):
            tool = VENV_BIN / Path(exe).name
            assert tool.exists(), f"{block.where}: {tool} does not exist"
            if exe.endswith("pip") or Path(exe).name == "pip":
                continue
            script = ROOT / args[0]
            assert script.is_file(), f"{block.where}: {args[0]} does not exist"
            argv = [str(tool), str(script), "--help"]
        else:
            path = VENV_BIN / Path(exe).name
            assert path.exists(), f"{block.where}: {exe} is not installed in {VENV_BIN}"
            sub = [a for a in args[:1] if not a.startswith("-")]
            argv = [str(path), *sub, "--help"]
        res = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, f"{block.where}: {' '.join(argv)} failed:\n{res.stdout}\n{res.stderr}"


def _run_bash(block: Block, folder: Path, env: dict[str, str]) -> None:
    res = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", block.code], cwd=folder, env=env,
                         capture_output=True, text=True, timeout=_BLOCK_TIMEOUT)
    assert res.returncode == 0, (f"{block.where}: the bash block failed (exit {res.returncode}):\n{block.code}\n"
                                 f"--- stdout ---\n{res.stdout[-4000:]}\n--- stderr ---\n{res.stderr[-4000:]}")


def _run_python(block: Block) -> None:
    from merge.ops import OPERATORS
    from merge.train import TRAINING_METHODS

    code = compile(block.code, block.where, "exec")
    if "norun" in block.tags:
        return
    namespace = {"__name__": "__docs__"}
    # A page may register a method or operator of its own (docs/training.md does): the registries are
    # restored afterwards, so later tests in this process see only the project's own.
    methods, operators = dict(TRAINING_METHODS), dict(OPERATORS)
    try:
        exec(code, namespace)  # the documentation's own examples
    finally:
        TRAINING_METHODS.clear()
        TRAINING_METHODS.update(methods)
        OPERATORS.clear()
        OPERATORS.update(operators)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("page", PAGES, ids=[p.relative_to(ROOT).as_posix() for p in PAGES])
def test_page_walk(page: Path, tmp_path: Path, hub, monkeypatch) -> None:
    folder = tmp_path / "walk"
    folder.mkdir()
    (folder / "examples").symlink_to(ROOT / "examples")
    env = _env(tmp_path, hub)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.chdir(folder)
    for block in blocks(page):
        if block.lang not in _RUN:
            continue
        t0 = time.perf_counter()
        if block.lang == "python":
            _run_python(block)
        elif "norun" in block.tags:
            _check_norun_bash(block, env)
        else:
            _run_bash(block, folder, env)
        print(f"{block.where} ({block.lang}{' norun' if 'norun' in block.tags else ''}): "
              f"{time.perf_counter() - t0:.1f}s")  # shown with -s, or when a later block fails
