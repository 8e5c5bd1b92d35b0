"""``papa-merge run RECIPE.yml -o OUT``: run a mergekit recipe file (same code as ``soup``)."""

from __future__ import annotations

import click

from cli.eval_cmd import one_line_warnings
from cli.soup_cmd import describe_verified, under_torchrun, print_plan
from cli.util import format_bytes, show_progress


@click.command(context_settings={"show_default": True})
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("-o", "--out", required=True, type=click.Path(),
              help="Output: NAME.safetensors, NAME.pt/.pth/.bin, or a folder (a path without a suffix).")
@click.option("--device", default="cpu", help="Where to reduce: cpu, cuda or cuda:N (streamed chunk by chunk).")
@click.option("--jobs", default=1, type=click.IntRange(min=1), metavar="N",
              help="Local worker processes splitting the merge by tensors (same bits as one process). Under "
                   "torchrun the ranks split it instead: leave at 1.")
@click.option("--seed", default=0, type=int, help="Seed of the random methods (dare_*, della*).")
@click.option("--shard-size", default="5GB", help="Largest shard of a folder output.")
@click.option("--on-mismatch", default="error", type=click.Choice(["error", "skip", "first"]),
              help="Tensors whose name, shape or dtype differ: fail, drop them, or take the base's (member 0's).")
@click.option("--force", is_flag=True, help="Replace an existing output (only once the new one is complete).")
@click.option("--strict", is_flag=True, help="A NaN or infinity in a model is an error, not a warning.")
@click.option("--dry-run", is_flag=True, help="Validate the recipe against its models and print the plan "
                                              "(reads, writes, peak memory) without writing.")
@click.option("--progress/--no-progress", default=None, help="Progress bar. [default: on a terminal]")
@click.option("--verify", is_flag=True,
              help="After publishing, reopen the output and check every tensor's sha256 against what was written "
                   "(and a model folder's keys against transformers').")
def run(recipe: str, out: str, device: str, seed: int, shard_size: str, on_mismatch: str, force: bool, strict: bool,
        dry_run: bool, progress: bool | None, jobs: int = 1, verify: bool = False) -> None:
    """Run a mergekit recipe (YAML).

    Runs the recipe RECIPE into OUT, streaming in constant memory.

    Reads mergekit's schema (merge_method, base_model, models or slices with layer_range, per-model,
    per-slice and global parameters with gradients and filters, dtype, out_dtype, tokenizer_source, the
    tokenizer block and chat_template, model+lora with local or Hub adapters)
    for the methods of `papa-merge soup --list-methods`, and multi-stage files (several YAML documents,
    each stage named, as mergekit-multi). Fields papa-merge does not implement (modules,
    override_architecture) are refused by name before any model is read. The output records the recipe
    file in its metadata.

    \b
    Example:
      papa-merge run ties.yml -o merged/
    """
    from merge.mergekit_recipe import load_recipe, plan_recipe, run_recipe

    parsed = load_recipe(recipe)
    if dry_run:
        import merge.soups

        merge.soups.output_kind(out)
        plan = plan_recipe(parsed, seed=seed, device=device, on_mismatch=on_mismatch, strict=strict)
        print_plan(plan, out)
        for note in parsed.notes:
            click.echo(f"note:           {note}")
        return
    show = show_progress(progress)
    with one_line_warnings():
        result = run_recipe(parsed, out=out, seed=seed, device=device, shard_size=shard_size,
                            on_mismatch=on_mismatch, force=force, strict=strict, progress=show,
                            **({"jobs": jobs} if jobs != 1 else {}),
                            **({"ranks": True} if under_torchrun() else {}), **({"verify": True} if verify else {}))
    import os

    if os.environ.get("RANK", "0") != "0":  # under torchrun rank 0 speaks for the merge
        return
    click.echo(f"wrote {result.path} ({result.tensors} tensors, {format_bytes(result.written_bytes)}) with "
               f"{parsed.method} of {len(parsed.members)} models{' and a base' if parsed.base else ''} "
               f"in {result.seconds:.2f}s"
               + (f" (the last of {len(parsed.stages) + 1} stages)" if parsed.stages else ""))
    if result.verified is not None:
        click.echo(describe_verified(result.verified))
