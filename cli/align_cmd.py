"""``papa-merge align``: permute members trained from different initialisations onto a reference (Git Re-Basin)."""

from __future__ import annotations

import click


@click.command(context_settings={"show_default": True})
@click.argument("ref", type=click.Path(exists=True))
@click.argument("others", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False),
              help="Folder for the aligned members (one .safetensors each, the reference included; a model folder "
                   "member is written as a folder of its name, with its config and tokenizer files).")
@click.option("--method", type=click.Choice(["weight", "activation"]), default="weight",
              help="weight: match the weights (no data); activation: match activations on training batches.")
@click.option("--data", default=None, help="Dataset, for members that record none.")
@click.option("--batches", "num_batches", type=click.IntRange(min=1), default=8,
              help="Training batches for activation matching (and to trace the model).")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, help="Batch size of those batches.")
@click.option("--seed", default=0, type=int, help="Seed of weight matching's random order of layers.")
@click.option("--device", default="cpu", help="cpu, cuda or cuda:N (activation matching).")
@click.option("--force", is_flag=True, help="Replace an existing output folder papa-merge wrote.")
def align(ref: str, others: tuple[str, ...], out: str, method: str, data: str | None, num_batches: int,
          batch_size: int, seed: int, device: str, force: bool) -> None:
    """Align members from different starts.

    Permutes the hidden units of each OTHER member onto REF's (Git Re-Basin, Ainsworth et al. 2023), so
    that members trained from different initialisations can be averaged. Each written member computes
    exactly the same function as its input; only the order of its units changes. Units the tracer
    cannot permute soundly are left in place and listed.

    \b
    Examples:
      papa-merge align run/member-00.safetensors run/member-01.safetensors -o aligned/
      papa-merge align minilm-a/ minilm-b/ -o aligned/   (Hugging Face folders: weight matching, no data)
      papa-merge soup aligned/*.safetensors --recompute-bn 20 -o soup.safetensors
      papa-merge soup --align activation run/member-*.safetensors -o soup.safetensors   (in one step)
    """
    from merge.align import write_aligned

    files, aligned = write_aligned([ref, *others], out=out, force=force, method=method, data=data,
                                   num_batches=num_batches, batch_size=batch_size, seed=seed, device=device)
    record = aligned.record()
    spec = aligned.result.spec
    click.echo(f"{method} matching onto {ref}: {len(spec.sizes)} permutations "
               f"({sum(spec.sizes.values())} units)")
    for path, src, moved in zip(files, [ref, *others], record["units_moved"]):
        click.echo(f"  {path}  ({moved} units moved from {src})")
    for group, why in spec.fixed.items():
        click.echo(f"left in place: {group}: {why}")
