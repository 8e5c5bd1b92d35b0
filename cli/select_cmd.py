"""``papa-merge select``: greedy ensemble selection (with replacement) of checkpoints, written as a manifest."""

from __future__ import annotations

import click

from cli.eval_cmd import BATCH_HELP, batch_size_for, echo_line, lm_options, model_options, one_line_warnings
from cli.util import check_local_members, show_progress


@click.command("select", context_settings={"show_default": True})
@click.argument("checkpoints", nargs=-1, required=True)
@click.option("-k", "--size", required=True, type=click.IntRange(min=1),
              help="Distinct members to select (the ensemble size).")
@click.option("--by", default="nll", type=click.Choice(["nll", "acc"]),
              help="What each pick improves on val: NLL of the averaged probabilities (the paper's choice) or "
                   "accuracy.")
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False),
              help="The manifest (.json) to write: members with their weights (pick counts).")
@click.option("--data", default=None, metavar="NAME",
              help="Dataset of checkpoints that record none. [default: from the checkpoints' metadata]")
@model_options
@lm_options
@click.option("--batch-size", default=None, type=click.IntRange(min=1), help=BATCH_HELP)
@click.option("--device", default="cpu", help="cpu, cuda or cuda:N.")
@click.option("--force", is_flag=True, help="Replace an existing manifest.")
@click.option("--progress/--no-progress", default=None, help="Progress bars on stderr. [default: on a terminal]")
def select(checkpoints: tuple[str, ...], size: int, by: str, out: str, data: str | None, model: str | None,
           num_classes: int | None, in_chans: int | None, image_size: int | None, batch_size: int | None, device: str,
           force: bool, progress: bool | None, eval_text: str | None = None, block_size: int | None = None) -> None:
    """Select an ensemble greedily on val.

    Picks SIZE members from CHECKPOINTS by greedy selection on val.

    Caruana et al.'s greedy selection, as hyperparameter ensembles use it (Wenzel et al. 2020): from
    the empty ensemble, add (with replacement) the checkpoint that most lowers the val NLL of the
    averaged predicted probabilities, until SIZE distinct members are in or no pick helps. A member
    picked twice counts twice: the manifest gives each member its pick count as weight, for
    `papa-merge eval MANIFEST` (the weighted ensemble) and `papa-merge soup --weights-from MANIFEST`.

    \b
    Examples:
      papa-merge select pool/*.safetensors --size 3 -o selection.json
      papa-merge eval selection.json
      papa-merge soup --weights-from selection.json -o selected.safetensors
      papa-merge select lm-*/ --size 2 --eval-text val.jsonl -o lm-selection.json
    """
    from pathlib import Path


    names = list(checkpoints)
    check_local_members(names)  # before torch is imported, and before the pool is counted

    from merge.greedy import select_checkpoints

    width = max(len(n) for n in names) + 2
    if eval_text is not None and (data is not None or model is not None or by != "nll"):
        raise click.UsageError("--eval-text selects language models by the NLL of their mixture on the text; drop "
                               "--data, --model and --by acc")
    split = "val" if eval_text is None else f"{Path(eval_text).name}"
    echo_line(f"pool: {len(names)} checkpoints, {split} metrics as stored")

    def member(i: int, m: dict[str, float]) -> None:
        if eval_text is not None:
            echo_line(f"  {names[i]:<{width}} nll/token {m['nll']:.4f}  perplexity {m['ppl']:.3f}")
            return
        echo_line(f"  {names[i]:<{width}} acc {100 * m['acc']:6.2f}%  nll {m['nll']:.4f}  ece {m['ece']:.4f}")

    with one_line_warnings():
        sel = select_checkpoints(names, size=size, by=by, data=data, model=model, num_classes=num_classes,
                                 in_chans=in_chans, image_size=image_size, device=device, out=out, force=force,
                                 batch_size=batch_size_for(batch_size, eval_text), progress=show_progress(progress),
                                 on_member=member, eval_text=eval_text, block_size=block_size)
    echo_line(f"greedy selection by {split} {by}, with replacement, to {size} distinct members:")
    for t, step in enumerate(sel.steps, 1):
        if eval_text is not None:
            echo_line(f"  pick {t}: {step['member']:<{width}} ensemble nll/token {step['nll']:.4f}  "
                      f"perplexity {step['ppl']:.3f}")
            continue
        echo_line(f"  pick {t}: {step['member']:<{width}} ensemble val acc {100 * step['acc']:6.2f}%  "
                  f"nll {step['nll']:.4f}")
    why = {"size": f"{size} distinct members reached", "no improvement": "no further pick improved the ensemble",
           "max picks": "the pick limit was reached"}.get(sel.stopped, sel.stopped)
    picked = ", ".join(f"{Path(p).name} x{w}" for p, w in zip(sel.paths, sel.weights))
    click.echo(f"selected {len(sel.paths)} members in {sel.total_picks} picks ({why}): {picked}")
    if eval_text is not None:
        text = sel.scores["text"]
        click.echo(f"ensemble (weights = pick counts): {split} nll/token {text['nll']:.4f}  "
                   f"perplexity {text['ppl']:.3f}")
        click.echo(f"wrote {out}")
        return
    val = sel.scores["val"]
    click.echo(f"ensemble (weights = pick counts): val acc {100 * val['acc']:.2f}%  nll {val['nll']:.4f}  "
               f"ece {val['ece']:.4f}")
    click.echo(f"wrote {out}")
