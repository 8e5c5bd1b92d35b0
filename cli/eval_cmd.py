"""``papa-merge eval``: accuracy, NLL and ECE of members, their prediction ensemble, selections and soups."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from typing import Any

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


def lm_options(f):  # a click decorator
    """``--eval-text``, ``--block-size``: members that are causal language models, scored by perplexity on a text."""
    for opt in reversed([
        click.option("--eval-text", type=click.Path(dir_okay=False), default=None, metavar="FILE",
                     help="Members are causal language models (Hugging Face folders, *ForCausalLM): score them by "
                          "perplexity on this held-out text (plain text, or .jsonl with a \"text\" field), with their "
                          "tokenizer, instead of on a dataset."),
        click.option("--block-size", type=click.IntRange(min=2), default=None, metavar="N",
                     help="With --eval-text: tokens per block (documents are concatenated, each ended by the "
                          "tokenizer's end token, and cut into blocks). [default: min(1024, the model's context)]"),
    ]):
        f = opt(f)
    return f


def batch_size_for(batch_size: int | None, eval_text: str | None) -> int:
    """``--batch-size``'s default: 256 examples, or 8 blocks of a text (a block holds up to 1024 tokens)."""
    return batch_size if batch_size is not None else (8 if eval_text else 256)


BATCH_HELP = "Evaluation batch size (blocks of tokens with --eval-text). [default: 256; 8 with --eval-text]"


def lm_table(names: list[str], label: str) -> tuple[str, str, Callable[[Any], str]]:
    """The perplexity table: its title line, header and a row formatter."""
    width = max(20, *(len(n) for n in names)) + 2

    def row(r) -> str:  # an EvalRow with the text split
        m = r.metrics["text"]
        name = r.name.ljust(width) if len(r.name) < width else r.name + " "
        return f"{name}{m['nll']:12.4f}{m['ppl']:13.3f}"

    return f"{label}:", "model".ljust(width) + f"{'nll/token':>12s}{'perplexity':>13s}", row


def eval_lm(checkpoints: tuple[str, ...], *, eval_text: str, block_size: int | None, ensemble: bool,
            batch_size: int, device: str, progress: bool | None) -> None:
    """``eval --eval-text``: one perplexity row per language model as it is scored, then the members' summary."""
    from merge.evaluate import evaluate_lm_checkpoints, summarize_members

    names = [*checkpoints, "members mean (00)", "ensemble of 00 members"]
    started: list[Callable[[Any], str]] = []

    def ready(ev) -> None:  # a LanguageModelEvaluator
        title, header, row = lm_table(names, ev.label())
        echo_line(title)
        echo_line(header)
        started.append(row)

    with one_line_warnings():
        rows = evaluate_lm_checkpoints(list(checkpoints), eval_text=eval_text, block_size=block_size,
                                       ensemble=ensemble, batch_size=batch_size, device=device,
                                       progress=util.show_progress(progress), on_ready=ready,
                                       on_row=lambda r: echo_line(started[0](r)))
    if sum(r.kind == "member" for r in rows) >= 2:
        for r in summarize_members(rows):
            echo_line(started[0](r))


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
@lm_options
@click.option("--batch-size", default=None, type=click.IntRange(min=1), help=BATCH_HELP)
@click.option("--device", default="cpu", help="cpu, cuda or cuda:N.")
@click.option("--progress/--no-progress", default=None, help="Progress bars on stderr. [default: on a terminal]")
def eval_(checkpoints: tuple[str, ...], data: str | None, model: str | None, num_classes: int | None,
          in_chans: int | None, image_size: int | None, split: str, ensemble: bool, recompute_bn: int,
          batch_size: int | None, device: str, progress: bool | None, eval_text: str | None = None,
          block_size: int | None = None) -> None:
    """Evaluate checkpoints on held-out data.

    CHECKPOINTS are members, soups or selection manifests.

    The model is rebuilt from each checkpoint's papa_merge.model metadata (or --model) and the
    data from its papa_merge.data: the same split as training, so val and test are never training
    rows. Checkpoints with a recorded recipe are soups; the others are members, whose prediction
    ensemble gets its own row. A manifest written by `papa-merge select` adds its members and its
    ensemble weighted by the pick counts. Each row prints as soon as it is computed.

    With --eval-text, CHECKPOINTS are causal language models (Hugging Face folders) scored by
    perplexity on that held-out text with their own tokenizer; the members' ensemble averages their
    next-token probabilities.

    \b
    Examples:
      papa-merge eval runs/quickstart/members/*.safetensors runs/quickstart/greedy.safetensors
      papa-merge eval selection.json --split test
      papa-merge eval resnet-a.pth resnet-b.pth --model timm:resnet18 --data imagefolder:photos/
      papa-merge eval lm-a/ lm-b/ soup/ --eval-text val.jsonl --block-size 128
    """
    util.check_local_members(checkpoints)
    batch_size = batch_size_for(batch_size, eval_text)
    if eval_text is not None:
        if data is not None or model is not None or recompute_bn:
            raise click.UsageError("--eval-text scores language models by perplexity on the text; drop --data, "
                                   "--model and --recompute-bn")
        eval_lm(checkpoints, eval_text=eval_text, block_size=block_size, ensemble=ensemble, batch_size=batch_size,
                device=device, progress=progress)
        return
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
