"""``papa-merge soup``: average checkpoints into one, streaming from disk."""

from __future__ import annotations

import sys

import click

from cli.util import format_bytes, parse_floats


@click.command(context_settings={"show_default": True})
@click.argument("members", nargs=-1, required=True)
@click.option("-o", "--out", required=True, type=click.Path(),
              help="Output: a .safetensors file, or a folder (any other path) written as a Hugging Face model folder.")
@click.option("--method", default="uniform", help="Merge operator (see `papa-merge soup --list-methods`).")
@click.option("--weights", default=None, metavar="W1,W2,...",
              help="One weight per member, normalised to sum to one (implies --method weighted).")
@click.option("--dtype", default=None, metavar="DTYPE",
              help="Output dtype of floating tensors: float32, bfloat16, float16, float64. [default: as input]")
@click.option("--accumulate", default="float32", type=click.Choice(["float32", "float64"]),
              help="Accumulator dtype.")
@click.option("--device", default="cpu", help="Where to reduce: cpu, cuda or cuda:N (streamed chunk by chunk).")
@click.option("--shard-size", default="5GB", help="Largest shard of a folder output.")
@click.option("--on-mismatch", default="error", type=click.Choice(["error", "skip", "first"]),
              help="Tensors whose name, shape or dtype differ: fail, drop them, or take member 0's.")
@click.option("--key", default=None, help="Wrapper key of pickled training checkpoints (e.g. ema, state_dict).")
@click.option("--force", is_flag=True, help="Replace an existing output (only once the new one is complete).")
@click.option("--dry-run", is_flag=True, help="Validate and print the plan (sizes, memory) without writing.")
@click.option("--progress/--no-progress", default=None, help="Progress bar. [default: on a terminal]")
@click.option("--greedy", is_flag=True,
              help="Greedy soup (model soups): sort members by val accuracy, start from the best, keep each other "
                   "member only if the average with it scores strictly better on val. Needs papa_merge metadata.")
@click.option("--data", default=None, metavar="NAME",
              help="Dataset for --greedy/--recompute-bn (mnist, digits, ...). [default: from the members' metadata]")
@click.option("--recompute-bn", default=0, type=click.IntRange(min=0), metavar="N",
              help="Recompute BatchNorm statistics of the soup on N training batches (and of every candidate "
                   "with --greedy). 0: off.")
@click.option("--batch-size", default=256, type=click.IntRange(min=1),
              help="Batch size of --greedy evaluation and --recompute-bn.")
@click.option("--list-methods", is_flag=True, is_eager=True, expose_value=False, callback=lambda c, p, v: _list(c, v),
              help="List the merge operators and exit.")
def soup(members: tuple[str, ...], out: str, method: str, weights: str | None, dtype: str | None, accumulate: str,
         device: str, shard_size: str, on_mismatch: str, key: str | None, force: bool, dry_run: bool,
         progress: bool | None, greedy: bool, data: str | None, recompute_bn: int, batch_size: int) -> None:
    """Average checkpoints MEMBERS... into one, tensor by tensor, in constant memory.

    MEMBERS are .safetensors files, Hugging Face model folders (sharded or not), shard indexes,
    .bin/.pt/.pth pickles (read with weights-only loading), or hf://org/name[@revision]. A path
    listed twice counts twice.

    \b
    Examples:
      papa-merge soup ckpts/*.safetensors -o soup.safetensors
      papa-merge soup a.safetensors b.safetensors --weights 0.7,0.3 --dtype bfloat16 -o soup/
      papa-merge soup --greedy ckpts/*.safetensors --recompute-bn 20 -o greedy.safetensors
    """
    import merge

    if greedy:
        _greedy(members, out=out, method=method, weights=weights, dry_run=dry_run, data=data,
                recompute_bn=recompute_bn, batch_size=batch_size, device=device, force=force)
        return

    if recompute_bn and not out.endswith(".safetensors"):
        raise click.UsageError("--recompute-bn rewrites a single file: write the soup with -o NAME.safetensors")
    w = parse_floats(weights, "--weights") if weights is not None else None
    if weights is not None and method == "uniform":
        method = "weighted"
    if dry_run:
        plan = merge.plan_soup(list(members), method=method, weights=w, dtype=dtype, accumulate=accumulate,
                               device=device, on_mismatch=on_mismatch)
        reduced = sum(t.action == "reduce" for t in plan.tensors)
        click.echo(f"members:        {len(plan.sources)}")
        click.echo(f"method:         {method} (sum of {', '.join(f'{c:.4g}' for c in plan.coefficients)} x member, / {plan.divisor:.4g})")
        click.echo(f"tensors:        {len(plan.tensors)} ({reduced} averaged, {len(plan.tensors) - reduced} copied"
                   f" from member 0, {len(plan.skipped)} skipped)")
        click.echo(f"reads:          {format_bytes(plan.read_bytes)}")
        click.echo(f"writes:         {format_bytes(plan.out_bytes)} to {out}")
        click.echo(f"working memory: {format_bytes(plan.buffer_bytes)} of buffers (independent of member count)")
        return
    show = sys.stderr.isatty() if progress is None else progress
    result = merge.soup(list(members), out=out, method=method, weights=w, dtype=dtype, accumulate=accumulate,
                        device=device, shard_size=shard_size, on_mismatch=on_mismatch, key=key, force=force,
                        progress=show)
    if recompute_bn:
        from merge.evaluate import recompute_bn_checkpoint

        recompute_bn_checkpoint(result.path, num_batches=recompute_bn, data=data, batch_size=batch_size, device=device)
        click.echo(f"recomputed BatchNorm statistics on {recompute_bn} training batches of {batch_size}")
    skipped = f", skipped {len(result.skipped)} mismatched" if result.skipped else ""
    click.echo(f"wrote {result.path} ({result.tensors} tensors, {format_bytes(result.written_bytes)}{skipped}) "
               f"in {result.seconds:.2f}s ({result.gb_per_s:.2f} GB/s read) from {len(members)} members: "
               + _members_and_weights(members, result.recipe))


def _members_and_weights(members: tuple[str, ...], recipe: dict) -> str:
    """``a.safetensors x0.75, b.safetensors x0.25``: each member as the user named it, with its share of the soup."""
    from merge.card import recipe_members

    shares = [w for _, w in recipe_members(recipe)]
    return ", ".join(f"{m} x{w:.4g}" for m, w in zip(members, shares))


def _greedy(members: tuple[str, ...], *, out: str, method: str, weights: str | None, dry_run: bool,
            data: str | None, recompute_bn: int, batch_size: int, device: str, force: bool) -> None:
    """``soup --greedy``: merge.greedy.greedy_soup_checkpoints, one line per visited member."""
    if weights is not None or method != "uniform":
        raise click.UsageError("--greedy chooses its own members and averages them uniformly; "
                               "drop --weights/--method")
    if dry_run:
        raise click.UsageError("--greedy evaluates candidate soups, so it has no --dry-run")
    from merge.greedy import greedy_soup_checkpoints

    names = list(members)

    def report(i: int, score: float, kept: bool) -> None:
        click.echo(f"  try {names[i]}: val {100 * score:.2f}% -> {'kept' if kept else 'rejected'}")

    result, path = greedy_soup_checkpoints(names, out=out, data=data, recompute_bn=recompute_bn,
                                           batch_size=batch_size, device=device, force=force, on_score=report)
    best = result.order[0]
    click.echo(f"greedy soup: kept {len(result.selected)} of {len(members)} members "
               f"({', '.join(names[i] for i in result.selected)}); val acc {100 * result.score:.2f}% "
               f"(best member {100 * result.member_scores[best]:.2f}%)")
    click.echo(f"wrote {path}")


def _list(ctx: click.Context, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    from merge.ops import OPERATORS

    for name in sorted(OPERATORS):
        op = OPERATORS[name]
        click.echo(f"{name:12s} {op.scope:11s} {op.citation}")
    ctx.exit(0)
