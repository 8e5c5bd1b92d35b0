"""Independent training: each member alone, onward from one shared start (or each from its own).

Members meant for merging share a start, as model soups fine-tune one pretrained model (Wortsman et
al. 2022) and as networks trained onward from a short common run stay in one basin (Frankle et al.
2020, linear mode connectivity): the given ``init``, else the pretrained weights with one seeded head,
else a warm start trained once. Each member records its start (:mod:`merge.lineage`), and a rerun
resumes member by member, refusing members that started elsewhere.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from merge.data import Splits
from merge.errors import InvalidArgumentError, MismatchError
from merge.io.sources import read_safetensors_metadata
from merge.keys import TRAIN_KEY
from merge.lineage import start_of
from merge.params import Param
from merge.train.kit import (
    build_member,
    check_resumable,
    default_start_kind,
    load_init,
    member_path,
    member_start,
    prepare,
)
from merge.train.members import train_member
from merge.train.recipe import Recipe, default_recipe
from merge.train.registry import TrainJob, TrainResult, register_method
from merge.train.report import FINAL_PARAM, finish_run

__all__ = ["train_independent", "WARM_START_FRACTION"]


# From scratch, members share a warm start trained once for this share of their epochs. Networks trained
# onward from a short common run stay in one basin and average well (Frankle et al. 2020, linear mode
# connectivity); from different random initialisations their average is near chance.
WARM_START_FRACTION = 0.25


def _warm_start(job: TrainJob, spec: dict, splits: Splits, base: Recipe, epochs: float) -> Path:
    """Train (or reuse) the shared warm start: ``base`` for ``epochs`` from the init of ``job.seed``."""
    recipe = dataclasses.replace(base, seed=job.seed, data_seed=job.seed, epochs=float(epochs))
    path = member_path(Path(job.out_dir) / "start", 0, arch=spec["arch"])
    if path.exists() and not job.force:
        check_resumable(path, recipe, "independent", spec=spec, data_spec=splits.spec)
        return path
    return train_member(recipe, model=spec, data=splits, out=path, pretrained=job.pretrained, device=job.device,
                        progress=job.progress, eval_batch_size=job.eval_batch_size, init=job.init,
                        desc="shared start", force=job.force)


def _check_same_start(path: Path, expected: dict | None) -> None:
    """A member on disk may stand in for a planned one only if it started where the planned one would."""
    meta = read_safetensors_metadata(path)
    found = start_of(meta)
    if found is None and expected is not None and _same_start_before_records(meta, expected):
        return
    if expected is None:  # independent initialisations: each member its own start
        if found is not None and found.get("kind") != "independent":
            raise MismatchError(f"{path}: exists but was trained from a shared start ({found.get('kind')}), not from "
                                "its own initialisation; choose another output folder or delete the file", path=path)
        return
    if found is None or found.get("sha256") != expected["sha256"]:
        was = "without a recorded start" if found is None else f"from another start ({found.get('kind')})"
        raise MismatchError(f"{path}: exists but was trained {was}, while this run's members share the "
                            f"{expected['kind']} start {expected['sha256'][:12]}; resuming would mix members that "
                            "do not average, so choose another output folder or delete the file", path=path)


def _same_start_before_records(meta: Mapping[str, str], expected: dict) -> bool:
    """A member written before starts were recorded started where ``expected`` does if its recorded
    ``init`` is the same checkpoint and, without one, its seed is the start's seed (its own initialisation)."""
    try:
        train = json.loads(meta[TRAIN_KEY])
    except (KeyError, ValueError):
        return False
    if expected["kind"] == "init":
        return train.get("init") == expected.get("path")
    return expected["kind"] in ("shared-init", "pretrained") and train.get("init") is None and \
        train.get("seed") == expected.get("seed")


@register_method("independent", citation="Lakshminarayanan et al. 2017 (deep ensembles); Wortsman et al. 2022 "
                 "(model soups: fine-tunes of one pretrained model); Frankle et al. 2020 (a shared warm start)",
                 summary="each member alone, onward from one shared start (independent_init: each from its own "
                         "init); resumable member by member",
                 params=[Param("independent_init", False, bool,
                               help="start each member from its own random initialisation (deep ensembles: more "
                                    "diverse predictions, but their weight average is near chance)"),
                         Param("warm_start", None, float,  # >= 0, checked below with the unit
                               help="epochs of the shared start, trained once into OUT/start/ before the members "
                                    "(default: a quarter of the epochs from scratch, 0 for pretrained models)"),
                         FINAL_PARAM])
def train_independent(job: TrainJob, *, independent_init: bool = False, warm_start: float | None = None,
                      final: bool = True) -> TrainResult:
    """Members trained one after another, each alone; members already on disk (same recipe and start) are kept.

    Members meant for merging share a start, as model soups fine-tune one pretrained model: by default each
    member starts from ``job.init`` when given; else from the pretrained weights with one new head (the
    head initialised from ``job.seed``) for pretrained and ``hf:`` models; else from a shared warm start,
    the base recipe trained once for ``warm_start`` epochs from the initialisation of ``job.seed``, written
    to ``out_dir/start/``. Every member records that start in its ``papa_merge.train`` metadata
    (:mod:`merge.lineage`), and :func:`merge.soup` warns about members from different starts.

    Args:
        job: what to train.
        independent_init: start each member from its own initialisation (seed ``seed + i``), as deep
            ensembles do: members differ more, which suits ensembles of predictions, but their weight
            average is near chance.
        warm_start: epochs of the shared warm start (default: a quarter of the members' epochs from
            scratch, none for pretrained models; 0: the members share only the initialisation).
        final: end with the final table (:func:`merge.train.report.finish_run`): the members, their
            ensemble, and (members of one start) their average ``average.safetensors`` and greedy soup.

    Returns:
        The members' paths; ``outputs["start"]`` is the warm start's when one was trained, and
        ``report["start"]`` the recorded start (kind and sha256); with ``final``, the soups and the table.

    Raises:
        InvalidArgumentError: ``independent_init`` with ``init`` or ``warm_start``, or a negative ``warm_start``.
        MismatchError: a member on disk was trained with another recipe or from another start.
    """
    if independent_init and (job.init is not None or warm_start):
        raise InvalidArgumentError("independent_init starts every member from its own initialisation; it cannot "
                                   "be combined with init or warm_start (drop one)")
    if warm_start is not None and not warm_start >= 0:
        raise InvalidArgumentError(f"warm_start must be >= 0 epochs, got {warm_start}", option="warm_start")
    ready = prepare(job)
    recipes, splits, spec = ready.recipes, ready.splits, ready.spec
    pretrained = job.pretrained is not None or str(spec["arch"]).startswith("hf:")
    init, kind, init_seed, outputs = job.init, None, None, {}
    if not independent_init:
        init_seed = job.seed
        if warm_start is None:
            warm_start = (0.0 if pretrained or job.init is not None
                          else WARM_START_FRACTION * max(r.epochs for r in recipes))
        if warm_start > 0:
            base = job.base or (job.recipes[0] if job.recipes else default_recipe(job.arch, pretrained=pretrained))
            init = outputs["start"] = _warm_start(job, spec, splits, base, warm_start)
            kind = "warm-start"
    paths, expected = [], None
    for i, r in enumerate(recipes):
        p = member_path(job.out_dir, i, arch=spec["arch"])
        if p.exists() and not job.force:
            check_resumable(p, r, "independent", spec=spec, data_spec=splits.spec)
            if init_seed is not None and expected is None:
                expected = _planned_start(spec, r, job, init, init_seed, kind)
            _check_same_start(p, expected)
            job.member_done(i, p, kept=True)
        else:
            train_member(r, model=spec, data=splits, out=p, pretrained=job.pretrained, device=job.device,
                         progress=job.progress, callbacks=job.callbacks, eval_batch_size=job.eval_batch_size,
                         init=init, desc=f"member {i + 1}/{len(recipes)}", force=job.force, init_seed=init_seed,
                         start_kind=kind)
            job.member_done(i, p)
        paths.append(p)
    start = None if independent_init else start_of(read_safetensors_metadata(paths[0]))
    result = TrainResult(paths, outputs, {"start": start} if start else {})
    how = ("each member from its own initialisation (no soups: their weight average is near chance; they make an "
           "ensemble of predictions)" if independent_init else
           f"members trained one by one from one shared start ({(start or {}).get('kind', 'shared')})")
    return finish_run(result, job, final=final and len(paths) >= 2, caption=f"independent: {how}",
                      average=False if independent_init else None,
                      average_label="uniform soup (average.safetensors)")


def _planned_start(spec: dict, recipe: Recipe, job: TrainJob, init: str | os.PathLike | None, init_seed: int,
                   kind: str | None) -> dict:
    """The start a member of this run would record (built on the CPU, not trained), to check members on disk."""
    net = build_member(spec, dataclasses.replace(recipe, seed=init_seed), job.pretrained, torch.device("cpu"))
    if init is not None:
        load_init(net, init)
    return member_start(net, init=init, init_seed=init_seed, kind=kind or default_start_kind(spec, job.pretrained, init,
                                                                                            init_seed))
