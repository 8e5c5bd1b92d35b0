"""Entry point of ``papa-merge``: the command group, and the mapping of errors to one-line messages.

Known errors (:class:`merge.MergeError` and its subclasses) print ``error: <message>`` on stderr and
exit with status 1 (2 for bad arguments). Set ``PAPA_MERGE_DEBUG=1`` to see the traceback instead.
"""

from __future__ import annotations

import os
import sys

import click

from cli import eval_cmd, hub_cmd, inspect_cmd, quickstart_cmd, soup_cmd, train_cmd


class _Group(click.Group):
    def invoke(self, ctx: click.Context):  # noqa: ANN201 - click's signature
        try:
            return super().invoke(ctx)
        except Exception as e:  # noqa: BLE001 - every error ends as one line unless debugging
            if os.environ.get("PAPA_MERGE_DEBUG") or isinstance(e, (click.exceptions.ClickException,
                                                                     click.exceptions.Exit,
                                                                     click.exceptions.Abort)):
                raise
            from merge.errors import MergeError

            if isinstance(e, MergeError):
                click.echo(f"error: {e}", err=True)
                ctx.exit(e.exit_code)
            if isinstance(e, KeyboardInterrupt):
                raise
            if isinstance(e, OSError):
                click.echo(f"error: {e.strerror or e} ({e.filename or ''}); set PAPA_MERGE_DEBUG=1 for details",
                           err=True)
                ctx.exit(1)
            click.echo(f"error: unexpected {type(e).__name__}: {e}\n"
                       "this is a bug in papa-merge; rerun with PAPA_MERGE_DEBUG=1 and report the traceback",
                       err=True)
            ctx.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="papa-merge", prog_name="papa-merge")
def cli() -> None:
    """Merge neural-network checkpoints (model soups, PAPA, StarSSE, late-phase weights, subspaces).

    Averages checkpoints tensor by tensor, streaming from disk in constant memory, and trains the
    diverse members that merge well. Set PAPA_MERGE_DEBUG=1 to see tracebacks.
    """


# Command modules register themselves here, one line each.
cli.add_command(soup_cmd.soup)
cli.add_command(inspect_cmd.inspect)
cli.add_command(eval_cmd.eval_)
cli.add_command(quickstart_cmd.quickstart)
cli.add_command(train_cmd.train)
cli.add_command(hub_cmd.pull)
cli.add_command(hub_cmd.push)


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="papa-merge")


if __name__ == "__main__":
    sys.exit(main())
