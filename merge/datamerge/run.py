"""``merge_with_data``: run the members on data one at a time, then stream the merge through the engine.

The one entry point of the merges that use data (``papa-merge soup --method regmean|fisher|adamerging``
calls it too):

1. each member's model and data are resolved as ``papa-merge eval`` resolves them, before any work
   (:func:`merge.datamerge.members.resolve_members`), and the method's parameters are checked;
2. RegMean and Fisher: one member at a time, its model is run on its batches (input Gram matrices of
   its linear layers, or its diagonal Fisher), and the result written to a temporary safetensors
   file, so only one member's model is in memory; AdaMerging: the coefficients are learned with the
   base and the task vectors in memory (:mod:`merge.datamerge.adamerging`);
3. the merge is streamed by :func:`merge.soup`, one tensor at a time: RegMean and Fisher on the
   ``tensor`` path with each member's temporary file as its auxiliary source, AdaMerging as a linear
   combination with its learned coefficients per tensor. The output is a plain checkpoint; its recipe
   records the data the members ran on (and AdaMerging's coefficients).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from merge.datamerge.adamerging import Task, learn_coefficients
from merge.datamerge.hooks import fisher_diagonal, input_grams, regmean_layers
from merge.datamerge.members import DEFAULT_BATCHES, MemberData, resolve_members
from merge.errors import InvalidArgumentError
from merge.io.atomic import check_output_free
from merge.io.dtypes import is_float
from merge.io.sources import open_checkpoint
from merge.io.writer import write_state_dict
from merge.ops import get_operator, resolve_params
from merge.soups import MergeResult, output_kind, soup

__all__ = ["DATA_METHODS", "merge_with_data", "needs_data"]

# The merges that run the members on data, and the split each runs them on.
DATA_METHODS: dict[str, str] = {"regmean": "train", "fisher": "train", "adamerging": "val"}


def needs_data(method: str) -> bool:
    """Whether ``method`` (a registered operator name or alias) runs the members' model on data."""
    return get_operator(method).name in DATA_METHODS


def merge_with_data(members: Sequence[str | os.PathLike], *, out: str | os.PathLike, method: str,
                    base: str | os.PathLike | None = None, data: Any = None,
                    model: str | Mapping[str, Any] | None = None, num_classes: int | None = None,
                    in_chans: int | None = None, image_size: int | None = None, batches: int = DEFAULT_BATCHES,
                    batch_size: int = 256, params: Mapping[str, object] | None = None,
                    weights: Sequence[float] | None = None, device: str | torch.device = "cpu", force: bool = False,
                    key: str | None = None, progress: bool = False, **soup_options: Any) -> MergeResult:
    """Merge checkpoints with a method that runs their model on data: ``regmean``, ``fisher`` or ``adamerging``.

    Args:
        members: checkpoint paths of one architecture (a multi-task pool may differ in its heads: each
            member is run with its own model on its own data).
        out: the output, as :func:`merge.soup` takes it.
        method: ``regmean``, ``fisher`` or ``adamerging``.
        base: the pretrained model the members were fine-tuned from (``adamerging`` needs it).
        data: a dataset name for members that record none (as ``papa-merge eval --data``).
        model, num_classes, in_chans, image_size: the architecture of members that record none.
        batches: batches each member is run on (RegMean, Fisher: training batches; AdaMerging: unlabeled
            validation batches, one per task per step).
        batch_size: examples per batch.
        params: the method's parameters (``alpha``; ``fisher_floor``; ``steps``, ``lr``, ``granularity``).
        weights: per-member weights (RegMean scales each member's Gram matrix, Fisher each member's Fisher).
        device: where the models run and the merge is reduced.
        force, key, progress: as :func:`merge.soup`; ``soup_options`` are its other options.

    Returns:
        The :class:`merge.soups.MergeResult`; its recipe records ``data`` (split, batches, batch size,
        datasets) and, for AdaMerging, ``adamerging`` (the learned coefficients and the entropy before and after).

    Raises:
        InvalidArgumentError: a method that needs no data, bad parameters, a missing base.
        MissingMetadataError: a member records no data and ``data`` is None (``option="data"``), or no
            architecture and ``model`` is None (``option="model"``).
        UnknownNameError, MismatchError: a member's model cannot be built, or its weights do not fit it.
        OutputExistsError: ``out`` exists and not ``force``.

    Example:
        >>> merge_with_data(["ft-a.safetensors", "ft-b.safetensors"], out="regmean.safetensors",
        ...                 method="regmean", batches=8)  # doctest: +SKIP
        >>> merge_with_data(["ft-a/", "ft-b/"], base="base/", out="ada/", method="adamerging")  # doctest: +SKIP
    """
    op = get_operator(method)
    if op.name not in DATA_METHODS:
        raise InvalidArgumentError(f"method {method!r} merges without data; call merge.soup", option="method",
                                   choices=tuple(DATA_METHODS))
    paths = [_path_of(m, i) for i, m in enumerate(members)]
    given = {**(params or {}), **({"weight": list(weights)} if weights is not None else {})}
    resolved = resolve_params(op, len(paths), given)  # 1. every parameter checked before any model is built
    if op.base == "required" and base is None:
        raise InvalidArgumentError(f"method {op.name!r} needs a base model (the checkpoint the members were "
                                   "fine-tuned from): its task vectors are member - base", option="base")
    if op.base == "none" and base is not None:
        raise InvalidArgumentError(f"method {op.name!r} takes no base model: it merges the members themselves",
                                   option="base")
    output_kind(out)
    check_output_free(Path(out), force=force)
    md = resolve_members(paths, purpose=f"method {op.name!r}", data=data, model=model, num_classes=num_classes,
                         in_chans=in_chans, image_size=image_size, num_batches=batches, batch_size=batch_size,
                         device=device)
    split = DATA_METHODS[op.name]
    options = dict(soup_options, out=out, method=op.name, params=params, weights=weights, device=device, force=force,
                   key=key, progress=progress)
    extra = {**(options.pop("recipe_extra", None) or {}), "data": md.record(split)}
    if op.name == "adamerging":
        return _adamerging(paths, base, md, resolved.shared, options, extra)
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=".papa-datamerge-", dir=_tmp_dir(out))))
        aux = _collect(paths, md, op.name, tmp, key)  # 2. one member at a time
        sources = [stack.enter_context(open_checkpoint(a)) for a in aux]
        # 3. streamed, one tensor at a time, each member's Gram matrices or Fisher beside its tensors
        return soup(paths, aux=sources, recipe_extra=extra, **options)


def _path_of(member: object, i: int) -> str:
    if not isinstance(member, (str, os.PathLike)):
        raise InvalidArgumentError(f"member {i} is a {type(member).__name__}: a merge that uses data rebuilds each "
                                   "member's model from its checkpoint's metadata, so give checkpoint paths",
                                   member=i)
    return os.fspath(member)


def _tmp_dir(out: str | os.PathLike) -> str | None:
    """The output's folder (same disk as the output, which has room for it), else the system's temporary folder."""
    parent = Path(out).resolve().parent
    return str(parent) if parent.is_dir() and os.access(parent, os.W_OK) else None


def _collect(paths: Sequence[str], md: MemberData, method: str, tmp: Path, key: str | None) -> list[Path]:
    """Each member's Gram matrices (RegMean) or Fisher, run one member at a time, written to ``tmp`` as the engine
    reads auxiliary tensors: ``NAME:gram`` (an ``[out, in]`` weight), ``NAME:gram_in_out`` (transformers'
    ``Conv1D``, stored ``[in, out]``), ``NAME:fisher``."""
    files: list[Path] = []
    for i, p in enumerate(paths):
        ev = md.evaluators[i]
        with open_checkpoint(p, key=key) as src:
            model = ev.model_with(src.state_dict())
        batches = md.batches(i, DATA_METHODS[method])
        if method == "regmean":
            grams, _rows = input_grams(model, batches, device=ev.device)
            in_out = {f"{m}.weight" if m else "weight" for m, t in regmean_layers(model).items() if t}
            tensors = {f"{k}:{'gram_in_out' if k in in_out else 'gram'}": g for k, g in grams.items()}
        else:
            fisher, _n = fisher_diagonal(model, batches, device=ev.device)
            tensors = {f"{k}:fisher": f for k, f in fisher.items()}
        files.append(write_state_dict(tensors, tmp / f"member-{i:03d}.safetensors"))
        del tensors, model
    return files


def _adamerging(paths: Sequence[str], base: str | os.PathLike, md: MemberData, shared: Mapping[str, object],
                options: dict[str, Any], extra: dict[str, object]) -> MergeResult:
    """Learn the coefficients with the base and the members in memory, then stream the merge with them."""
    key = options.get("key")
    with open_checkpoint(base, key=key) as src:
        base_sd = src.state_dict()
    sds = []
    for p in paths:
        with open_checkpoint(p, key=key) as src:
            sds.append(src.state_dict())
    # Layers: the floating tensors every member shares with the base, shape for shape (a task's own head is not).
    names = [k for k, t in base_sd.items() if is_float(t.dtype)
             and all(k in sd and sd[k].shape == t.shape for sd in sds)]
    tasks = []
    for group in md.groups():
        ev = md.evaluators[group[0]]
        ev.model_with(sds[group[0]])  # the group's own tensors (its head); the merged ones replace the rest
        tasks.append(Task(ev.model, md.batches(group[0], "val"), ev.device))
    coeffs = learn_coefficients({k: base_sd[k] for k in names}, [{k: sd[k] for k in names} for sd in sds], tasks,
                                layer_wise=shared["granularity"] == "layer", steps=int(shared["steps"]),
                                lr=float(shared["lr"]), prior=float(shared["prior"]), device=tasks[0].device)
    del sds, base_sd, tasks
    values = coeffs.values

    def resolve(name: str) -> tuple[dict, list[dict] | None]:
        if name not in values:
            return {}, None
        return {}, [{"coefficient": c} for c in values[name]]

    extra = {**extra, "adamerging": coeffs.record()}
    return soup(list(paths), base=base, resolve=resolve, recipe_extra=extra, **options)
