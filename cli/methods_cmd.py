"""``papa-merge collapse``, ``midpoint`` and ``interpolate``: the merges of late-phase weights and subspaces."""

from __future__ import annotations

import json

import click


def _alphas(value: str | None) -> list[float] | None:
    if value is None:
        return None
    try:
        return [float(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers in [0, 1], got {value!r}") from None


@click.command(context_settings={"show_default": True})
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False), help="The plain model (.safetensors).")
@click.option("--force", is_flag=True, help="Replace an existing output.")
@click.option("--strict", is_flag=True,
              help="Refuse a copy holding NaN or infinity, or a negative running variance. [default: a warning]")
def collapse(checkpoint: str, out: str, force: bool, strict: bool) -> None:
    """Collapse late-phase weight copies.

    Turns a late-phase checkpoint's K copies into one plain model.

    CHECKPOINT is a late-phase checkpoint (OUT/late-phase/member-NN.safetensors of `papa-merge train
    --method late-phase`). The head is averaged; each BatchNorm layer becomes the average of its K
    copies' eval-mode affine maps, so the plain model computes exactly what the late-phase model does
    in eval mode, and loads strictly into the original architecture.

    \b
    Example:
      papa-merge collapse lpw/late-phase/member-00.safetensors -o model.safetensors
    """
    from merge.collapse import collapse_checkpoint, late_phase_info
    from merge.io.sources import read_safetensors_metadata

    path = collapse_checkpoint(checkpoint, out=out, force=force, strict=strict)
    info = late_phase_info(read_safetensors_metadata(checkpoint), path=checkpoint)
    kinds = [m["kind"] for m in info["modules"].values()]
    click.echo(f"{path}: {info['copies']} copies of {kinds.count('batchnorm')} BatchNorm layer(s) and "
               f"{kinds.count('linear')} head collapsed")


@click.command(context_settings={"show_default": True})
@click.argument("checkpoints", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False), help="The point (.safetensors).")
@click.option("--alpha", type=float, default=None,
              help="The point (1 - alpha) * A + alpha * B of the line between two checkpoints. [default: the centre]")
@click.option("--data", default=None, help="Dataset, for checkpoints that record none.")
@click.option("--bn-batches", type=click.IntRange(min=1), default=None,
              help="Training batches to recompute BatchNorm on. [default: a full pass]")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, help="Batch size of the recomputation.")
@click.option("--device", default="cpu", help="cpu, cuda or cuda:N.")
@click.option("--eval/--no-eval", "evaluate", default=True, help="Print the point's val/test metrics.")
@click.option("--force", is_flag=True, help="Replace an existing output.")
def midpoint(checkpoints: tuple[str, ...], out: str, alpha: float | None, data: str | None, bn_batches: int | None,
             batch_size: int, device: str, evaluate: bool, force: bool) -> None:
    """Write a subspace's midpoint.

    Writes the midpoint of a line (or any alpha), or the centre of a simplex, with BatchNorm
    recomputed there.

    CHECKPOINTS are a subspace's endpoints (`papa-merge train --method subspace`) or any checkpoints of
    one architecture. The weights are averaged, then the BatchNorm statistics are recomputed on
    training batches at that point (statistics averaged with the weights describe no network).

    \b
    Examples:
      papa-merge midpoint line/member-00.safetensors line/member-01.safetensors -o mid.safetensors
      papa-merge midpoint a.safetensors b.safetensors --alpha 0.25 -o point.safetensors
    """
    from merge.evaluate import evaluate_checkpoints, format_table
    from merge.interpolate import midpoint as make_midpoint

    path = make_midpoint(list(checkpoints), out=out, alpha=alpha, data=data, bn_batches=bn_batches,
                         batch_size=batch_size, device=device, force=force)
    click.echo(f"wrote {path}")
    if evaluate:
        click.echo(format_table(evaluate_checkpoints([path], data=data, batch_size=batch_size, device=device)))


@click.command(context_settings={"show_default": True})
@click.argument("a", type=click.Path(exists=True))
@click.argument("b", type=click.Path(exists=True))
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False),
              help="The plot (.png); the table is written beside it (.md).")
@click.option("--data", default=None, help="Dataset, for checkpoints that record none.")
@click.option("--points", type=click.IntRange(min=2), default=11, help="Evenly spaced alphas from 0 to 1.")
@click.option("--alphas", default=None, metavar="A1,A2,...", help="Explicit alphas in [0, 1] (instead of --points).")
@click.option("--bn-batches", type=click.IntRange(min=1), default=None,
              help="Training batches to recompute BatchNorm on at each point. [default: a full pass]")
@click.option("--split", type=click.Choice(["val", "test", "both"]), default="both", help="Splits to evaluate.")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, help="Evaluation batch size.")
@click.option("--device", default="cpu", help="cpu, cuda or cuda:N.")
@click.option("--json", "as_json", is_flag=True, help="Also print the curve as JSON.")
@click.option("--force", is_flag=True, help="Replace an earlier curve (its plot and table) papa-merge wrote.")
@click.option("--align", "align_method", default=None, type=click.Choice(["weight", "activation"]),
              help="Also draw the line to B with its hidden units permuted onto A's (Git Re-Basin): the barrier "
                   "before and after alignment in one plot.")
@click.option("--align-batches", default=8, type=click.IntRange(min=1), metavar="N",
              help="With --align: training batches for activation matching.")
def interpolate(a: str, b: str, out: str, data: str | None, points: int, alphas: str | None, bn_batches: int | None,
                split: str, batch_size: int, device: str, as_json: bool, force: bool, align_method: str | None = None,
                align_batches: int = 8) -> None:
    """Score points on a line between models.

    Accuracy and NLL along the line between checkpoints A and B, BatchNorm recomputed at every point.

    Writes the curve as a PNG (OUT) and a markdown table (OUT with .md), with the endpoints' prediction
    ensemble as the reference line, and prints the table. Existing files are refused (--force replaces
    only an earlier curve papa-merge wrote).

    \b
    Example:
      papa-merge interpolate line/member-00.safetensors line/member-01.safetensors -o line.png --points 11
      papa-merge interpolate scratch/member-00.safetensors scratch/member-01.safetensors --align weight -o b.png
    """
    from merge.interpolate import check_curve_outputs, interpolate as run, write_curve

    splits = ("val", "test") if split == "both" else (split,)
    grid = _alphas(alphas)
    check_curve_outputs(out, force=force)  # before the evaluation: the plot and the table beside it
    curve = run(a, b, data=data, alphas=grid, points=points, bn_batches=bn_batches, splits=splits,
                batch_size=batch_size, device=device, align=align_method, align_batches=align_batches)
    png, table = write_curve(curve, out, force=force)
    click.echo(curve.table())
    click.echo(f"wrote {png} and {table}")
    if as_json:
        click.echo(json.dumps(curve.to_dict(), sort_keys=True))
