"""``papa-merge eval``: accuracy, NLL and ECE of members, their prediction ensemble, and soups."""

from __future__ import annotations

import click


@click.command("eval", context_settings={"show_default": True})
@click.argument("checkpoints", nargs=-1, required=True)
@click.option("--data", default=None, metavar="NAME",
              help="Dataset (mnist, digits, tweets, bbc, imagefolder:PATH, csv:PATH). [default: from the checkpoints' metadata]")
@click.option("--split", default="both", type=click.Choice(["val", "test", "both"]), help="Splits to evaluate.")
@click.option("--ensemble/--no-ensemble", default=True,
              help="Add the prediction ensemble (mean of softmax probabilities) of the members.")
@click.option("--recompute-bn", default=0, type=click.IntRange(min=0), metavar="N",
              help="Recompute BatchNorm statistics of each checkpoint on N training batches before evaluating.")
@click.option("--batch-size", default=256, type=click.IntRange(min=1), help="Evaluation batch size.")
@click.option("--device", default="cpu", help="cpu, cuda or cuda:N.")
def eval_(checkpoints: tuple[str, ...], data: str | None, split: str, ensemble: bool, recompute_bn: int,
          batch_size: int, device: str) -> None:
    """Evaluate CHECKPOINTS... (members and soups) on held-out data and print a table.

    The model is rebuilt from each checkpoint's papa_merge.model metadata and the data from its
    papa_merge.data (the same split seed as training, so val and test are never training rows).
    Checkpoints with a recorded recipe are soups; the others are members, whose prediction
    ensemble gets its own row.

    \b
    Examples:
      papa-merge eval runs/quickstart/members/*.safetensors runs/quickstart/greedy.safetensors
      papa-merge eval soup.safetensors --data mnist --split test
    """
    from merge.evaluate import evaluate_checkpoints, format_table, summarize_members

    rows = evaluate_checkpoints(list(checkpoints), data=data, split=split, ensemble=ensemble,
                                batch_size=batch_size, device=device, recompute_bn=recompute_bn)
    members = [r for r in rows if r.kind == "member"]
    summary = summarize_members(rows) if len(members) >= 2 else []
    click.echo(format_table([*summary, *rows]))
