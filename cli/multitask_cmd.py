"""``papa-merge multitask``: build a multi-task pool (one backbone, a fine-tune and a head per task) and merge it."""

from __future__ import annotations

from pathlib import Path

import click

from cli import util


def _parse_params(values: tuple[str, ...]) -> dict[str, dict[str, object]]:
    """``("ties.density=0.5", "task_arithmetic.lambda=0.4")`` -> ``{"ties": {"density": 0.5}, ...}``."""
    out: dict[str, dict[str, object]] = {}
    for text in values:
        name, eq, raw = text.partition("=")
        op, dot, key = name.partition(".")
        if not (eq and dot and op and key):
            raise click.BadParameter(f"expected OPERATOR.NAME=VALUE like ties.density=0.5, got {text!r}",
                                     param_hint="--param")
        value: object = raw
        for kind in (int, float):
            try:
                value = kind(raw)
                break
            except ValueError:
                pass
        if raw.lower() in ("true", "false"):
            value = raw.lower() == "true"
        out.setdefault(op, {})[key] = value
    return out


def _refuse_existing(path: Path, force: bool, hint: str) -> None:
    """Before any work: an existing output is replaced only with --force (the library refuses it too, later)."""
    if path.exists() and not force:
        raise click.BadParameter(f"{path} already exists; pass --force to replace it, or choose another path",
                                 param_hint=hint)


@click.group("multitask")
def multitask() -> None:
    """Merge per-task fine-tunes of a backbone.

    Each fine-tune keeps its own head; the merged backbone is evaluated on each task with that task's head.

    \b
    Examples:
      papa-merge multitask build pool-a/ --seed 0
      papa-merge multitask run pool-a/pool.json
      papa-merge multitask run clip-vit-b32.json --methods task_arithmetic,ties --param ties.density=0.2
    """


@multitask.command("build", context_settings={"show_default": True})
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--tasks", default=",".join(("mnist", "mnist-parity", "mnist-rot90", "mnist-inverted", "digits-28")),
              help="Comma-separated tasks, one fine-tune each (at least 2).")
@click.option("--seed", default=0, type=int, help="Seed of the splits, initialisations and data order.")
@click.option("--limit", default=2000, type=click.IntRange(min=1), help="Training rows per task.")
@click.option("--pretrain-limit", default=10000, type=click.IntRange(min=1), help="Pretraining rows (MNIST).")
@click.option("--eval-limit", default=1000, type=click.IntRange(min=1), help="Test rows per task.")
@click.option("--epochs", default=4.0, type=click.FloatRange(min=0, min_open=True), help="Epochs of each run.")
@click.option("--lr", default=0.03, type=click.FloatRange(min=0, min_open=True), help="Fine-tuning learning rate.")
@click.option("--multitask/--no-multitask", "joint", default=True,
              help="Also train one model on all tasks (the upper-reference row).")
@click.option("--device", default="cpu", help="cpu, cuda or cuda:N.")
@click.option("--force", is_flag=True, help="Replace existing members.")
def build(out_dir: str, tasks: str, seed: int, limit: int, pretrain_limit: int, eval_limit: int, epochs: float,
          lr: float, joint: bool, device: str, force: bool) -> None:
    """Train a pool: a small CNN pretrained on MNIST, fine-tuned on each task; write OUT_DIR/pool.json."""
    from merge.multitask import build_pool

    _refuse_existing(Path(out_dir) / "pool.json", force, "OUT_DIR")
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    pool = build_pool(out_dir, tasks=names, seed=seed, limit=limit, pretrain_limit=pretrain_limit,
                      eval_limit=eval_limit, epochs=epochs, lr=lr,
                      multitask=joint, device=device, force=force, progress=util.show_progress())
    click.echo(f"wrote {pool.path} ({len(pool.members)} tasks: {', '.join(m.task for m in pool.members)})")


@multitask.command("run", context_settings={"show_default": True})
@click.argument("pool", type=click.Path(exists=True, dir_okay=False))
@click.option("--methods", default=None,
              help="Comma-separated operators (uniform, task_arithmetic, ties, dare_ties, tsv, iso_c, iso_cts, "
                   "regmean, fisher, adamerging). [default: all]")
@click.option("--param", "params", multiple=True, metavar="OPERATOR.NAME=VALUE",
              help="Replace a method's parameter, e.g. ties.density=0.5 (repeatable).")
@click.option("--json", "json_out", default=None, type=click.Path(dir_okay=False),
              help="Also write the rows as JSON to this file.")
@click.option("--force", is_flag=True, help="Replace an existing --json file papa-merge wrote.")
@click.option("--batch-size", default=256, type=click.IntRange(min=1), help="Evaluation batch size.")
@click.option("--device", default="cpu", help="cpu, cuda or cuda:N.")
def run(pool: str, methods: str | None, params: tuple[str, ...], json_out: str | None, force: bool, batch_size: int,
        device: str) -> None:
    """Merge POOL's backbones with each method and evaluate each task with its own head.

    Prints one Markdown table: accuracy per task, mean accuracy, mean normalised accuracy (merged /
    the task's own fine-tune), and the merge's time and peak memory. Methods not registered say so.
    """
    from merge.multitask import format_multitask, run_multitask

    if json_out:
        _refuse_existing(Path(json_out), force, "--json")
    chosen = [m.strip() for m in methods.split(",") if m.strip()] if methods else None
    result = run_multitask(pool, methods=chosen, params=_parse_params(params), device=device, batch_size=batch_size)
    click.echo(format_multitask(result))
    if json_out:
        from merge.multitask import write_json

        write_json(result.to_dict(), json_out, force=force)
