"""The kit every training method uses: resolve a job once, build, start, record, save and resume members.

A method's run reads, in order: :func:`prepare` (device, data splits, model spec and the members'
recipes, each resolved once and checked before any training), :func:`build_member` (the network of a
recipe, seeded), :func:`load_init` (a checkpoint to start from), the loop (:func:`merge.train.fit`),
:func:`evaluate_model`, :func:`train_record` and :func:`save_member` (the member and the metadata that
rebuilds and evaluates it). :func:`check_resumable` decides whether a member already on disk may stand in
for a planned one.

Members of ``small_cnn`` are one file, ``member-NN.safetensors``; members of ``hf:`` and ``timm:`` models
are folders, ``member-NN/``, holding ``model.safetensors`` and the files their library needs to load
them (``config.json`` with the trained head, the tokenizer: :mod:`merge.models.export`).

Each member's ``__metadata__`` (of ``model.safetensors`` in a folder) holds four JSON entries
(``json.dumps(..., sort_keys=True)``, keys in :mod:`merge.keys`):

- the model spec (:func:`merge.models.model_spec`);
- the data spec (:attr:`merge.data.Splits.spec`), which reloads the same splits;
- the training record: the recipe, plus the method, steps, epochs, pretrained weights, time, and the
  ``start`` the member was trained from (kind and sha256: :mod:`merge.lineage`);
- the metrics: ``{"val": {"acc", "nll", "ece"}, "test": {...}}``.

Soups keep the first two (a soup is rebuilt and evaluated like a member) and drop the last two.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from merge.data import Splits, check_labels, load_dataset
from merge.engine import resolve_device
from merge.errors import InvalidArgumentError, MismatchError
from merge.evaluate import metrics, predict
from merge.io.sources import open_checkpoint, read_safetensors_metadata
from merge.keys import DATA_KEY, METRICS_KEY, MODEL_KEY, TRAIN_KEY
from merge.lineage import start_record, state_dict_sha256
from merge.models import build_model, make_loader, model_spec
from merge.models.export import member_form, write_member
from merge.train.loop import TrainState
from merge.train.recipe import Recipe, default_recipe, diverse_recipes
from merge.train.registry import TrainJob

__all__ = ["Prepared", "prepare", "job_recipes", "resolve_splits", "resolve_spec", "member_path", "train_loader",
           "check_recipe_fits", "build_member", "load_init", "evaluate_model", "member_metadata", "save_member",
           "train_record", "default_start_kind", "member_start", "check_resumable"]


def member_path(out_dir: str | os.PathLike, index: int, *, arch: str | None = None) -> Path:
    """Where member ``index`` of a run in ``out_dir`` is written.

    ``member-NN/`` (a folder transformers or timm loads, :mod:`merge.models.export`) for ``hf:`` and
    ``timm:`` models, ``member-NN.safetensors`` for ``small_cnn``; without ``arch``, the one on disk
    (else the file).

    Example:
        >>> member_path("runs/a", 3, arch="small_cnn").as_posix()
        'runs/a/member-03.safetensors'
    """
    folder = Path(out_dir) / f"member-{index:02d}"
    if arch is None:
        return folder if folder.is_dir() else folder.with_name(folder.name + ".safetensors")
    return folder if member_form(arch) == "folder" else folder.with_name(folder.name + ".safetensors")


def resolve_splits(data: str | Splits, *, limit: int | None = None, split_seed: int = 0,
                   val_fraction: float = 0.1) -> Splits:
    """``data`` itself if loaded, else the dataset of that name (:func:`merge.data.load_dataset`)."""
    if isinstance(data, Splits):
        return data
    return load_dataset(data, seed=split_seed, val_fraction=val_fraction, limit=limit)


def resolve_spec(model: str | Mapping[str, Any], splits: Splits) -> dict:
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


def job_recipes(job: TrainJob) -> list[Recipe]:
    """The members' recipes: the job's own, or ``members`` diverse ones around the model's default."""
    if job.recipes is not None:
        if len(job.recipes) != job.members:
            raise InvalidArgumentError(f"got {len(job.recipes)} recipes for {job.members} members")
        return list(job.recipes)
    base = job.base or default_recipe(job.arch, pretrained=job.pretrained is not None or job.arch.startswith("hf:"))
    return diverse_recipes(job.members, diversity=job.diversity, base=base, seed=job.seed)


@dataclass(frozen=True)
class Prepared:
    """A job resolved once: what every method needs before it trains.

    Attributes:
        device: the device members train on (checked to exist).
        splits: the loaded train/val/test splits.
        spec: the model spec sized to the data.
        recipes: one per member (empty when the method derives its own).
    """

    device: torch.device
    splits: Splits
    spec: dict
    recipes: list[Recipe]


def prepare(job: TrainJob, *, recipes: bool = True, device: str | torch.device | None = None) -> Prepared:
    """Resolve ``job`` once: recipes (cheap checks first), then the device, the data and the model spec.

    Args:
        job: the job.
        recipes: resolve the members' recipes (:func:`job_recipes`); False for methods that derive them.
        device: the device to use instead of ``job.device`` (a distributed rank's own GPU).

    Raises:
        InvalidArgumentError: recipes that do not match the members, labels outside the model's classes.
        DeviceUnavailableError: the device is not on this machine (before the data is loaded).
        UnknownNameError: unknown dataset or model.
    """
    planned = job_recipes(job) if recipes else []
    dev = resolve_device(job.device if device is None else device)
    splits = resolve_splits(job.data, limit=job.limit, split_seed=job.split_seed, val_fraction=job.val_fraction)
    return Prepared(dev, splits, resolve_spec(job.model, splits), planned)


def train_loader(splits: Splits, spec: Mapping[str, Any], recipe: Recipe):  # a DataLoader
    """The shuffled training loader of one member: its batch size, data order and (images) augmentations."""
    return make_loader(splits.train, spec, batch_size=recipe.batch_size, shuffle=True, seed=recipe.data_seed,
                       augment=recipe.augment if splits.kind == "image" else None, drop_last=True)


def check_recipe_fits(recipe: Recipe, splits: Splits) -> None:
    """Refuse image augmentations on text data (naming them and what diversifies text instead)."""
    if splits.kind == "text":
        image_only = {k: getattr(recipe, k) for k in ("mixup", "cutmix", "random_erasing", "crop", "flip")
                      if getattr(recipe, k)}
        if image_only:
            raise InvalidArgumentError(f"{image_only} are image augmentations but {splits.spec.get('dataset')} is "
                                       "text; use label_smoothing, weight_decay or lr for diversity on text")


def build_member(spec: dict, recipe: Recipe, pretrained: str | None, device: torch.device) -> nn.Module:
    """The network of ``spec``, initialised from ``recipe.seed`` (a pretrained model: its new head), on ``device``."""
    # The seed fixes the initialisation (and a pretrained model's new head), so members are reproducible.
    torch.manual_seed(recipe.seed)
    kwargs = dict(spec.get("kwargs") or {})
    kwargs.pop("max_length", None)
    opts = {} if spec["arch"].startswith("hf:") else {"in_chans": spec["in_chans"], "image_size": spec["image_size"]}
    net = build_model(spec["arch"], num_classes=spec["num_classes"], pretrained=pretrained, **opts, **kwargs)
    return net.to(device)


def load_init(net: nn.Module, init: str | os.PathLike) -> None:
    """Start from a checkpoint's weights (StarSSE branches start from one fine-tuned model).

    Raises:
        MismatchError: the checkpoint is not this architecture (tensors missing or of another shape).
    """
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
    out = {}
    for name in which:
        split = getattr(splits, name)
        if len(split) == 0:
            continue  # val_fraction=0: nothing held out
        logits, labels = predict(model, make_loader(split, spec, batch_size=batch_size), device=device)
        out[name] = metrics(logits, labels)
    return out


def member_metadata(spec: dict, splits: Splits, train: dict, scores: dict) -> dict[str, str]:
    """The four metadata entries of a member (module doc), as the safetensors header stores them."""
    return {MODEL_KEY: json.dumps(spec, sort_keys=True), DATA_KEY: json.dumps(splits.spec, sort_keys=True),
            TRAIN_KEY: json.dumps(train, sort_keys=True), METRICS_KEY: json.dumps(scores, sort_keys=True)}


def save_member(net: nn.Module, out: Path, spec: dict, splits: Splits, train: dict, scores: dict, *,
                force: bool) -> Path:
    """Write a member: a ``.safetensors`` path is one file; any other path the folder its library loads."""
    return write_member(net.state_dict(), out, spec=spec, metadata=member_metadata(spec, splits, train, scores),
                        classes=splits.classes, data_spec=splits.spec, model=net, force=force)


def train_record(recipe: Recipe, state: TrainState, *, method: str, pretrained: str | None, device: torch.device,
                 extra: Mapping[str, Any] | None = None) -> dict:
    """A member's training record: its recipe, the method, steps, device and time, and the loop's log."""
    record = {**recipe.to_dict(), "method": method, "steps": state.step, "steps_per_epoch": state.steps_per_epoch,
              "pretrained": pretrained, "device": device.type, "seconds": round(state.log.get("seconds", 0.0), 3)}
    for k, v in state.log.items():
        if k != "seconds":
            record[k] = v
    record.update(extra or {})
    return record


def default_start_kind(spec: Mapping[str, Any], pretrained: str | None, init: object, init_seed: int | None) -> str:
    """How a member's start is recorded when the caller does not say (:func:`merge.lineage.start_record`)."""
    if init is not None:
        return "init"
    if init_seed is None:
        return "independent"
    return "pretrained" if pretrained or str(spec["arch"]).startswith("hf:") else "shared-init"


def member_start(net: nn.Module, *, init: str | os.PathLike | None, init_seed: int, kind: str) -> dict:
    """The ``start`` record of a member: the sha256 of the weights it actually starts from."""
    extra: dict[str, Any] = {"seed": int(init_seed)}
    if init is not None:
        extra["path"] = str(init)
    return start_record(kind, state_dict_sha256(net.state_dict()), **extra)


def check_resumable(path: Path, recipe: Recipe, method: str, *, spec: dict | None = None,
                    data_spec: dict | None = None) -> None:
    """An existing member may stand in for a planned one only if it was trained the same way on the same data.

    Raises:
        MismatchError: another model, data, recipe or method, or no training record at all.
    """
    meta = read_safetensors_metadata(path)
    for key, want, what in ((MODEL_KEY, spec, "model"), (DATA_KEY, data_spec, "data")):
        if want is not None and key in meta and json.loads(meta[key]) != json.loads(json.dumps(want)):
            raise MismatchError(f"{path}: exists but was trained with another {what} ({meta[key]} vs "
                                f"{json.dumps(want, sort_keys=True)}); choose another output folder or delete "
                                "the file", path=path)
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
