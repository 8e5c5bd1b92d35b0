"""The two loops that write members: one member alone, or a population in lockstep.

:func:`train_member` trains one network and writes it with its metadata (:mod:`merge.train.kit`);
independent members, StarSSE cycles, hyperparameter configurations and warm starts are each one call.
:func:`train_population` trains several networks step by step together, so population callbacks
(PAPA's pull, PAPA-all's mixes) see all of them at every step.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from merge.data import Splits
from merge.engine import resolve_device
from merge.errors import InvalidArgumentError, OutputExistsError
from merge.io.writer import check_output_free
from merge.lineage import START_FIELD, population_start
from merge.train.kit import (
    build_member,
    check_recipe_fits,
    check_resumable,
    default_start_kind,
    evaluate_model,
    load_init,
    member_path,
    member_start,
    resolve_spec,
    resolve_splits,
    save_member,
    train_loader,
    train_record,
)
from merge.train.loop import Callback, fit
from merge.train.recipe import Recipe

__all__ = ["train_member", "train_population"]


def train_member(recipe: Recipe, *, model: str | Mapping[str, Any], data: str | Splits, out: str | os.PathLike,
                 pretrained: str | None = None, device: str | torch.device = "cpu", progress: bool = True,
                 callbacks: Sequence[Callback] = (), limit: int | None = None, split_seed: int = 0,
                 val_fraction: float = 0.1, eval_batch_size: int = 256, force: bool = False,
                 init: str | os.PathLike | None = None, desc: str | None = None, init_seed: int | None = None,
                 start_kind: str | None = None) -> Path:
    """Train one member and write it, with its metadata, to ``out`` (atomically).

    Args:
        recipe: the member's hyperparameters and seeds.
        model: an architecture name (sized to the data) or a model spec dict.
        data: a dataset name (:func:`merge.data.load_dataset`) or loaded :class:`~merge.data.Splits`.
        out: a ``.safetensors`` path (one file), or any other path: a folder holding ``model.safetensors``
            and what its library needs to load it (:mod:`merge.models.export`: ``config.json``, tokenizer).
        pretrained: weights to start from (timm models; see :func:`merge.models.build_model`).
        device: ``cpu``, ``cuda`` or ``cuda:N``.
        progress: show a progress bar over steps.
        callbacks: hooks around the step.
        limit, split_seed, val_fraction: how a dataset name is loaded (ignored for a ``Splits``).
        eval_batch_size: batch size of the val/test evaluation.
        force: replace an existing ``out``.
        init: a checkpoint of the same architecture to start from instead of the fresh (or pretrained)
            weights: StarSSE trains K branches from one fine-tuned member, each with a fresh optimizer and
            a high warmup-then-cosine schedule (``Recipe(lr=..., warmup_epochs=...)``).
        desc: the progress bar's label.
        init_seed: the seed of the initial weights (default ``recipe.seed``); members that share a start
            pass one value, and their training draws (dropout, mixup) still follow their own ``recipe.seed``.
        start_kind: how the start is recorded (:func:`merge.lineage.start_record`; default: ``init``
            with ``init``, else ``pretrained``/``shared-init`` with ``init_seed``, else ``independent``).

    The member's ``papa_merge.train`` records its start: the kind and the sha256 of the weights it
    started from (:mod:`merge.lineage`), so a soup can tell members of one start from strangers.

    Returns:
        The path written.

    Raises:
        OutputExistsError: ``out`` exists (checked before training) and ``force`` is False.
        UnknownNameError: unknown model or dataset name.
        InvalidArgumentError: a label outside the model's class range, or augmentations that do not fit
            the data.
        DeviceUnavailableError: ``device`` is not on this machine.

    Example:
        >>> train_member(Recipe(seed=0), model="small_cnn", data="digits", out="m0.safetensors")  # doctest: +SKIP
    """
    out = Path(out)
    check_output_free(out, force=force)
    dev = resolve_device(device)
    splits = resolve_splits(data, limit=limit, split_seed=split_seed, val_fraction=val_fraction)
    spec = resolve_spec(model, splits)
    check_recipe_fits(recipe, splits)
    shared = init_seed is not None and init_seed != recipe.seed
    net = build_member(spec, dataclasses.replace(recipe, seed=init_seed) if shared else recipe, pretrained, dev)
    if init is not None:
        load_init(net, init)
    start = member_start(net, init=init, init_seed=recipe.seed if init_seed is None else init_seed,
                      kind=start_kind or default_start_kind(spec, pretrained, init, init_seed))
    if shared:
        torch.manual_seed(recipe.seed)  # dropout and other draws in training follow the member's own seed
    loader = train_loader(splits, spec, recipe)
    state = fit([net], [loader], [recipe], num_classes=spec["num_classes"], device=dev, callbacks=callbacks,
                progress=progress, desc=desc or out.stem)
    scores = evaluate_model(net, splits, spec, device=dev, batch_size=eval_batch_size)
    record = train_record(recipe, state, method="independent", pretrained=pretrained, device=dev,
                           extra={"init": None if init is None else str(init), START_FIELD: start})
    return save_member(net, out, spec, splits, record, scores, force=force)


def train_population(recipes: Sequence[Recipe], *, model: str | Mapping[str, Any], data: str | Splits,
                     out_dir: str | os.PathLike, callbacks: Sequence[Callback] = (), method: str = "population",
                     pretrained: str | None = None, device: str | torch.device = "cpu", progress: bool = True,
                     limit: int | None = None, split_seed: int = 0, val_fraction: float = 0.1,
                     eval_batch_size: int = 256, force: bool = False, indices: Sequence[int] | None = None,
                     population: int | None = None) -> list[Path]:
    """Train ``len(recipes)`` members together, in lockstep, and write each (PAPA trains this way).

    Args:
        recipes: one per member.
        callbacks: the population hooks, e.g. ``[PAPA(every=10, alpha=0.99)]``.
        method: the name recorded in each member's ``papa_merge.train``.
        indices: the members' indices in the population (default ``0 .. len(recipes) - 1``); a process
            of a distributed population trains its own block of members (``member-NN`` keeps the index).
        population: members in the whole population (default ``len(recipes)``), recorded in each member.
        Others as in :func:`train_member`.

    Returns:
        The members' paths, ``member-00.safetensors`` ... in ``out_dir``. A population is trained as a
        whole: when every member is on disk with the same recipes it is not retrained.

    Raises:
        OutputExistsError: some members exist but not all (a partial population cannot be resumed).
        As :func:`train_member` otherwise.
    """
    if not recipes:
        raise InvalidArgumentError("a population needs at least one recipe")
    out_dir = Path(out_dir)
    indices = list(range(len(recipes))) if indices is None else [int(i) for i in indices]
    if len(indices) != len(recipes):
        raise InvalidArgumentError(f"got {len(indices)} member indices for {len(recipes)} recipes")
    arch = model if isinstance(model, str) else str(model.get("arch", ""))
    paths = [member_path(out_dir, i, arch=arch) for i in indices]
    existing = [p for p in paths if p.exists()]
    if existing and not force:
        if len(existing) == len(paths):
            for p, r in zip(paths, recipes):
                check_resumable(p, r, method)
            return paths
        raise OutputExistsError(f"{out_dir}: holds {len(existing)} of the population's {len(paths)} members; a "
                                "population trains as a whole, so remove them or pass force=True")
    dev = resolve_device(device)
    splits = resolve_splits(data, limit=limit, split_seed=split_seed, val_fraction=val_fraction)
    spec = resolve_spec(model, splits)
    epochs = {r.epochs for r in recipes}
    batch = {r.batch_size for r in recipes}
    if len(epochs) > 1 or len(batch) > 1:
        raise InvalidArgumentError(f"members of a population step in lockstep and need one epochs and batch_size; "
                                   f"got epochs {sorted(epochs)}, batch_size {sorted(batch)}")
    nets, loaders = [], []
    for r in recipes:
        check_recipe_fits(r, splits)
        nets.append(build_member(spec, r, pretrained, dev))
        loaders.append(train_loader(splits, spec, r))
    # Members trained together count as one start (their method keeps them averageable): the fingerprint of
    # all their initial weights. A process of a distributed population sees only its block, so it records none.
    whole = population in (None, len(recipes))
    start = {START_FIELD: population_start([n.state_dict() for n in nets], seed=recipes[0].seed)} if whole else {}
    state = fit(nets, loaders, list(recipes), num_classes=spec["num_classes"], device=dev, callbacks=callbacks,
                progress=progress, desc=f"{method} x{len(recipes)}")
    written = []
    for i, net, r, p in zip(indices, nets, recipes, paths):
        scores = evaluate_model(net, splits, spec, device=dev, batch_size=eval_batch_size)
        record = train_record(r, state, method=method, pretrained=pretrained, device=dev,
                               extra={"member": i, "population": population or len(recipes), **start})
        written.append(save_member(net, p, spec, splits, record, scores,
                                        force=force))
    return written
