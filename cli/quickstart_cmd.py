"""``papa-merge quickstart``: train members on MNIST, merge them, and print the comparison table."""

from __future__ import annotations

import click

from cli.util import echo_result, say, show_progress


@click.command(context_settings={"show_default": True})
@click.option("--members", default=4, type=click.IntRange(min=2), help="Number of members.")
@click.option("--epochs", default=1.0, type=click.FloatRange(min=0, min_open=True),
              help="Epochs of the shared start and of each member.")
@click.option("--limit", default=20000, type=click.IntRange(min=1),
              help="Training examples (a seeded subsample; val and test stay whole).")
@click.option("--out", default="runs/quickstart", type=click.Path(file_okay=False),
              help="Run folder; members already there are reused.")
@click.option("--seed", default=0, type=int, help="Seeds the initialisation, the data orders and the splits.")
@click.option("--data", default="mnist", help="Dataset (mnist; digits for a seconds-long run).")
@click.option("--diversity", default="order", type=click.Choice(["order", "augment", "hparams", "seed"]),
              help="How members differ (all continue from the shared start).")
@click.option("--recompute-bn", default=20, type=click.IntRange(min=0), metavar="N",
              help="Training batches for BatchNorm recalibration of the soups (0: off).")
@click.option("--device", default="cpu", help="cpu, cuda or cuda:N.")
@click.option("--members-table/--no-members-table", default=False, help="Also print one row per member.")
@click.option("--papa/--no-papa", default=True,
              help="Also train MEMBERS from scratch twice, independently and as a PAPA population (pulled toward "
                   "their average every step), and compare their averages.")
def quickstart(members: int, epochs: float, limit: int, out: str, seed: int, data: str, diversity: str,
               recompute_bn: int, device: str, members_table: bool, papa: bool) -> None:
    """Train, merge and compare, end to end.

    Trains diverse small CNNs on MNIST (a seeded subsample of 20,000 of its training images by default,
    --limit; val and test whole), makes the uniform and greedy soups, and compares them.

    Prints members (mean, min, max), their prediction ensemble, the uniform soup and the greedy
    soup (both with BatchNorm statistics recomputed), on val and test; then (--papa) the same for
    members trained from scratch independently and as a PAPA population. A few minutes on 2 CPU cores.

    \b
    Examples:
      papa-merge quickstart
      papa-merge quickstart --members 6 --epochs 2 --out runs/qs6
    """
    from merge.evaluate import format_table
    from merge.quickstart import PAPA_TITLE, run_quickstart

    def on_rows(part: str, rows: list) -> None:  # each table as soon as it is known, flushed
        if part == "papa":
            echo_result(f"\n{PAPA_TITLE}\n{format_table(rows)}")
        else:
            echo_result(format_table(rows if members_table else [r for r in rows if r.kind != "member"]))

    result = run_quickstart(members=members, epochs=epochs, limit=limit, out=out, seed=seed, data=data,
                            diversity=diversity, recompute_bn=recompute_bn, device=device, papa=papa,
                            progress=show_progress(), log=lambda line: say(f"- {line}"), on_rows=on_rows)
    echo_result(f"({result.seconds:.0f}s; members in {result.members[0].parent}, soups {result.uniform} and "
               f"{result.greedy}" + (f"; PAPA comparison {result.papa_seconds:.0f}s)" if result.papa_rows else ")"))
