"""``papa-merge check MEMBERS... [--method M --base B]``: can these be merged, and at what cost, before any download."""

from __future__ import annotations

import click

from cli.eval_cmd import one_line_warnings
from cli.soup_cmd import collect_params, method_options
from cli.util import check_local_members, format_bytes, parse_floats
from merge.estimate import format_seconds


@click.command(context_settings={"show_default": True})
@click.argument("members", nargs=-1, required=True)
@click.option("--method", default="uniform", help="Merge operator (see `papa-merge soup --list-methods`).")
@method_options
@click.option("--weights", default=None, metavar="W1,W2,...", help="One weight per member (implies --method weighted).")
@click.option("--dtype", default=None, metavar="DTYPE", help="Output dtype of floating tensors. [default: as input]")
@click.option("--on-mismatch", default="error", type=click.Choice(["error", "skip", "first"]),
              help="Tensors whose name, shape or dtype differ: fail, drop them, or take member 0's.")
@click.option("--key", default=None, help="Wrapper key of pickled training checkpoints (e.g. ema, state_dict).")
def check(members: tuple[str, ...], method: str, weights: str | None, dtype: str | None, on_mismatch: str,
          key: str | None, base: str | None, seed: int, strict: bool, **method_params: object) -> None:
    """Check members merge, before downloading.

    Reads only what the answer needs: for hf://org/name members the file listing, config.json, the
    shard index and each safetensors header (by HTTP range requests); for local members their
    headers. Reports whether MEMBERS (and --base) can be merged with --method (tensor names, shapes,
    dtypes, vocabulary sizes, architectures), and the download size, disk, peak memory and an
    estimate of the time. Exits 1 with one line naming the first tensor that differs.

    \b
    Examples:
      papa-merge check hf://org/ft-a hf://org/ft-b --method ties --base hf://org/base --density 0.5
      papa-merge check run/checkpoint-*/
    """
    from merge.check import check_members

    check_local_members([*members, *([base] if base else [])])
    w = parse_floats(weights, "--weights") if weights is not None else None
    with one_line_warnings():
        report = check_members(list(members), method=method, base=base, weights=w,
                               params=collect_params(method_params), dtype=dtype, on_mismatch=on_mismatch, key=key)
    for line in describe_check(report):
        click.echo(line)


def describe_check(report) -> list[str]:
    """The report as ``papa-merge check`` prints it."""
    lines = []
    everyone = report.members + ([report.base] if report.base is not None else [])
    for c in everyone:
        role = "base  " if c is report.base else "member"
        facts = [f"{c.tensors} tensors", format_bytes(c.tensor_bytes)]
        if c.architecture:
            facts.append(c.architecture)
        if c.vocab_size is not None:
            facts.append(f"vocabulary {c.vocab_size}")
        if c.remote:
            facts.append(f"{format_bytes(c.download_bytes)} to download" if c.download_bytes else "cached")
        lines.append(f"{role} {c.ref}: {', '.join(facts)}")
    skipped = f", {len(report.skipped)} skipped" if report.skipped else ""
    lines += [
        f"compatible:     yes, with {report.method} ({report.tensors} tensors, {report.merged} merged{skipped})",
        f"download:       {format_bytes(report.download_bytes)}",
        f"disk:           {format_bytes(report.disk_bytes)} (downloads + {format_bytes(report.out_bytes)} of output)",
        f"reads:          {format_bytes(report.read_bytes)} (every pass counted)",
        f"peak memory:    {format_bytes(report.peak_memory_bytes)} of working buffers",
        f"time:           {format_seconds(report.seconds_estimate)} ({report.estimate_basis})",
        f"checked with:   {format_bytes(report.fetched_bytes)} fetched (configs, shard indexes, headers)",
    ]
    return lines
