"""``papa-merge inspect``: what a checkpoint holds, without reading its tensors."""

from __future__ import annotations

import json

import click

from cli.util import describe_merge, format_bytes, verbosity


@click.command()
@click.argument("checkpoint")
@click.option("--key", default=None, help="Wrapper key of pickled training checkpoints (e.g. ema).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--top", default=5, show_default=True, help="How many of the largest tensors to list.")
@click.option("-v", "--verbose", is_flag=True,
              help="Every metadata record in full (the recipe with each member's record, training records).")
def inspect(checkpoint: str, key: str | None, as_json: bool, top: int, verbose: bool) -> None:
    """Show what a checkpoint holds.

    Summarises CHECKPOINT: tensor count, parameters, dtypes, size, and metadata (the recorded recipe,
    one line per record; --verbose or --json for every record in full).

    \b
    Example:
      papa-merge inspect soup.safetensors
    """
    from merge import inspect_checkpoint

    s = inspect_checkpoint(checkpoint, key=key, top=top)
    if as_json:
        click.echo(json.dumps({"path": str(s.path), "format": s.format, "tensors": s.tensors,
                               "parameters": s.parameters, "bytes": s.nbytes, "dtypes": s.dtypes,
                               "metadata": s.metadata, "files": [str(f) for f in s.files]}, indent=2))
        return
    click.echo(f"{s.path} ({s.format})")
    click.echo(f"  tensors:    {s.tensors}")
    click.echo(f"  parameters: {s.parameters:,}")
    click.echo(f"  size:       {format_bytes(s.nbytes)}")
    click.echo("  dtypes:     " + ", ".join(f"{d} ({n:,} elements)" for d, n in sorted(s.dtypes.items())))
    if s.largest:
        click.echo("  largest:")
        for name, shape, dtype in s.largest:
            click.echo(f"    {name} {list(shape)} {dtype}")
    from merge.keys import RECIPE_KEY

    recipe = s.metadata.get(RECIPE_KEY)
    if isinstance(recipe, dict):
        click.echo(f"  recipe:     {describe_merge(recipe)}")
    if s.metadata:
        click.echo("  metadata:")
        whole = verbose or verbosity() > 0
        for k, v in s.metadata.items():
            for line in _metadata_lines(k, v, whole=whole):
                click.echo(line)


def _metadata_lines(key: str, value: object, *, whole: bool = True) -> list[str]:
    """One metadata entry: one line when short; a long record in full as pretty-printed JSON under its key
    (``whole``), or else one line naming its fields (never a cut value, which would read as the value)."""
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    if isinstance(value, str) or len(text) <= 100:
        return [f"    {key}: {text}"]
    if not whole:
        fields = sorted(value) if isinstance(value, dict) else []
        what = (f"{len(fields)} fields: {', '.join(fields)}" if fields
                else f"a {type(value).__name__} of {len(value) if isinstance(value, list) else '?'} entries")
        return [f"    {key}: {{{what}}} (in full with --verbose or --json)"]
    return [f"    {key}:"] + ["      " + line for line in json.dumps(value, indent=2, sort_keys=True).splitlines()]
