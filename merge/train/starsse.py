"""StarSSE and SSE (Sadrtdinov et al., 2023): ensembles that explore the pre-train basin from one fine-tuned model.

Reference: isadrtdinov/ens-for-transfer (``training/train.py``, ``utils/lr_schedule.py``,
``configs/*/resnet_starsse.py``, ``scripts/resnet/resnet_{starsse,sse}.py``). Both methods:

1. fine-tune the *centre* from a pre-trained checkpoint with the usual recipe (cosine schedule); the
   centre is member 0 of the ensemble and of the soup (the reference's ``_N=1`` checkpoint);
2. train K - 1 further members, each a *cycle*: the optimizer state is reset
   (``reset_optim_state``), the learning rate jumps with no warmup to a peak that is a ratio of the
   centre's (``fge_lr = lr_ratio * lr``, ratios {0.25, 0.5, 1, 2, 4} in the scripts) and decays by
   cosine to zero over a length that is a ratio of the centre's epochs (``fge_epochs``, ratios
   {0.5, 1, 2, 4}) (scheduler ``cosine+warmup_cosine`` with ``fge_warmup_epochs = 0``);
3. **StarSSE** (``star_fge=True``) starts every cycle from the centre (a star); **SSE**, Snapshot
   Ensembles with cyclic cosine, starts each cycle where the previous one ended (a chain).

Deliberate differences from the reference:

- The schedule is stepped per optimizer step (the reference's ``continious+cosine+sse`` variant); the
  star/SSE configs step it per epoch.
- Each cycle draws its own data order from its own seed (``seed + i``); the reference's cycles
  continue one data loader. Members are written one file each and a rerun resumes them.
- A centre given as a checkpoint (``init``) is taken with the recipe it records (``papa_merge.train``);
  the ratios apply to that recipe's learning rate and epochs.
"""

from __future__ import annotations

import dataclasses
import filecmp
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from merge.data import Splits
from merge.errors import InvalidArgumentError, MismatchError
from merge.io.sources import open_checkpoint
from merge.io.writer import check_output_free
from merge.keys import TRAIN_KEY
from merge.params import Param
from merge.train.distributed import population_group, rank_device
from merge.train.kit import (
    build_member,
    check_recipe_fits,
    check_resumable,
    evaluate_model,
    load_init,
    member_path,
    prepare,
    save_member,
    train_loader,
    train_record,
)
from merge.train.loop import Callback, fit
from merge.train.recipe import Recipe, default_recipe, diverse_recipes
from merge.train.registry import TrainJob, TrainResult, register_method
from merge.train.report import FINAL_PARAM, finish_run

__all__ = ["branch_recipes", "train_branches", "LR_RATIOS", "EPOCH_RATIOS"]

# The ratios the reference's scripts sweep (scripts/resnet/resnet_starsse.py).
LR_RATIOS = (0.25, 0.5, 1.0, 2.0, 4.0)
EPOCH_RATIOS = (0.5, 1.0, 2.0, 4.0)
CITATION = ("Sadrtdinov et al. 2023, To Stay or Not to Stay in the Pre-train Basin: Insights on Ensembling in "
            "Transfer Learning; code isadrtdinov/ens-for-transfer")


def branch_recipes(centre: Recipe, k: int, *, lr_ratio: float = 1.0, epochs_ratio: float = 1.0, seed: int = 0,
                   diversity: str = "seed") -> list[Recipe]:
    """The recipes of a StarSSE/SSE run: the centre's, then K - 1 cycles'.

    Cycle i keeps the centre's optimizer, batch size and regularisation, draws its seeds (and, with
    ``diversity="augment"``, its augmentations) as member i of :func:`merge.train.diverse_recipes`, and
    gets ``lr = lr_ratio * centre.lr``, ``epochs = epochs_ratio * centre.epochs``, no warmup and a
    cosine decay to zero.

    Args:
        centre: the centre's recipe (member 0, returned unchanged).
        k: members in all (the centre and K - 1 cycles).
        lr_ratio: peak learning rate of a cycle over the centre's (the reference sweeps 0.25 .. 4).
        epochs_ratio: length of a cycle over the centre's epochs (the reference sweeps 0.5 .. 4).
        seed: cycle i's seeds are ``seed + i``.
        diversity: ``seed``, ``order`` or ``augment`` (a cycle's learning rate is fixed by the ratio).

    Returns:
        ``k`` recipes, the centre first.

    Raises:
        InvalidArgumentError: non-positive ratios, ``k`` < 2, or ``diversity="hparams"``.

    Example:
        >>> rs = branch_recipes(Recipe(lr=0.01, epochs=2, warmup_epochs=0.5), 3, lr_ratio=2, epochs_ratio=0.5)
        >>> [(r.lr, r.epochs, r.warmup_epochs, r.data_seed) for r in rs]
        [(0.01, 2, 0.5, 0), (0.02, 1.0, 0.0, 1), (0.02, 1.0, 0.0, 2)]
    """
    if k < 2:
        raise InvalidArgumentError(f"StarSSE and SSE need the centre and at least one cycle: 2 or more members, "
                                   f"got {k}", option="members", choices=(2,))
    for name, v in (("branch_lr_ratio", lr_ratio), ("branch_epochs_ratio", epochs_ratio)):
        if not v > 0:
            raise InvalidArgumentError(f"{name} must be positive, got {v}", option=name)
    if diversity == "hparams":
        raise InvalidArgumentError("a cycle's learning rate is the centre's times branch_lr_ratio, so random "
                                   "hyperparameter search does not apply; use diversity 'seed', 'order' or 'augment'",
                                   option="diversity", choices=("seed", "order", "augment"))
    drawn = diverse_recipes(k, diversity=diversity, base=centre, seed=seed)
    cycles = [dataclasses.replace(r, lr=centre.lr * lr_ratio, epochs=centre.epochs * epochs_ratio,
                                  warmup_epochs=0.0, schedule="cosine") for r in drawn[1:]]
    return [centre, *cycles]


def _fine_tune(recipe: Recipe, *, spec: dict, splits: Splits, out: Path, init: str | os.PathLike | None,
               pretrained: str | None, method: str, extra: Mapping[str, Any], device: torch.device,
               progress: bool, callbacks: Sequence[Callback], eval_batch_size: int, force: bool, desc: str) -> Path:
    """One member: from ``init`` (a fresh optimizer, the recipe's schedule) or from the pretrained weights."""
    check_output_free(out, force=force)
    check_recipe_fits(recipe, splits)
    net = build_member(spec, recipe, None if init is not None else pretrained, device)
    if init is not None:
        load_init(net, init)  # every tensor, BatchNorm statistics included
    state = fit([net], [train_loader(splits, spec, recipe)], [recipe], num_classes=spec["num_classes"], device=device,
                callbacks=callbacks, progress=progress, desc=desc)
    scores = evaluate_model(net, splits, spec, device=device, batch_size=eval_batch_size)
    record = train_record(recipe, state, method=method, pretrained=pretrained, device=device,
                           extra={"init": None if init is None else str(init), **extra})
    return save_member(net, out, spec, splits, record, scores, force=force)


def _same_files(a: Path, b: Path) -> bool:
    if a.is_dir() != b.is_dir():
        return False
    if not a.is_dir():
        return filecmp.cmp(a, b, shallow=False)
    names = sorted(p.name for p in b.iterdir() if p.is_file())
    return names == sorted(p.name for p in a.iterdir() if p.is_file()) and all(
        filecmp.cmp(a / n, b / n, shallow=False) for n in names)


def _given_centre_recipe(path: str | os.PathLike, fallback: Recipe) -> Recipe:
    try:
        with open_checkpoint(path) as src:
            return Recipe.from_dict(json.loads(src.metadata[TRAIN_KEY]))
    except (KeyError, ValueError, TypeError):
        return fallback  # not written by papa-merge train: the job's recipe stands in for the centre's


def train_branches(job: TrainJob, *, star: bool, branch_lr_ratio: float = 1.0,
                   branch_epochs_ratio: float = 1.0, final: bool = True) -> TrainResult:
    """Train a StarSSE (``star=True``) or SSE run: the centre as member 0, then K - 1 cycles.

    Args:
        job: what to train. ``job.init`` is a given centre (copied to ``member-00``, its recorded recipe
            is the centre's); otherwise the centre is fine-tuned from ``job.pretrained`` (an ``hf:``
            model is pretrained itself) with ``job.recipes[0]`` or the job's base recipe.
        star: cycles start from the centre (StarSSE) or from the previous cycle (SSE).
        branch_lr_ratio: a cycle's peak learning rate over the centre's.
        branch_epochs_ratio: a cycle's epochs over the centre's.
        final: end with the final table (:func:`merge.train.report.finish_run`): each member (the centre
            and its cycles), their ensemble, their average and greedy soup; a centre far below its cycles
            is named in a :class:`~merge.train.report.WeakMemberWarning`.

    Returns:
        The members (centre first); ``report`` holds the method, ratios and each member's start, and with
        ``final`` the table; ``outputs`` the soups.

    Raises:
        InvalidArgumentError: fewer than 2 members, bad ratios, more than one recipe given.
        MismatchError: ``member-00`` exists and is not the given centre.
    """
    method = "starsse" if star else "sse"
    if job.recipes is not None and len(job.recipes) != 1:
        raise InvalidArgumentError(f"{method} derives its cycles' recipes from the centre's: give one recipe (the "
                                   f"centre's), got {len(job.recipes)}")
    fallback = job.recipes[0] if job.recipes else dataclasses.replace(
        job.base or default_recipe(job.arch, pretrained=job.pretrained is not None or job.arch.startswith("hf:")),
        seed=job.seed, data_seed=job.seed)
    centre_recipe = _given_centre_recipe(job.init, fallback) if job.init is not None else fallback
    recipes = branch_recipes(centre_recipe, job.members, lr_ratio=branch_lr_ratio, epochs_ratio=branch_epochs_ratio,
                             seed=job.seed, diversity=job.diversity)
    ready = prepare(job, recipes=False)
    splits, spec = ready.splits, ready.spec
    paths = [member_path(job.out_dir, i, arch=spec["arch"]) for i in range(job.members)]
    if job.init is not None:  # a given centre keeps its form (one file, or a model folder)
        paths[0] = Path(job.out_dir) / (Path(paths[0]).stem + (".safetensors" if Path(job.init).is_file() else ""))
    starts = [None if job.init is None else str(job.init)] + [str(paths[0] if star else paths[i - 1])
                                                              for i in range(1, job.members)]
    common = {"branch_lr_ratio": branch_lr_ratio, "branch_epochs_ratio": branch_epochs_ratio,
              "members": job.members}

    def member(i: int, dev: torch.device) -> None:
        p = paths[i]
        if p.exists() and not job.force:
            if i == 0 and job.init is not None:
                if not _same_files(p, Path(job.init)):
                    raise MismatchError(f"{p}: exists but is not the given centre {job.init}; choose another output "
                                        "folder or delete the file", path=p)
            else:
                check_resumable(p, recipes[i], method, spec=spec, data_spec=splits.spec)
            job.member_done(i, p, kept=True)
            return
        if i == 0 and job.init is not None:
            p.parent.mkdir(parents=True, exist_ok=True)
            if Path(job.init).is_dir():
                shutil.copytree(job.init, p)  # the given centre is member 0, as it is
            else:
                shutil.copyfile(job.init, p)
            job.member_done(i, p)
            return
        role = {"role": "centre" if i == 0 else "cycle", "cycle": i, **common}
        _fine_tune(recipes[i], spec=spec, splits=splits, out=p, init=starts[i], pretrained=job.pretrained,
                   method=method, extra={method: role}, device=dev, progress=job.progress, callbacks=job.callbacks,
                   eval_batch_size=job.eval_batch_size, force=job.force,
                   desc=f"{method} {'centre' if i == 0 else f'cycle {i}/{job.members - 1}'}")
        job.member_done(i, p)

    # Star cycles are independent: under torchrun each process trains its block of them (after the
    # centre). An SSE chain is sequential, so its first process trains it all.
    with population_group(job.members - 1, device=job.device) as group:
        dev = rank_device(job.device)
        if group.is_main:
            member(0, dev)
        group.barrier()
        if star:
            for j in group.indices:
                member(j + 1, dev)
        elif group.is_main:
            for i in range(1, job.members):
                member(i, dev)
        group.barrier()
        main = group.is_main
    report = {"method": method, **common, "starts": starts, "centre_recipe": centre_recipe.to_dict()}
    result = TrainResult(paths, {}, report)
    if not main:
        return result
    cycle = recipes[1]
    names = [f"{p.stem} (centre)" if i == 0 else f"{p.stem} (cycle {i})" for i, p in enumerate(paths)]
    caption = (f"{method}: {paths[0].stem} is the centre ({'given' if job.init is not None else 'fine-tuned'}, "
               f"{centre_recipe.epochs:g} epoch(s) at lr {centre_recipe.lr:g}); each cycle: {cycle.epochs:g} "
               f"epoch(s) from peak lr {cycle.lr:g}, started from {'the centre' if star else 'the previous cycle'}")
    return finish_run(result, job, final=final, names=names, with_members=True, caption=caption, average=True,
                      average_label="uniform soup (average.safetensors)",
                      fixes={0: "train the centre longer (more epochs; a cycle's epochs are a ratio of the "
                                "centre's), or give a trained centre as init"})


_BRANCH_PARAMS = (
    Param("branch_lr_ratio", 1.0, low=0.0,
          help="each cycle's peak learning rate over the centre's (the paper sweeps 0.25 .. 4)"),
    Param("branch_epochs_ratio", 1.0, low=0.0,
          help="each cycle's epochs over the centre's (the paper sweeps 0.5 .. 4)"),
    FINAL_PARAM,
)


@register_method("starsse", citation=CITATION, params=_BRANCH_PARAMS,
                 summary="fine-tune a centre (member 0), then K-1 cycles each started from it: a star")
def train_starsse(job: TrainJob, *, branch_lr_ratio: float = 1.0, branch_epochs_ratio: float = 1.0,
                  final: bool = True) -> TrainResult:
    """StarSSE: every cycle starts from the centre with a fresh optimizer and a cosine from the peak learning rate."""
    return train_branches(job, star=True, branch_lr_ratio=branch_lr_ratio, branch_epochs_ratio=branch_epochs_ratio,
                          final=final)


@register_method("sse", citation=CITATION + " (SSE: Huang et al. 2017, Snapshot Ensembles)",
                 params=_BRANCH_PARAMS,
                 summary="fine-tune a centre (member 0), then K-1 cycles each started from the last: a chain")
def train_sse(job: TrainJob, *, branch_lr_ratio: float = 1.0, branch_epochs_ratio: float = 1.0,
              final: bool = True) -> TrainResult:
    """SSE: each cycle starts where the previous one ended, with a fresh optimizer and a cosine from the peak."""
    return train_branches(job, star=False, branch_lr_ratio=branch_lr_ratio, branch_epochs_ratio=branch_epochs_ratio,
                          final=final)
