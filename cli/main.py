"""Entry point of ``papa-merge``: the command group, and the mapping of errors to one-line messages.

Known errors (:class:`merge.MergeError` and its subclasses) print ``error: <message>`` on stderr and
exit with status 1 (2 for bad arguments). Set ``PAPA_MERGE_DEBUG=1`` to see the traceback instead.
"""

from __future__ import annotations

import os
import sys
import warnings

import click

from cli.help import format_command_sections
from cli.util import QUIET, VERBOSITY_KEY
from cli import eval_cmd, hub_cmd, inspect_cmd, methods_cmd, quickstart_cmd, run_cmd, select_cmd, soup_cmd, train_cmd
from cli import align_cmd
from cli import check_cmd
from cli import multitask_cmd


# Library errors name keyword arguments; on the command line each is a flag. One table for all commands.
OPTION_FLAGS = {
    "on_mismatch": "--on-mismatch",
    "force": "--force",
    "device": "--device",
    "key": "--key",
    "data": "--data",
    "out": "-o/--out",
    "weights": "--weights",
    "dtype": "--dtype",
    "accumulate": "--accumulate",
    "strict": "--strict",
    "base": "--base",
    "members": "--members",
    "method": "--method",
    "density": "--density",
    "lambda": "--lambda",
    "t": "--t",
    "gamma": "--gamma",
    "epsilon": "--epsilon",
    "normalize": "--normalize/--no-normalize",
    "rescale": "--rescale/--no-rescale",
    "seed": "--seed",
    "weight": "--weights",
    "eval_limit": "--eval-limit",
    # Training methods' options: their flags are derived from the registry, with train's one table of names.
    **train_cmd.FLAG_NAMES,
}


def cli_fix(option: str, choices: tuple, *, flags: frozenset[str] | None = None, command: str | None = None) -> str:
    """``pass --on-mismatch skip|first``: the fix a library error names, spelled as a flag.

    ``flags`` are the options of the command that failed (None: unknown, every flag is assumed to exist). A fix
    whose flag that command lacks is not offered as a flag: ``run`` reads its options from the recipe, so it is
    told to fix the recipe; other commands get no hint rather than a flag they would refuse.
    """
    flag = OPTION_FLAGS.get(option, "--" + option.replace("_", "-"))
    values = [str(c) for c in choices if c is not None and c is not True]
    if flags is not None and not any(f in flags for f in _spellings(flag)):
        if command == "run":
            return f"set {option}: {'|'.join(values)} in the recipe" if values else f"set {option} in the recipe"
        if "--param" in flags and _is_operator_param(option):
            return f"pass --param {option}={'|'.join(values) or 'VALUE'}"
        return ""
    return f"pass {flag} {'|'.join(values)}" if values else f"pass {flag}"


def _spellings(flag: str) -> list[str]:
    """``-o/--out`` -> ``["-o", "--out"]``; ``--normalize/--no-normalize`` -> both."""
    return [f for f in flag.split("/") if f]


def _is_operator_param(name: str) -> bool:
    from merge.ops import get_operator, list_operators

    return any(p.name == name for op in list_operators() for p in get_operator(op).params)


def _command_flags() -> tuple[frozenset[str] | None, str | None]:
    """The option strings of the subcommand being run (None when unknown, e.g. an error outside a command)."""
    ctx = click.get_current_context(silent=True)
    name = ctx.invoked_subcommand if ctx is not None else None
    command = cli.commands.get(name) if name else None
    if command is None:
        return None, name
    flags = {opt for p in command.params for opt in (*p.opts, *p.secondary_opts)}
    return frozenset(flags), name


def _merge_error(e: BaseException) -> tuple[str, int]:
    flags, command = _command_flags()

    def spell(option: str, choices: tuple) -> str:
        return cli_fix(option, choices, flags=flags, command=command)

    return e.format(spell), e.exit_code  # type: ignore[attr-defined]


def _memory_error(e: BaseException) -> tuple[str, int]:
    return ("out of memory; merges stream in constant memory, so this came from loading a model or data: "
            "use a smaller --batch-size or fewer members at once"), 1


def _os_error(e: BaseException) -> tuple[str, int]:
    import errno

    err = e if isinstance(e, OSError) else OSError(str(e))
    where = f" ({err.filename})" if err.filename else ""
    if err.errno == errno.ENOSPC:
        return f"no space left on the device{where}; free space or write the output elsewhere", 1
    if err.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied{where}; check the file's permissions or choose another path", 1
    return f"{err.strerror or err}{where}; set PAPA_MERGE_DEBUG=1 for details", 1


def _error_table() -> list[tuple[type, object]]:
    """Each error type the CLI knows, with how it is told; the first matching row wins."""
    from merge.errors import MergeError

    return [(MergeError, _merge_error), (MemoryError, _memory_error), (OSError, _os_error)]


def format_error(e: BaseException) -> tuple[str, int] | None:
    """``(one-line message, exit status)`` for a known error, or None for a bug."""
    for kind, tell in _error_table():
        if isinstance(e, kind):
            return tell(e)  # type: ignore[operator]
    return None


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: object = None, line: str | None = None) -> None:
    """papa-merge's own warnings (any MergeWarning) as one ``warning: ...`` line; others as Python shows them."""
    from merge.errors import MergeWarning

    if issubclass(category, MergeWarning):
        click.echo(f"warning: {message}", err=True)
    else:
        _python_showwarning(message, category, filename, lineno, file, line)


_python_showwarning = warnings.showwarning


class _Group(click.Group):
    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        format_command_sections(self, ctx, formatter)  # by what they do, not alphabetically

    def invoke(self, ctx: click.Context):  # click's signature
        try:
            with warnings.catch_warnings():
                warnings.showwarning = _show_warning
                return super().invoke(ctx)
        except BrokenPipeError:
            # The reader stopped reading (`papa-merge inspect x | head -1`): what it wanted was printed.
            # Later writes (and the interpreter's final flush) go nowhere instead of raising again.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            ctx.exit(0)
        except KeyboardInterrupt:
            # Ctrl-C: outputs being written were removed while the interrupt unwound; exit as shells expect.
            click.echo("\nerror: interrupted; the unfinished output was removed and nothing else was changed",
                       err=True)
            ctx.exit(130)
        except SystemExit as e:
            from merge.io.atomic import Terminated

            if isinstance(e, Terminated):  # SIGTERM/SIGHUP while writing: the partial output is already gone
                import signal

                click.echo(f"error: stopped by {signal.Signals(e.signum).name}; the unfinished output was removed "
                           "and nothing else was changed", err=True)
            raise
        except Exception as e:  # every error ends as one line unless debugging
            if os.environ.get("PAPA_MERGE_DEBUG") or isinstance(e, (click.exceptions.ClickException,
                                                                     click.exceptions.Exit,
                                                                     click.exceptions.Abort)):
                raise
            told = format_error(e)
            if told is not None:
                message, status = told
                click.echo(f"error: {message}", err=True)
                ctx.exit(status)
            click.echo(f"error: unexpected {type(e).__name__}: {e}\n"
                       "this is a bug in papa-merge; rerun with PAPA_MERGE_DEBUG=1 and report the traceback",
                       err=True)
            ctx.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(None, "-V", "--version", package_name="papa-merge", prog_name="papa-merge")
@click.option("-q", "--quiet", is_flag=True,
              help="No progress bars or status lines (results, warnings and errors still print).")
@click.option("-v", "--verbose", count=True, help="More detail (-vv: even more).")
@click.pass_context
def cli(ctx: click.Context, quiet: bool, verbose: int) -> None:
    """Merge neural-network checkpoints (model soups, PAPA, StarSSE, late-phase weights, subspaces).

    Averages checkpoints tensor by tensor, streaming from disk in constant memory, and trains the
    diverse members that merge well. Set PAPA_MERGE_DEBUG=1 to see tracebacks.

    \b
    Shell completion (bash; zsh_source and fish_source for the others):
      eval "$(_PAPA_MERGE_COMPLETE=bash_source papa-merge)"
    """
    if quiet and verbose:
        raise click.UsageError("-q (quiet) and -v (verbose) contradict each other; pass one of them")
    ctx.meta[VERBOSITY_KEY] = QUIET if quiet else verbose
    if quiet:  # huggingface_hub's own bars too (hf:// members of soup, eval, run), on a terminal as well
        ctx.call_on_close(_restore_env("HF_HUB_DISABLE_PROGRESS_BARS", os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS")))
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"


def _restore_env(name: str, old: str | None):
    """A callback putting ``name`` back as it was (the command may run in-process, from Python or a test)."""
    def restore() -> None:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old
    return restore


# Command modules register themselves here, one line each.
cli.add_command(soup_cmd.soup)
cli.add_command(align_cmd.align)
cli.add_command(run_cmd.run)
cli.add_command(check_cmd.check)
cli.add_command(inspect_cmd.inspect)
cli.add_command(eval_cmd.eval_)
cli.add_command(select_cmd.select)
cli.add_command(quickstart_cmd.quickstart)
cli.add_command(train_cmd.train)
cli.add_command(methods_cmd.collapse)
cli.add_command(methods_cmd.midpoint)
cli.add_command(methods_cmd.interpolate)
cli.add_command(hub_cmd.pull)
cli.add_command(hub_cmd.push)
cli.add_command(multitask_cmd.multitask)


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="papa-merge")


if __name__ == "__main__":
    sys.exit(main())
