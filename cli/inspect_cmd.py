"""``papa-merge inspect``: what a checkpoint holds, without reading its tensors."""

from __future__ import annotations

import json

import click

from cli.util import format_bytes


@click.command()
@click.argument("checkpoint")
@click.option("--key", default=None, help="Wrapper key of pickled training checkpoints (e.g. ema).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--top", default=5, show_default=True, help="How many of the largest tensors to list.")
def inspect(checkpoint: str, key: str | None, as_json: bool, top: int) -> None:
    """Summarise CHECKPOINT: tensor count, parameters, dtypes, size, and metadata (the recorded recipe).

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
    if s.metadata:
        click.echo("  metadata:")
        for k, v in s.metadata.items():
            text = json.dumps(v, sort_keys=True) if not isinstance(v, str) else v
            click.echo(f"    {k}: {text if len(text) <= 200 else text[:197] + '...'}")
