"""Train members and write each as a safetensors checkpoint that records how to rebuild and evaluate it.

Members of ``small_cnn`` are one file, ``member-NN.safetensors``; members of ``hf:`` and ``timm:`` models
are folders, ``member-NN/``, holding ``model.safetensors`` and the files their library needs to load
them (``config.json`` with the trained head, the tokenizer: :mod:`merge.models.export`).

Each member's ``__metadata__`` (of ``model.safetensors`` in a folder) holds four JSON entries (``json.dumps(..., sort_keys=True)``):

- ``papa_merge.model``: the model spec (:func:`merge.models.model_spec`);
- ``papa_merge.data``: the data spec (:attr:`merge.data.Splits.spec`), which reloads the same splits;
- ``papa_merge.train``: the recipe, plus the method, steps, epochs, pretrained weights, time, and the
  ``start`` the member was trained from (kind and sha256: :mod:`merge.lineage`);
- ``papa_merge.metrics``: ``{"val": {"acc", "nll", "ece"}, "test": {...}}``.

Soups keep the first two (a soup is rebuilt and evaluated like a member) and drop the last two.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from merge.data import Splits, check_labels, load_dataset
from merge.engine import resolve_device
from merge.errors import InvalidArgumentError, MismatchError, OutputExistsError
from merge.io.sources import open_checkpoint, read_safetensors_metadata
from merge.io.writer import check_output_free, write_state_dict
from merge.lineage import START_FIELD, population_start, start_of, start_record, state_dict_sha256
from merge.models import DATA_KEY, METRICS_KEY, MODEL_KEY, TRAIN_KEY, build_model, make_loader, model_spec
from merge.train.loop import Callback, TrainState, fit
from merge.train.methods import TrainJob, TrainResult, register_method, run_method
from merge.train.recipe import Recipe, default_recipe, diverse_recipes

__all__ = ["train_member", "train_members", "train_population", "train_independent", "evaluate_model",
           "member_path"]


def member_path(out_dir: str | os.PathLike, index: int, *, arch: str | None = None) -> Path:
    """Where member ``index`` of a run in ``out_dir`` is written.

    ``member-NN/`` (a folder transformers or timm loads, :mod:`merge.models.export`) for ``hf:`` and
    ``timm:`` models, ``member-NN.safetensors`` for ``small_cnn``; without ``arch``, the one on disk
    (else the file).
    """
    from merge.models.export import member_form

    folder = Path(out_dir) / f"member-{index:02d}"
    if arch is None:
        return folder if folder.is_dir() else folder.with_name(folder.name + ".safetensors")
    return folder if member_form(arch) == "folder" else folder.with_name(folder.name + ".safetensors")


def _resolve_splits(data: str | Splits, *, limit: int | None, split_seed: int, val_fraction: float) -> Splits:
    if isinstance(data, Splits):
        return data
    return load_dataset(data, seed=split_seed, val_fraction=val_fraction, limit=limit)


def _resolve_spec(model: str | Mapping[str, Any], splits: Splits) -> dict:
    """The model spec for ``splits``; a given spec is checked against the data's labels and kind."""
    if isinstance(model, str):
        if splits.kind == "image" and not model.startswith("hf:"):
            return model_spec(model, splits.num_classes, in_chans=splits.in_chans, image_size=splits.image_size)
        return model_spec(model, splits.num_classes)
    spec = dict(model)
    if "arch" not in spec or "num_classes" not in spec:
        raise InvalidArgumentError(f"a model spec needs 'arch' and 'num_classes'; got keys {sorted(spec)}")
    kwargs = dict(spec.get("kwargs") or {})
    extra = {k: spec[k] for k in ("in_chans", "image_size") if k in spec}
    spec = model_spec(spec["arch"], int(spec["num_classes"]), **extra, **kwargs)
    for name in ("train", "val", "test"):
        check_labels(getattr(splits, name).labels, spec["num_classes"],
                     where=f"{splits.spec.get('dataset')} {name} split vs model {spec['arch']} "
                           f"with num_classes={spec['num_classes']}")
    return spec


def train_loader(splits: Splits, spec: Mapping[str, Any], recipe: Recipe):  # noqa: ANN201 - a DataLoader
    """The shuffled training loader of one member: its batch size, data order and (images) augmentations."""
    return make_loader(splits.train, spec, batch_size=recipe.batch_size, shuffle=True, seed=recipe.data_seed,
                       augment=recipe.augment if splits.kind == "image" else None, drop_last=True)


def _check_recipe_fits(recipe: Recipe, splits: Splits) -> None:
    if splits.kind == "text":
        image_only = {k: getattr(recipe, k) for k in ("mixup", "cutmix", "random_erasing", "crop", "flip")
                      if getattr(recipe, k)}
        if image_only:
            raise InvalidArgumentError(f"{image_only} are image augmentations but {splits.spec.get('dataset')} is "
                                       "text; use label_smoothing, weight_decay or lr for diversity on text")


def _build(spec: dict, recipe: Recipe, pretrained: str | None, device: torch.device) -> nn.Module:
    # The seed fixes the initialisation (and a pretrained model's new head), so members are reproducible.
    torch.manual_seed(recipe.seed)
    kwargs = dict(spec.get("kwargs") or {})
    kwargs.pop("max_length", None)
    opts = {} if spec["arch"].startswith("hf:") else {"in_chans": spec["in_chans"], "image_size": spec["image_size"]}
    net = build_model(spec["arch"], num_classes=spec["num_classes"], pretrained=pretrained, **opts, **kwargs)
    return net.to(device)


def _load_init(net: nn.Module, init: str | os.PathLike) -> None:
    """Start from a checkpoint's weights (StarSSE branches start from one fine-tuned model)."""
    with open_checkpoint(init) as src:
        tensors = src.state_dict()
    expected = net.state_dict()
    missing = [k for k in expected if k not in tensors]
    wrong = [k for k in expected if k in tensors and tensors[k].shape != expected[k].shape]
    if missing or wrong:
        raise MismatchError(f"{init}: cannot start from it: {len(missing)} tensors missing (e.g. {missing[:3]}), "
                            f"{len(wrong)} of another shape (e.g. {wrong[:3]}); it is not this architecture")
    net.load_state_dict({k: tensors[k] for k in expected})


def evaluate_model(model: nn.Module, splits: Splits, spec: Mapping[str, Any], *, device: torch.device | str = "cpu",
                   batch_size: int = 256, which: Sequence[str] = ("val", "test")) -> dict[str, dict[str, float]]:
    """Accuracy, NLL and ECE (:func:`merge.evaluate.metrics`) of ``model`` on splits of ``splits``."""
    from merge.evaluate import metrics, predict

    out = {}
    for name in which:
        split = getattr(splits, name)
        if len(split) == 0:
            continue  # val_fraction=0: nothing held out
        logits, labels = predict(model, make_loader(split, spec, batch_size=batch_size), device=device)
        out[name] = metrics(logits, labels)
    return out


def _metadata(spec: dict, splits: Splits, train: dict, scores: dict) -> dict[str, str]:
    return {MODEL_KEY: json.dumps(spec, sort_keys=True), DATA_KEY: json.dumps(splits.spec, sort_keys=True),
            TRAIN_KEY: json.dumps(train, sort_keys=True), METRICS_KEY: json.dumps(scores, sort_keys=True)}


def _save_member(net: nn.Module, out: Path, spec: dict, splits: Splits, train: dict, scores: dict, *,
                 force: bool) -> Path:
    """Write a member: a ``.safetensors`` path is one file; any other path the folder its library loads."""
    from merge.models.export import write_member

    return write_member(net.state_dict(), out, spec=spec, metadata=_metadata(spec, splits, train, scores),
                        classes=splits.classes, data_spec=splits.spec, model=net, force=force)


def _train_record(recipe: Recipe, state: TrainState, *, method: str, pretrained: str | None, device: torch.device,
                  extra: Mapping[str, Any] | None = None) -> dict:
    record = {**recipe.to_dict(), "method": method, "steps": state.step, "steps_per_epoch": state.steps_per_epoch,
              "pretrained": pretrained, "device": device.type, "seconds": round(state.log.get("seconds", 0.0), 3)}
    for k, v in state.log.items():
        if k != "seconds":
            record[k] = v
    record.update(extra or {})
    return record


def _default_start_kind(spec: Mapping[str, Any], pretrained: str | None, init: object, init_seed: int | None) -> str:
    if init is not None:
        return "init"
    if init_seed is None:
        return "independent"
    return "pretrained" if pretrained or str(spec["arch"]).startswith("hf:") else "shared-init"


def _start_of(net: nn.Module, *, init: str | os.PathLike | None, init_seed: int, kind: str) -> dict:
    """The ``start`` record of a member: the sha256 of the weights it actually starts from."""
    extra: dict[str, Any] = {"seed": int(init_seed)}
    if init is not None:
        extra["path"] = str(init)
    return start_record(kind, state_dict_sha256(net.state_dict()), **extra)


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
    splits = _resolve_splits(data, limit=limit, split_seed=split_seed, val_fraction=val_fraction)
    spec = _resolve_spec(model, splits)
    _check_recipe_fits(recipe, splits)
    shared = init_seed is not None and init_seed != recipe.seed
    net = _build(spec, dataclasses.replace(recipe, seed=init_seed) if shared else recipe, pretrained, dev)
    if init is not None:
        _load_init(net, init)
    start = _start_of(net, init=init, init_seed=recipe.seed if init_seed is None else init_seed,
                      kind=start_kind or _default_start_kind(spec, pretrained, init, init_seed))
    if shared:
        torch.manual_seed(recipe.seed)  # dropout and other draws in training follow the member's own seed
    loader = train_loader(splits, spec, recipe)
    state = fit([net], [loader], [recipe], num_classes=spec["num_classes"], device=dev, callbacks=callbacks,
                progress=progress, desc=desc or out.stem)
    scores = evaluate_model(net, splits, spec, device=dev, batch_size=eval_batch_size)
    record = _train_record(recipe, state, method="independent", pretrained=pretrained, device=dev,
                           extra={"init": None if init is None else str(init), START_FIELD: start})
    return _save_member(net, out, spec, splits, record, scores, force=force)


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
                _check_resumable(p, r, method)
            return paths
        raise OutputExistsError(f"{out_dir}: holds {len(existing)} of the population's {len(paths)} members; a "
                                "population trains as a whole, so remove them or pass force=True")
    dev = resolve_device(device)
    splits = _resolve_splits(data, limit=limit, split_seed=split_seed, val_fraction=val_fraction)
    spec = _resolve_spec(model, splits)
    epochs = {r.epochs for r in recipes}
    batch = {r.batch_size for r in recipes}
    if len(epochs) > 1 or len(batch) > 1:
        raise InvalidArgumentError(f"members of a population step in lockstep and need one epochs and batch_size; "
                                   f"got epochs {sorted(epochs)}, batch_size {sorted(batch)}")
    nets, loaders = [], []
    for r in recipes:
        _check_recipe_fits(r, splits)
        nets.append(_build(spec, r, pretrained, dev))
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
        record = _train_record(r, state, method=method, pretrained=pretrained, device=dev,
                               extra={"member": i, "population": population or len(recipes), **start})
        written.append(_save_member(net, p, spec, splits, record, scores,
                                        force=force))
    return written


def _check_resumable(path: Path, recipe: Recipe, method: str, *, spec: dict | None = None,
                     data_spec: dict | None = None) -> None:
    """An existing member may stand in for a planned one only if it was trained the same way on the same data."""
    meta = read_safetensors_metadata(path)
    for key, want, what in ((MODEL_KEY, spec, "model"), (DATA_KEY, data_spec, "data")):
        if want is not None and key in meta and json.loads(meta[key]) != json.loads(json.dumps(want)):
            raise MismatchError(f"{path}: exists but was trained with another {what} ({meta[key]} vs "
                                f"{json.dumps(want, sort_keys=True)}); choose another output folder or delete the file", path=path)
    try:
        stored = json.loads(meta[TRAIN_KEY])
        old = Recipe.from_dict(stored)
    except (KeyError, ValueError, TypeError):
        raise MismatchError(f"{path}: exists but was not written by papa-merge train (no {TRAIN_KEY} metadata); "
                            "move it out of the output folder or choose another one", path=path) from None
    diff = {k: (v, getattr(recipe, k)) for k, v in old.to_dict().items() if getattr(recipe, k) != v}
    if stored.get("method", "independent") != method:
        diff["method"] = (stored.get("method"), method)
    if diff:
        shown = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in sorted(diff.items()))
        raise MismatchError(f"{path}: exists but was trained with another recipe ({shown}); resuming would mix "
                            "runs, so choose another output folder or delete the file", path=path)


def _job_recipes(job: TrainJob) -> list[Recipe]:
    """The members' recipes: the job's own, or ``members`` diverse ones around the model's default."""
    if job.recipes is not None:
        if len(job.recipes) != job.members:
            raise InvalidArgumentError(f"got {len(job.recipes)} recipes for {job.members} members")
        return list(job.recipes)
    base = job.base or default_recipe(job.arch, pretrained=job.pretrained is not None or job.arch.startswith("hf:"))
    return diverse_recipes(job.members, diversity=job.diversity, base=base, seed=job.seed)


def _job_splits(job: TrainJob) -> Splits:
    return _resolve_splits(job.data, limit=job.limit, split_seed=job.split_seed, val_fraction=job.val_fraction)


# From scratch, members share a warm start trained once for this share of their epochs. Networks trained
# onward from a short common run stay in one basin and average well (Frankle et al. 2020, linear mode
# connectivity); from different random initialisations their average is near chance.
WARM_START_FRACTION = 0.25


def _warm_start(job: TrainJob, spec: dict, splits: Splits, base: Recipe, epochs: float) -> Path:
    """Train (or reuse) the shared warm start: ``base`` for ``epochs`` from the init of ``job.seed``."""
    recipe = dataclasses.replace(base, seed=job.seed, data_seed=job.seed, epochs=float(epochs))
    path = member_path(Path(job.out_dir) / "start", 0, arch=spec["arch"])
    if path.exists() and not job.force:
        _check_resumable(path, recipe, "independent", spec=spec, data_spec=splits.spec)
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
                 options=("independent_init", "warm_start"))
def train_independent(job: TrainJob, *, independent_init: bool = False, warm_start: float | None = None) -> TrainResult:
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

    Returns:
        The members' paths; ``outputs["start"]`` is the warm start's when one was trained, and
        ``report["start"]`` the recorded start (kind and sha256).

    Raises:
        InvalidArgumentError: ``independent_init`` with ``init`` or ``warm_start``, or a negative ``warm_start``.
        MismatchError: a member on disk was trained with another recipe or from another start.
    """
    if independent_init and (job.init is not None or warm_start):
        raise InvalidArgumentError("independent_init starts every member from its own initialisation; it cannot "
                                   "be combined with init or warm_start (drop one)")
    if warm_start is not None and not warm_start >= 0:
        raise InvalidArgumentError(f"warm_start must be >= 0 epochs, got {warm_start}", option="warm_start")
    recipes = _job_recipes(job)
    resolve_device(job.device)
    splits = _job_splits(job)
    spec = _resolve_spec(job.model, splits)
    pretrained = job.pretrained is not None or str(spec["arch"]).startswith("hf:")
    init, kind, init_seed, outputs = job.init, None, None, {}
    if not independent_init:
        init_seed = job.seed
        if warm_start is None:
            warm_start = 0.0 if pretrained or job.init is not None else WARM_START_FRACTION * max(r.epochs for r in recipes)
        if warm_start > 0:
            base = job.base or (job.recipes[0] if job.recipes else default_recipe(job.arch, pretrained=pretrained))
            init = outputs["start"] = _warm_start(job, spec, splits, base, warm_start)
            kind = "warm-start"
    paths, expected = [], None
    for i, r in enumerate(recipes):
        p = member_path(job.out_dir, i, arch=spec["arch"])
        if p.exists() and not job.force:
            _check_resumable(p, r, "independent", spec=spec, data_spec=splits.spec)
            if init_seed is not None and expected is None:
                expected = _planned_start(spec, r, job, init, init_seed, kind)
            _check_same_start(p, expected)
        else:
            train_member(r, model=spec, data=splits, out=p, pretrained=job.pretrained, device=job.device,
                         progress=job.progress, callbacks=job.callbacks, eval_batch_size=job.eval_batch_size,
                         init=init, desc=f"member {i + 1}/{len(recipes)}", force=job.force, init_seed=init_seed,
                         start_kind=kind)
        paths.append(p)
    start = None if independent_init else start_of(read_safetensors_metadata(paths[0]))
    return TrainResult(paths, outputs, {"start": start} if start else {})


def _planned_start(spec: dict, recipe: Recipe, job: TrainJob, init: str | os.PathLike | None, init_seed: int,
                   kind: str | None) -> dict:
    """The start a member of this run would record (built on the CPU, not trained), to check members on disk."""
    net = _build(spec, dataclasses.replace(recipe, seed=init_seed), job.pretrained, torch.device("cpu"))
    if init is not None:
        _load_init(net, init)
    return _start_of(net, init=init, init_seed=init_seed, kind=kind or _default_start_kind(spec, job.pretrained, init,
                                                                                            init_seed))


def train_members(k: int, *, model: str | Mapping[str, Any], data: str | Splits, out_dir: str | os.PathLike,
                  diversity: str = "seed", recipes: Sequence[Recipe] | None = None, base: Recipe | None = None,
                  seed: int = 0, method: str = "independent", pretrained: str | None = None,
                  device: str | torch.device = "cpu", progress: bool = True, limit: int | None = None,
                  split_seed: int = 0, val_fraction: float = 0.1, eval_batch_size: int = 256,
                  callbacks: Sequence[Callback] = (), init: str | os.PathLike | None = None, force: bool = False,
                  eval_limit: int | None = None, **options: Any) -> list[Path]:
    """Train ``k`` diverse members into ``out_dir`` with a registered training method.

    A shortcut for :func:`merge.train.run_method` that returns the members' paths.

    Args:
        k: number of members.
        model: architecture name or model spec.
        data: dataset name or :class:`~merge.data.Splits`.
        out_dir: the folder of ``member-00.safetensors``, ``member-01.safetensors``, ...
        diversity: how members differ (:func:`merge.train.diverse_recipes`: ``seed``, ``order``,
            ``augment``, ``hparams``); ignored when ``recipes`` is given.
        recipes: explicit recipes, one per member.
        base: the recipe members start from (default :func:`merge.train.default_recipe` for the model).
        seed: member i's training seed is ``seed + i``.
        method: a training method (:func:`merge.train.list_methods`): ``independent`` (each member alone;
            resumable per member), ``papa`` (a population pulled toward its average), ...
        init: every member starts from this checkpoint.
        eval_limit: evaluate on at most this many val and test examples (a dataset name only; see
            :func:`merge.data.load_dataset`, which records it so later evaluations use the same rows).
        options: the method's own options (``every=10, alpha=0.99`` for ``papa``, ``independent_init=True``
            or ``warm_start=0.5`` for ``independent``, ...).
        Others as in :func:`train_member`.

    Returns:
        The ``k`` member paths, in order.

    Raises:
        MismatchError: a member on disk was trained with another recipe (resume would mix runs).
        UnknownNameError: unknown diversity, method, model or dataset.
        InvalidArgumentError: an option the method does not take.
        As :func:`train_member` otherwise.

    Example:
        >>> train_members(3, model="small_cnn", data="digits", out_dir="ckpts/")  # doctest: +SKIP
    """
    if eval_limit is not None:
        if isinstance(data, Splits):
            raise InvalidArgumentError("eval_limit applies to a dataset name; load the Splits with "
                                       "load_dataset(..., eval_limit=...) instead", option="data")
        data = load_dataset(data, seed=split_seed, val_fraction=val_fraction, limit=limit, eval_limit=eval_limit)
    job = TrainJob(model=model, data=data, out_dir=out_dir, members=k, diversity=diversity, base=base,
                   recipes=recipes, seed=seed, pretrained=pretrained, init=init, device=device, progress=progress,
                   limit=limit, split_seed=split_seed, val_fraction=val_fraction, eval_batch_size=eval_batch_size,
                   callbacks=tuple(callbacks), force=force)
    return run_method(method, job, **options).paths
