"""``papa-merge soup``: average checkpoints into one, streaming from disk."""

from __future__ import annotations

import textwrap
from pathlib import Path

import click

from cli.help import SectionedCommand
from cli.eval_cmd import echo_line, lm_options, model_options, one_line_warnings
from cli.util import check_local_members, describe_merge, format_bytes, parse_floats, show_progress
from merge.estimate import estimate_merge
from merge.io.formats import SAFETENSORS_SUFFIX
from merge.params import Gradient


def _floats_or_list(ctx: click.Context, param: click.Parameter, value: str | None) -> object:
    if value is None:
        return None
    vals = parse_floats(value, "--" + param.name.replace("_", "-").rstrip("-"))
    return vals[0] if len(vals) == 1 else vals


def _number_or_gradient(ctx: click.Context, param: click.Parameter, value: str | None) -> object:
    """A shared parameter's flag: one number, or ``V0,V1,...``, a gradient over the layers."""
    if value is None:
        return None
    vals = parse_floats(value, "--" + param.name.replace("_", "-").rstrip("-"))
    if not vals:
        raise click.BadParameter(f"expected a number or numbers like 0,0.5,1, got {value!r}",
                                 param_hint="--" + param.name.rstrip("_"))
    return vals[0] if len(vals) == 1 else vals


def _number_or_word(text: str) -> object:
    try:
        return float(text)
    except ValueError:
        return text


def method_options(fn):
    """The merge-method flags shared by ``soup`` (and, where they apply, ``run``)."""
    opts = [
        click.option("--base", default=None, metavar="CKPT",
                     help="Base model the members were fine-tuned from (task vectors are member - base); needed by "
                          "task_arithmetic, ties, dare_*, breadcrumbs*, della*, slerp, model_stock."),
        click.option("--density", default=None, callback=_floats_or_list, metavar="D[,D2,...]",
                     help="Fraction of each task vector kept (ties, dare_*, breadcrumbs*, della*); one value, or one "
                          "per member. [default: 1, keep all]"),
        click.option("--lambda", "lambda_", default=None, callback=_number_or_gradient, metavar="L[,L2,...]",
                     help="Scale of the merged task vector (task methods); L0,L1,... a gradient over the layers. "
                          "[default: 1]"),
        click.option("--t", "t", default=None, callback=_number_or_gradient, metavar="T[,T2,...]",
                     help="slerp: 0 = base, 1 = member; T0,T1,... a gradient over the layers (as --param). "
                          "[required by slerp]"),
        click.option("--gamma", default=None, callback=_floats_or_list, metavar="G[,G2,...]",
                     help="breadcrumbs: fraction of the largest magnitudes dropped. [default: 0.01]"),
        click.option("--epsilon", default=None, callback=_floats_or_list, metavar="E[,E2,...]",
                     help="della: spread of keep probabilities around the density. [default: 0.15]"),
        click.option("--normalize/--no-normalize", default=None,
                     help="Divide by the sum of the (agreeing) weights. [default: per method]"),
        click.option("--rescale/--no-rescale", default=None,
                     help="Rescale kept task-vector elements to the L1 norm. [default: per method]"),
        click.option("--param", "param", multiple=True, metavar="NAME=VALUE",
                     help="Any other method parameter (e.g. max_iter=20); repeatable. NAME=V0,V1,... (e.g. t=0,0.5,1) "
                          "is a gradient over the layers for every member, as a mergekit recipe's list: layer i of "
                          "n takes the value at i/(n-1), interpolated; tensors outside the layers take V0."),
        click.option("--seed", default=0, type=int, help="Seed of the random methods (dare_*, della*)."),
        click.option("--strict", is_flag=True,
                     help="A NaN or infinity in a member is an error (default: a warning naming member and tensor)."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def collect_params(given: dict) -> dict:
    """The method parameters given on the command line, as ``merge.soup(params=...)`` takes them."""
    params: dict[str, object] = {}
    names = {"lambda_": "lambda"}
    for key, value in given.items():
        if key == "param":
            for item in value or ():
                if "=" not in item:
                    raise click.BadParameter(f"expected NAME=VALUE, got {item!r}", param_hint="--param")
                k, v = item.split("=", 1)
                vals = [x.strip() for x in v.split(",")]
                if len(vals) > 1 and not all(vals):
                    raise click.BadParameter(f"a gradient lists one value between each comma, got {item!r}",
                                             param_hint="--param")
                # A list is a gradient over the layers, as in a recipe (per-member values have their own flags).
                params[k.strip()] = vals[0] if len(vals) == 1 else Gradient(_number_or_word(x) for x in vals)
        elif value is not None:
            params[names.get(key, key)] = value
    return params


SOUP_SECTIONS = (
    ("Members and output", ("out", "weights", "weights_from", "base", "force", "dry_run", "verify", "dtype",
                            "shard_size", "on_mismatch", "key")),
    ("Checkpoint window (a training run's checkpoints)", ("schedule", "window", "window_steps")),
    ("Merge method (see --list-methods)", ("method", "list_methods", "density", "lambda_", "t", "gamma", "epsilon",
                                           "normalize", "rescale", "param", "seed", "strict")),
    ("Greedy soup and BatchNorm (evaluate on data)", ("greedy", "data", "eval_text", "block_size", "recompute_bn",
                                                      "batch_size", "batches", "model",
                                                      "num_classes", "in_chans", "image_size")),
    ("Compute", ("accumulate", "device", "jobs", "progress")),
)


def under_torchrun() -> bool:
    """Launched by torchrun (or another launcher) with several processes: every rank runs this command, so the
    merge is split over the ranks."""
    import os

    return os.environ.get("WORLD_SIZE", "1") not in ("", "1")


def _existing(out: str, force: bool) -> str:
    """`` (exists: ...)``: what the real run would do about an output already there (empty when there is none)."""
    from pathlib import Path

    from merge.errors import OutputExistsError
    from merge.io.atomic import check_output_free

    path = Path(out)
    if not (path.exists() or path.is_symlink()):
        return ""
    try:
        check_output_free(path, force=force)
    except OutputExistsError as e:
        why = "pass --force to replace it" if not force else e.message.split("; ")[0].removeprefix(f"{path}: ")
        return f" (exists: the run would be refused; {why})"
    return " (exists: a previous papa-merge output, replaced once the new one is complete)"


def print_plan(plan, out: str, force: bool = False, gradients=None) -> None:
    """``--dry-run``: what the merge will read, write and hold, before reading any tensor (``gradients``: the
    :class:`merge.soups.LayerGradients` of parameters given per layer; the plan shows their first values)."""
    op = plan.operator
    reduced = sum(t.action == "reduce" for t in plan.tensors)
    base = f", base {plan.base.path}" if plan.base is not None else ""
    click.echo(f"members:        {len(plan.sources)}{base}")
    if plan.combination is not None:
        click.echo(f"method:         {op.name} (sum of {', '.join(f'{c:.4g}' for c in plan.coefficients)} x member)")
    else:
        shown = {k: v for k, v in plan.params.items() if k != "weight"}
        extra = f"; parameters {shown}" if shown else ""
        click.echo(f"method:         {op.name} ({op.path} path{extra})")
    if gradients is not None:
        shown = ", ".join(f"{k} {v}" if k != "per_member" else f"per member {v}" for k, v in gradients.record().items())
        click.echo(f"gradients:      {shown}: over the layers, layer i of n at i/(n-1), tensors outside the layers "
                   "at the first value (the method line shows those)")
    verb = "merged"
    click.echo(f"tensors:        {len(plan.tensors)} ({reduced} {verb}, {len(plan.tensors) - reduced} copied"
               f" from {'the base' if plan.base is not None else 'member 0'}, {len(plan.skipped)} skipped)")
    click.echo(f"reads:          {format_bytes(plan.read_bytes)} (every pass counted)")
    click.echo(f"writes:         {format_bytes(plan.out_bytes)} to {out}{_existing(out, force)}")
    click.echo(f"peak memory:    {format_bytes(plan.buffer_bytes)} of working buffers for {op.name} "
               f"({plan.memory_note})")
    click.echo(f"time:           {estimate_merge(plan).describe()}")


@click.command(cls=SectionedCommand, context_settings={"show_default": True}, sections=SOUP_SECTIONS)
@click.argument("members", nargs=-1, required=False)
@click.option("-o", "--out", required=True, type=click.Path(),
              help="Output: NAME.safetensors (one file), NAME.pt/.pth/.bin (a torch state-dict file), or a path "
                   "without a suffix or an existing folder (a Hugging Face model folder).")
@click.option("--method", default="uniform", help="Merge operator (see `papa-merge soup --list-methods`).")
@method_options
@click.option("--weights", default=None, metavar="W1,W2,...",
              help="One weight per member, normalised to sum to one (implies --method weighted).")
@click.option("--weights-from", "weights_from", default=None, metavar="MANIFEST", type=click.Path(dir_okay=False),
              help="Members and weights (pick counts) from a selection manifest written by `papa-merge select`.")
@click.option("--dtype", default=None, metavar="DTYPE",
              help="Output dtype of floating tensors: float32, bfloat16, float16, float64. [default: as input]")
@click.option("--accumulate", default="float32", type=click.Choice(["float32", "float64"]),
              help="Accumulator dtype.")
@click.option("--device", default="cpu", help="Where to reduce: cpu, cuda or cuda:N (streamed chunk by chunk).")
@click.option("--jobs", default=1, type=click.IntRange(min=1), metavar="N",
              help="Local worker processes splitting the merge by tensors (same bits as one process). Under "
                   "torchrun the ranks split it instead: leave at 1.")
@click.option("--shard-size", default="5GB", help="Largest shard of a folder output.")
@click.option("--on-mismatch", default="error", type=click.Choice(["error", "skip", "first"]),
              help="Tensors whose name, shape or dtype differ: fail, drop them, or take member 0's.")
@click.option("--key", default=None, help="Wrapper key of pickled training checkpoints (e.g. ema, state_dict).")
@click.option("--force", is_flag=True, help="Replace an existing output (only once the new one is complete).")
@click.option("--dry-run", is_flag=True, help="Validate and print the plan (sizes, memory) without writing.")
@click.option("--progress/--no-progress", default=None, help="Progress bar. [default: on a terminal]")
@click.option("--greedy", is_flag=True,
              help="Greedy soup (model soups): sort members by val accuracy, start from the best, keep each other "
                   "member only if the average with it scores strictly better on val. Needs papa_merge metadata "
                   "(or --model and --data).")
@click.option("--data", default=None, metavar="NAME",
              help="Dataset for --greedy/--recompute-bn of members that record none (mnist, digits, ...); members "
                   "that record theirs always use their own split. [default: from the members' metadata]")
@model_options
@lm_options
@click.option("--recompute-bn", default=0, type=click.IntRange(min=0), metavar="N",
              help="Recompute BatchNorm statistics of the soup on N training batches (and of every candidate "
                   "with --greedy). 0: off.")
@click.option("--batch-size", default=256, type=click.IntRange(min=1),
              help="Batch size of --greedy evaluation and --recompute-bn.")
@click.option("--batches", default=8, type=click.IntRange(min=1), metavar="N",
              help="Batches (of --batch-size) each member is run on by the merges that use data: regmean and fisher "
                   "on training batches, adamerging on unlabeled validation batches.")
@click.option("--align", "align_method", default=None, type=click.Choice(["weight", "activation"]),
              help="Members trained from different initialisations: permute each member's hidden units onto "
                   "--align-to's first (weight or activation matching), then merge. Needs papa_merge metadata "
                   "(weight matching of Hugging Face folders does not).")
@click.option("--align-to", default=0, type=click.IntRange(min=0), metavar="I",
              help="With --align: the member (index) the others are aligned onto.")
@click.option("--align-batches", default=8, type=click.IntRange(min=1), metavar="N",
              help="With --align: training batches (of --batch-size) for activation matching and REPAIR.")
@click.option("--repair/--no-repair", default=True,
              help="With --align: after merging, REPAIR the convolutions that feed no BatchNorm and recompute "
                   "BatchNorm statistics on the --align-batches batches.")
@click.option("--schedule", default=None, metavar="NAME",
              help="Checkpoint window: order MEMBERS by training step and weight them by a schedule: uniform, "
                   "ema:DECAY, linear, cosine, minus-sqrt (see docs/checkpoint-windows.md).")
@click.option("--window", default=None, type=click.IntRange(min=1), metavar="N",
              help="With --schedule: keep the last N checkpoints. [default: all]")
@click.option("--window-steps", default=None, type=click.IntRange(min=0), metavar="S",
              help="With --schedule: keep the checkpoints of the last S training steps.")
@click.option("--verify", is_flag=True,
              help="After publishing, reopen the output and check every tensor's sha256 against what was written "
                   "(and a model folder's keys against transformers').")
@click.option("--list-methods", is_flag=True, is_eager=True, expose_value=False, callback=lambda c, p, v: _list(c, v),
              help="List the merge operators and exit.")
def soup(members: tuple[str, ...], out: str, method: str, weights: str | None, dtype: str | None, accumulate: str,
         device: str, shard_size: str, on_mismatch: str, key: str | None, force: bool, dry_run: bool,
         progress: bool | None, greedy: bool, data: str | None, recompute_bn: int, batch_size: int,
         weights_from: str | None, model: str | None, num_classes: int | None, in_chans: int | None,
         image_size: int | None, base: str | None, seed: int, strict: bool, jobs: int = 1,
         align_method: str | None = None, align_to: int = 0, align_batches: int = 8, repair: bool = True,
         schedule: str | None = None, window: int | None = None, window_steps: int | None = None,
         verify: bool = False, batches: int = 8, **method_params: object) -> None:
    """Average checkpoints into one.

    Averages MEMBERS... tensor by tensor, streaming from disk in constant memory.

    MEMBERS are .safetensors files, Hugging Face model folders (sharded or not), shard indexes,
    .bin/.pt/.pth pickles (read with weights-only loading), or hf://org/name[@revision]. A path
    listed twice counts twice. BASE+ADAPTER (a checkpoint, then a PEFT LoRA folder or
    hf://org/adapter[@revision], of which adapter_config.json and adapter_model.safetensors alone are
    fetched) is the base with the adapter's delta added tensor by tensor as the merge streams.

    \b
    Examples:
      papa-merge soup ckpts/*.safetensors -o soup.safetensors
      papa-merge soup a.safetensors b.safetensors --weights 0.7,0.3 --dtype bfloat16 -o soup/
      papa-merge soup --greedy ckpts/*.safetensors --recompute-bn 20 -o greedy.safetensors
      papa-merge soup --weights-from selection.json -o selected.safetensors
      papa-merge soup --method ties --base base/ ft1/ ft2/ --density 0.5 -o ties/
      papa-merge soup run/checkpoint-*/ --schedule ema:0.9 --window 5 -o run/window/
      papa-merge soup --method slerp --base a/ b/ --t 0.3 -o slerp/
      papa-merge soup --method slerp --base a/ b/ --param t=0,0.5,0.3,0.7,1 -o slerp/
      papa-merge soup --method regmean ft1.safetensors ft2.safetensors --batches 8 -o regmean.safetensors
      papa-merge soup --jobs 4 --method ties --base base/ ft1/ ft2/ --density 0.5 -o ties/
      papa-merge soup --align weight scratch/member-*.safetensors -o aligned-soup.safetensors
      torchrun --nproc-per-node 8 --no-python papa-merge soup ft*/ -o soup/
    """
    # base+adapter (a LoRA member): both parts must be there.
    check_local_members([part for m in [*members, *([base] if base else [])]
                         for part in (m.rsplit("+", 1) if "+" in m and not Path(m).exists() else [m])])
    # --eval-text, --block-size (lm_options) arrive with the method flags: they are --greedy's, not the method's.
    eval_text, block_size = method_params.pop("eval_text", None), method_params.pop("block_size", None)
    import merge

    recipe_extra = None
    if weights_from is not None:
        if members or weights is not None or greedy:
            raise click.UsageError("--weights-from names the members and their weights; drop MEMBERS, "
                                   "--weights and --greedy")
        from merge.manifest import read_manifest

        selection = read_manifest(weights_from)
        members = tuple(selection.paths)
        weights = ",".join(str(w) for w in selection.weights)
        recipe_extra = {"selection": {"manifest": str(weights_from), **selection.record()}}
    if not members:
        raise click.MissingParameter(ctx=click.get_current_context(), param_type="argument",
                                     param_hint="'MEMBERS...'")
    if verify and (greedy or recompute_bn or align_method is not None or dry_run):
        raise click.UsageError("--verify checks what a soup wrote; drop --greedy, --recompute-bn, --align and "
                               "--dry-run")
    if schedule is None and (window is not None or window_steps is not None):
        raise click.UsageError("--window and --window-steps choose the checkpoints of a --schedule; pass --schedule "
                               "uniform (or another schedule)")
    if schedule is not None:
        if greedy or weights is not None or weights_from is not None or align_method is not None \
                or method != "uniform" or recompute_bn:
            raise click.UsageError("--schedule weighs the checkpoints itself; drop --weights, --weights-from, "
                                   "--method, --greedy, --align and --recompute-bn")
        _window(members, out=out, schedule=schedule, window=window, window_steps=window_steps, dry_run=dry_run,
                force=force, progress=progress, verify=verify,
                options=dict(base=base, params=collect_params(method_params), seed=seed, dtype=dtype,
                             accumulate=accumulate, device=device, on_mismatch=on_mismatch, key=key, strict=strict))
        return
    if greedy and jobs != 1:
        raise click.UsageError("--greedy merges and scores its candidate soups in one process; drop --jobs")
    if eval_text is not None or block_size is not None:
        _greedy_lm(members, out=out, greedy=greedy, method=method, weights=weights, dry_run=dry_run, data=data,
                   model=model, recompute_bn=recompute_bn, eval_text=eval_text, block_size=block_size,
                   batch_size=batch_size if _given("batch_size") else 8, device=device, force=force, progress=progress)
        return
    if greedy:
        _greedy(members, out=out, method=method, weights=weights, dry_run=dry_run, data=data,
                recompute_bn=recompute_bn, batch_size=batch_size, device=device, force=force,
                model=model, num_classes=num_classes, in_chans=in_chans, image_size=image_size,
                progress=progress)
        return
    from merge.ops import get_operator

    needs_data = get_operator(merge.soups.resolve_method(method, weights)).data
    if needs_data and (dry_run or recompute_bn or align_method is not None or jobs != 1):
        raise click.UsageError(f"--method {method} runs the members on data before it merges; drop --dry-run, "
                               "--recompute-bn, --align and --jobs")
    if model is not None and not needs_data:
        raise click.UsageError("--model describes members that record no architecture for --greedy and the merges "
                               "that use data; a plain soup needs none")

    if align_method is not None and (recompute_bn or dry_run or base is not None or jobs != 1):
        raise click.UsageError("--align merges the aligned members in memory, then fixes their statistics "
                               "(--repair); drop --recompute-bn, --dry-run, --base and --jobs")
    if recompute_bn and not out.endswith(SAFETENSORS_SUFFIX):
        raise click.UsageError("--recompute-bn rewrites a single file: write the soup with -o NAME.safetensors")
    w = parse_floats(weights, "--weights") if weights is not None else None
    params = collect_params(method_params)
    if dry_run:
        merge.soups.output_kind(out)
        plan = merge.plan_soup(list(members), method=method, weights=w, base=base, params=params, seed=seed,
                               dtype=dtype, accumulate=accumulate, device=device, on_mismatch=on_mismatch, key=key,
                               strict=strict)
        gradients = merge.soups.layer_gradients(plan.operator.name, len(members), params, None)
        print_plan(plan, out, force, gradients)
        return
    show = show_progress(progress)
    write = merge.soup
    if recompute_bn:
        import functools

        from merge.evaluate.checkpoints import soup_recompute_bn

        # Architecture and data checked first; the statistics recomputed on the temporary, before the rename.
        write = functools.partial(soup_recompute_bn, recompute_bn=recompute_bn, data=data, batch_size=batch_size)
    if needs_data:
        import functools

        from merge.datamerge import merge_with_data

        # One dispatch point: the members' model and data resolved as eval does, run on --batches, then streamed.
        write = functools.partial(merge_with_data, data=data, model=model, num_classes=num_classes, in_chans=in_chans,
                                  image_size=image_size, batches=batches, batch_size=batch_size)
    if align_method is not None:
        import functools

        from merge.align import soup_aligned

        write = functools.partial(soup_aligned, align=align_method, repair=repair, reference=align_to, data=data,
                                  num_batches=align_batches, batch_size=batch_size)
    with one_line_warnings():
        result = write(list(members), out=out, method=method, weights=w, base=base, params=params, seed=seed,
                       dtype=dtype, accumulate=accumulate, device=device, shard_size=shard_size,
                       on_mismatch=on_mismatch, key=key, force=force, progress=show, recipe_extra=recipe_extra,
                       strict=strict, **({"jobs": jobs} if jobs != 1 else {}), **({"verify": True} if verify else {}),
                       **({"ranks": True} if under_torchrun() and not recompute_bn and align_method is None
                          and not needs_data else {}))
    import os

    if os.environ.get("RANK", "0") != "0":  # under torchrun rank 0 speaks for the merge
        return
    if recompute_bn:
        used = result.recipe.get("bn_recomputed", {}).get("batches", recompute_bn)  # fewer if the split is smaller
        click.echo(f"recomputed BatchNorm statistics on {used} training batch{'es' if used != 1 else ''} of "
                   f"{batch_size}")
    if align_method is not None:
        click.echo(describe_alignment(members, result.recipe))
    if needs_data:
        click.echo(describe_data(result.recipe))
    skipped = f", skipped {len(result.skipped)} mismatched" if result.skipped else ""
    click.echo(f"wrote {result.path} ({result.tensors} tensors, {format_bytes(result.written_bytes)}{skipped}) "
               f"in {result.seconds:.2f}s ({result.gb_per_s:.2f} GB/s read): "
               + describe_merge(result.recipe, names=members, base=base))
    if result.verified is not None:
        click.echo(describe_verified(result.verified))


def describe_verified(report: dict) -> str:
    """``verified: 12 tensors read back with the sha256 written; keys match LlamaForCausalLM``."""
    how = ("read back with the sha256 written" if report.get("checksums")
           else "read back (a split merge records no checksums)")
    line = f"verified: {report.get('tensors')} tensors {how}"
    if report.get("architecture"):
        line += f"; keys match {report['architecture']}"
    return line


def describe_window(win) -> list[str]:
    """The lines a window soup prints before merging: schedule, formula, then each checkpoint's step and weight."""
    kept = f"{len(win.members)} of {len(win.members) + len(win.dropped)} checkpoints"
    lines = [f"window:         {kept}, schedule {win.schedule}: {win.formula}"]
    width = max(len(str(m)) for m in win.members)
    for m, step, src, w in zip(win.members, win.steps, win.step_sources, win.weights):
        lines.append(f"  {str(m):<{width}}  step {step:>8} ({src}): weight {w:.6g}")
    return lines


def _window(members: tuple[str, ...], *, out: str, schedule: str, window: int | None, window_steps: int | None,
            dry_run: bool, force: bool, progress: bool | None, verify: bool, options: dict) -> None:
    """``soup --schedule``: merge.windows.window_soup, with the window's steps and weights printed first."""
    import merge
    from merge.windows import plan_window, window_soup

    win = plan_window(list(members), schedule=schedule, window=window, window_steps=window_steps)
    for line in describe_window(win):
        echo_line(line)
    if dry_run:
        merge.soups.output_kind(out)
        plan = merge.plan_soup(list(win.members), method="weighted", weights=win.weights, **options)
        print_plan(plan, out, force)
        return
    with one_line_warnings():
        result = window_soup(list(members), out=out, schedule=schedule, window=window, window_steps=window_steps,
                             force=force, progress=show_progress(progress), verify=verify, **options)
    click.echo(f"wrote {result.path} ({result.tensors} tensors, {format_bytes(result.written_bytes)}) in "
               f"{result.seconds:.2f}s: window of {len(win.members)} checkpoints, schedule {win.schedule}")
    if result.verified is not None:
        click.echo(describe_verified(result.verified))


def describe_data(recipe: dict) -> str:
    """``ran each member on 8 train batches of 256 (digits); ...``: what a merge that uses data ran on, in one line."""
    rec = recipe.get("data") or {}
    line = (f"ran each member on {rec.get('batches')} {rec.get('split')} batches of {rec.get('batch_size')} "
            f"({', '.join(rec.get('datasets') or [])})")
    ada = recipe.get("adamerging")
    if ada:
        ent = ada.get("entropy") or {}
        line += (f"; learned {ada['granularity']} coefficients in {ada['steps']} steps, prediction entropy "
                 f"{ent.get('first', float('nan')):.4f} -> {ent.get('last', float('nan')):.4f}")
    return line


def describe_alignment(members: tuple[str, ...], recipe: dict) -> str:
    """``aligned 3 members onto a.safetensors by weight matching (...); ...``: the align record in one line."""
    rec, stats = recipe.get("align") or {}, recipe.get("statistics") or {}
    ref = members[rec.get("reference", 0)]
    line = (f"aligned {len(members)} members onto {ref} by {rec.get('method')} matching "
            f"({len(rec.get('permutations') or {})} permutations, units moved: "
            f"{', '.join(str(u) for u in rec.get('units_moved') or [])})")
    for group, why in (rec.get("left_in_place") or {}).items():
        line += f"; left in place {group}: {why}"
    if stats:
        what = {"batchnorm": "BatchNorm statistics recomputed", "repair": "REPAIR and BatchNorm statistics",
                "none": "no statistics to fix"}[stats["fix"]]
        line += f"; {what} on {stats['batches']} training batches of {stats['batch_size']}"
    return line


def _greedy(members: tuple[str, ...], *, out: str, method: str, weights: str | None, dry_run: bool,
            data: str | None, recompute_bn: int, batch_size: int, device: str, force: bool, model: str | None,
            num_classes: int | None, in_chans: int | None, image_size: int | None, progress: bool | None) -> None:
    """``soup --greedy``: merge.greedy.greedy_soup_checkpoints, one line per member and candidate as each is scored."""
    if weights is not None or method != "uniform":
        raise click.UsageError("--greedy chooses its own members and averages them uniformly; "
                               "drop --weights/--method")
    if dry_run:
        raise click.UsageError("--greedy evaluates candidate soups, so it has no --dry-run")
    from merge.greedy import greedy_soup_checkpoints

    names = list(members)
    labels: dict[str, str] = {}

    def ready(member_label: str, soup_label: str) -> None:
        # Printed once the members' model and data are known (a refusal before that prints no header).
        labels["soup"] = soup_label.replace(", ", " ", 1)  # "val acc, as stored" -> "val acc as stored"
        echo_line(f"members, {member_label.replace(', ', ' ', 1)}:")

    def member(i: int, score: float) -> None:
        echo_line(f"  {names[i]}: {100 * score:.2f}%")

    first = []

    def report(i: int, score: float, kept: bool) -> None:
        if not first:
            first.append(True)
            echo_line(f"candidates (the soup so far plus one member), {labels['soup']}:")
        echo_line(f"  + {names[i]}: {100 * score:.2f}% -> {'kept' if kept else 'rejected'}")

    with one_line_warnings():
        result, path = greedy_soup_checkpoints(names, out=out, data=data, model=model, num_classes=num_classes,
                                               in_chans=in_chans, image_size=image_size, recompute_bn=recompute_bn,
                                               batch_size=batch_size, device=device, force=force,
                                               progress=show_progress(progress), on_member=member, on_score=report,
                                               on_labels=ready)
    best = result.order[0]
    kept = ", ".join(names[i] for i in result.selected)
    how = result.score_label.split(", ", 1)[-1]
    if len(result.selected) == 1:
        click.echo(f"greedy soup: kept 1 of {len(members)} members ({kept}): the soup is that member; "
                   f"val acc {100 * result.score:.2f}% ({how})")
    else:
        click.echo(f"greedy soup: kept {len(result.selected)} of {len(members)} members ({kept}); "
                   f"val acc {100 * result.score:.2f}% ({how}); best member {names[best]}: "
                   f"{100 * result.member_scores[best]:.2f}% ({result.member_label.split(', ', 1)[-1]})")
    click.echo(f"wrote {path}")


def _given(name: str) -> bool:
    """Whether the option ``name`` was given (on the command line or by the environment), not left to its default."""
    from click.core import ParameterSource

    return click.get_current_context().get_parameter_source(name) not in (ParameterSource.DEFAULT, None)


def _greedy_lm(members: tuple[str, ...], *, out: str, greedy: bool, method: str, weights: str | None, dry_run: bool,
               data: str | None, model: str | None, recompute_bn: int, eval_text: str | None, block_size: int | None,
               batch_size: int, device: str, force: bool, progress: bool | None) -> None:
    """``soup --greedy --eval-text``: greedy soup of causal language models by held-out perplexity."""
    if not greedy or eval_text is None:
        raise click.UsageError("--eval-text and --block-size score the candidates of a greedy soup of language "
                               "models: pass --greedy --eval-text FILE (plain soups need no text)")
    if weights is not None or method != "uniform" or dry_run or data is not None or model is not None or recompute_bn:
        raise click.UsageError("--greedy --eval-text chooses its own members, averages them uniformly and scores "
                               "them on the text; drop --weights, --method, --dry-run, --data, --model and "
                               "--recompute-bn")
    import math

    from merge.greedy import greedy_soup_lm

    names = list(members)

    def ready(member_label: str, soup_label: str) -> None:
        echo_line(f"members, {member_label.split(', ', 1)[-1]}:")

    def member(i: int, score: float) -> None:
        echo_line(f"  {names[i]}: perplexity {math.exp(-score):.3f} (nll/token {-score:.4f})")

    first: list[bool] = []

    def report(i: int, score: float, kept: bool) -> None:
        if not first:
            first.append(True)
            echo_line("candidates (the soup so far plus one member), kept only if the perplexity is lower:")
        echo_line(f"  + {names[i]}: perplexity {math.exp(-score):.3f} (nll/token {-score:.4f}) -> "
                  f"{'kept' if kept else 'rejected'}")

    with one_line_warnings():
        result, path = greedy_soup_lm(names, out=out, eval_text=eval_text, block_size=block_size,
                                      batch_size=batch_size, device=device, force=force,
                                      progress=show_progress(progress), on_member=member, on_score=report,
                                      on_labels=ready)
    best = result.order[0]
    kept = ", ".join(names[i] for i in result.selected)
    if len(result.selected) == 1:
        click.echo(f"greedy soup: kept 1 of {len(members)} members ({kept}): the soup is that member; "
                   f"perplexity {math.exp(-result.score):.3f}")
    else:
        click.echo(f"greedy soup: kept {len(result.selected)} of {len(members)} members ({kept}); perplexity "
                   f"{math.exp(-result.score):.3f}; best member {names[best]}: "
                   f"{math.exp(-result.member_scores[best]):.3f}")
    click.echo(f"wrote {path}")


def _list(ctx: click.Context, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    list_methods()
    ctx.exit(0)


_LIST_WIDTH = 100


def list_methods() -> None:
    """``--list-methods``: one block per operator (name, streaming path, base; then its parameters and citation),
    no line wider than a terminal."""
    from merge.ops import ALIASES, OPERATORS

    rows = []
    for name in sorted(OPERATORS):
        op = OPERATORS[name]
        aliases = [a for a, target in ALIASES.items() if target == name]
        shown = name + (f" (alias {', '.join(aliases)})" if aliases else "")
        params = ", ".join(f"{p.name}{'*' if p.per_member else ''}" for p in op.params) or "-"
        rows.append((shown, op.path, op.base, params, op.citation, op.data))
    head = ("METHOD", "STREAMING PATH", "BASE MODEL")
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(3)]
    click.echo("  ".join(f"{head[i]:<{widths[i]}}" for i in range(3)).rstrip())
    for r in rows:
        click.echo("  ".join(f"{r[i]:<{widths[i]}}" for i in range(3)).rstrip())
        # indented lines: citations run to 150 characters; a method that runs the members on data says on what
        for text in (f"parameters: {r[3]}", *([f"needs data: {r[5]}"] if r[5] else []), r[4]):
            for line in textwrap.wrap(text, width=_LIST_WIDTH, initial_indent="    ", subsequent_indent="      "):
                click.echo(line)
    click.echo()
    click.echo("* per member: one value for all members, or one per member.")
    click.echo()
    click.echo(textwrap.fill("streaming path: linear = one pass folding members; gram = a pass for norms and angles, "
                             "then a linear pass; task = passes for each member's thresholds, then one pass folding "
                             "task vectors. Peak memory does not grow with the number of members (see --dry-run).",
                             width=_LIST_WIDTH))
