"""``papa-merge eval``: accuracy, NLL and ECE of members, their prediction ensemble, selections and soups."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import click

from cli import util

MODEL_HELP = ("Architecture of checkpoints that record none (e.g. a timm state dict saved with torch.save): "
              "small_cnn, timm:<name> or hf:<folder>. [default: from the checkpoints' metadata]")


def model_options(f):  # a click decorator
    """``--model``, ``--num-classes``, ``--in-chans``, ``--image-size``: what a checkpoint trained elsewhere is."""
    for opt in reversed([
        click.option("--model", "model", default=None, metavar="ARCH", help=MODEL_HELP),
        click.option("--num-classes", type=click.IntRange(min=2), default=None,
                     help="Classes of --model's head. [default: the dataset's]"),
        click.option("--in-chans", type=click.IntRange(min=1), default=None,
                     help="Input channels of --model. [default: the dataset's]"),
        click.option("--image-size", type=click.IntRange(min=4), default=None,
                     help="Input size of --model (images are resized to it). [default: the dataset's]"),
    ]):
        f = opt(f)
    return f


def echo_line(text: str) -> None:
    """Print a result line now, above any progress bar (bars live on stderr, results on stdout), flushed."""
    util.echo_result(text)


@contextlib.contextmanager
def one_line_warnings() -> Iterator[None]:
    """Library warnings (e.g. "the checkpoints record no data split") as one ``warning: ...`` line on stderr."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:  # warnings' hook
        click.echo(f"warning: {message}", err=True)

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        yield


@click.command("eval", context_settings={"show_default": True})
@click.argument("checkpoints", nargs=-1, required=True)
@click.option("--data", default=None, metavar="NAME",
              help="Dataset of checkpoints that record none (mnist, digits, tweets, bbc, imagefolder:PATH, "
                   "csv:PATH). Checkpoints that record their data are always evaluated on their own split. "
                   "[default: from the checkpoints' metadata]")
@model_options
@click.option("--split", default="both", type=click.Choice(["val", "test", "both"]), help="Splits to evaluate.")
@click.option("--ensemble/--no-ensemble", default=True,
              help="Add the prediction ensemble (mean of softmax probabilities) of the members.")
@click.option("--recompute-bn", default=0, type=click.IntRange(min=0), metavar="N",
              help="Recompute BatchNorm statistics of each checkpoint on N training batches before evaluating.")
@click.option("--batch-size", default=256, type=click.IntRange(min=1), help="Evaluation batch size.")
@click.option("--device", default="cpu", help="cpu, cuda or cuda:N.")
@click.option("--progress/--no-progress", default=None, help="Progress bars on stderr. [default: on a terminal]")
def eval_(checkpoints: tuple[str, ...], data: str | None, model: str | None, num_classes: int | None,
          in_chans: int | None, image_size: int | None, split: str, ensemble: bool, recompute_bn: int,
          batch_size: int, device: str, progress: bool | None) -> None:
    """Evaluate checkpoints on held-out data.

    CHECKPOINTS are members, soups or selection manifests.

    The model is rebuilt from each checkpoint's papa_merge.model metadata (or --model) and the
    data from its papa_merge.data: the same split as training, so val and test are never training
    rows. Checkpoints with a recorded recipe are soups; the others are members, whose prediction
    ensemble gets its own row. A manifest written by `papa-merge select` adds its members and its
    ensemble weighted by the pick counts. Each row prints as soon as it is computed.

    \b
    Examples:
      papa-merge eval runs/quickstart/members/*.safetensors runs/quickstart/greedy.safetensors
      papa-merge eval selection.json --split test
      papa-merge eval resnet-a.pth resnet-b.pth --model timm:resnet18 --data imagefolder:photos/
    """
    util.check_local_members(checkpoints)
    from merge.evaluate import TableFormatter, evaluate_checkpoints, scoring_label, summarize_members

    splits = ["val", "test"] if split == "both" else [split]
    fmt = TableFormatter.for_names([*checkpoints, "members mean (00)", "ensemble of 00 members"], splits)
    started = []
    used = {"bn": recompute_bn}

    def on_ready(bn_batches: int) -> None:
        used["bn"] = bn_batches  # the batches actually used: fewer when the training split holds fewer

    def on_row(row) -> None:  # an EvalRow
        if not started:
            echo_line(f"metrics {scoring_label(used['bn'], batch_size)}:")
            echo_line(fmt.header())
            started.append(True)
        echo_line(fmt.row(row))

    with one_line_warnings():
        rows = evaluate_checkpoints(list(checkpoints), data=data, model=model, num_classes=num_classes,
                                    in_chans=in_chans, image_size=image_size, split=split, ensemble=ensemble,
                                    batch_size=batch_size, device=device, recompute_bn=recompute_bn, on_ready=on_ready,
                                    progress=util.show_progress(progress), on_row=on_row)
    if sum(r.kind == "member" for r in rows) >= 2:
        for row in summarize_members(rows):
            echo_line(fmt.row(row))
