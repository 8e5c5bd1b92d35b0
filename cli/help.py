"""``--help`` in sections: a command's options under headings, and the top-level commands by what they do.

Click prints one flat, alphabetical list; ``soup`` has some forty options (merge method, members and output,
greedy-soup evaluation, compute), which a flat list hides from each other.
"""

from __future__ import annotations

from collections.abc import Sequence

import click

__all__ = ["SectionedCommand", "format_command_sections", "COMMAND_SECTIONS"]

# The top level, in the order a user meets the commands.
COMMAND_SECTIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Merge", ("soup", "align", "run", "check", "select", "inspect")),
    ("Train", ("quickstart", "train", "collapse", "midpoint")),
    ("Evaluate", ("eval", "interpolate", "multitask")),
    ("Hugging Face Hub", ("pull", "push")),
)


class SectionedCommand(click.Command):
    """A command whose options are listed under headings.

    Args:
        sections: ``(heading, parameter names)`` in order; options in no section go under "Other options".
    """

    def __init__(self, *args: object, sections: Sequence[tuple[str, Sequence[str]]] = (), **kwargs: object):
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.sections = tuple((title, tuple(names)) for title, names in sections)

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        records = {p.name: p.get_help_record(ctx) for p in self.get_params(ctx) if isinstance(p, click.Option)}
        placed: set[str | None] = set()
        for title, names in self.sections:
            rows = [records[n] for n in names if records.get(n)]
            placed.update(names)
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)  # type: ignore[arg-type]
        rest = [r for n, r in records.items() if n not in placed and r]
        if rest:
            with formatter.section("Other options"):
                formatter.write_dl(rest)  # type: ignore[arg-type]


def format_command_sections(group: click.Group, ctx: click.Context, formatter: click.HelpFormatter) -> None:
    """The group's commands under the headings of :data:`COMMAND_SECTIONS` (any other command: "Other")."""
    limit = formatter.width - 6 - max((len(n) for n in group.list_commands(ctx)), default=0)
    placed: set[str] = set()
    for title, names in (*COMMAND_SECTIONS, ("Other", tuple(sorted(group.commands)))):
        rows = []
        for name in names:
            command = group.get_command(ctx, name)
            if name in placed or command is None or command.hidden:
                continue
            placed.add(name)
            rows.append((name, command.get_short_help_str(limit)))
        if rows:
            with formatter.section(f"{title} commands"):
                formatter.write_dl(rows)
