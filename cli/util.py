"""Small helpers shared by the commands: parsing, formatting, and how much to show.

How much a command shows is set once, on the group: ``papa-merge -q CMD`` (quiet: no progress bars and
no status lines; results, warnings and errors still print) or ``papa-merge -v CMD`` (verbose: more
detail). Every command asks :func:`show_progress` whether to draw bars and prints status lines with
:func:`say`, so the two flags mean the same everywhere.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import click

QUIET, NORMAL, VERBOSE = -1, 0, 1
# Where the group keeps the level for its commands (click's per-invocation ``meta`` dict).
VERBOSITY_KEY = "papa_merge.verbosity"


def verbosity() -> int:
    """QUIET (-1, ``-q``), NORMAL (0) or VERBOSE (1 and up, ``-v``, ``-vv``) for the running command."""
    ctx = click.get_current_context(silent=True)
    return int(ctx.meta.get(VERBOSITY_KEY, NORMAL)) if ctx is not None else NORMAL


def show_progress(flag: bool | None = None) -> bool:
    """Whether to draw progress bars (on stderr).

    An explicit ``--progress/--no-progress`` of the command (``flag``) wins; otherwise ``-q`` turns them
    off, and by default they are on when stderr is a terminal (so logs and pipes get no bar noise).
    """
    if flag is not None:
        return bool(flag)
    return verbosity() > QUIET and sys.stderr.isatty()


def say(message: str, *, level: int = NORMAL) -> None:
    """Print a status line on stderr when the verbosity is at least ``level`` (``-q`` hides NORMAL lines;
    VERBOSE lines need ``-v``). Results go to stdout with ``click.echo``, never through this."""
    if verbosity() >= level:
        click.echo(message, err=True)


def parse_floats(text: str, option: str) -> list[float]:
    """``"0.5,0.3,0.2"`` -> ``[0.5, 0.3, 0.2]``; a usage error naming ``option`` otherwise."""
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers like 0.5,0.3,0.2, got {text!r}",
                                 param_hint=option) from None


def format_bytes(n: float) -> str:
    """Human-readable size in powers of 1000 (as disk sizes are sold), e.g. ``1.23 GB``."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


def echo_result(text: str) -> None:
    """Print a result line on stdout now: above any progress bar (bars live on stderr) and flushed.

    Python buffers stdout in blocks when it is not a terminal (``nohup``, Slurm, ``| tee``), so a result
    printed with a plain write could show only when the buffer fills or the run ends; every result line
    of ``train``, ``quickstart`` and ``eval`` goes through here and reaches the log as it is printed.
    """
    from tqdm.auto import tqdm

    tqdm.write(text, file=sys.stdout)
    sys.stdout.flush()


def percent(fraction: float) -> str:
    """An accuracy as the tables print it: ``0.9578`` -> ``95.78%``."""
    return f"{100 * fraction:.2f}%"


def check_local_members(paths: tuple[str, ...] | list[str]) -> None:
    """Missing local checkpoints, told before torch is imported (seconds on a slow disk); hf:// ones are left to
    the library, which fetches them.

    A wildcard pattern that matched nothing reaches a command as it is (``pool/*.safetensors``): it is told as
    such, not counted as one checkpoint or called a missing file.

    Raises:
        CheckpointNotFoundError: the first path that is not there.
    """
    import re
    from pathlib import Path

    from merge.errors import CheckpointNotFoundError
    from merge.io.schemes import HF_PREFIX

    for p in map(str, paths):
        if p.startswith(HF_PREFIX) or Path(p).exists() or Path(p).is_symlink():
            continue
        if re.search(r"[*?[]", p):
            raise CheckpointNotFoundError(f"{p}: the pattern matched no file (the shell passes a pattern that "
                                          "matches nothing on as it is); check the folder and the pattern", path=p)
        raise CheckpointNotFoundError(f"{p}: no such file or folder", path=p)


def describe_merge(recipe: dict, *, names: Sequence[str] | None = None, base: str | None = None) -> str:
    """``ties of 2 members on base base/ (density 0.5): ft1/ x0.5, ft2/ x0.5``: a recorded recipe in one phrase.

    The method, the base, the parameters given, then each member with its weight's share. ``names`` and ``base``
    are the members and base as the user named them (``soup``'s last line); by default, as the recipe records
    them (``inspect``).

    Example:
        >>> recipe = {"method": "slerp", "parameters": {"t": 0.3}, "members": [{"path": "b/"}], "weights": [1],
        ...           "base": {"path": "runs/a/"}}
        >>> describe_merge(recipe)
        'slerp of 1 member on base a (t 0.3): b x1'
        >>> describe_merge(recipe, names=["b/"], base="runs/a/")
        'slerp of 1 member on base runs/a/ (t 0.3): b/ x1'
    """
    from merge.card import recipe_members

    members = recipe_members(recipe)
    shown = list(names) if names is not None else [name for name, _ in members]
    if base is None and isinstance(recipe.get("base"), dict):
        base = recipe_members({"members": [recipe["base"]]})[0][0]
    params = recipe.get("parameters") or {}
    n = len(shown)
    what = f"{recipe.get('method', 'uniform')} of {n} member{'s' if n != 1 else ''}"
    if base is not None:
        what += f" on base {base}"
    if params:
        what += " (" + ", ".join(f"{k} {_short(v)}" for k, v in sorted(params.items())) + ")"
    return what + ": " + ", ".join(f"{m} x{w:.4g}" for m, (_, w) in zip(shown, members))


def _short(value: object) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_short(v) for v in value) + "]"
    return f"{value:.4g}" if isinstance(value, float) else str(value)
