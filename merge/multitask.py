"""Multi-task merging: one pretrained backbone fine-tuned on several tasks, each member with its own head.

The setting of task arithmetic (Ilharco et al., 2023), TIES (Yadav et al., 2023) and the methods after
them, as FusionBench (Tang et al., 2024, ``tanganke/fusion_bench``) runs it on eight CLIP ViT-B/32
fine-tunes: the members' backbones are merged (their heads are not: each task keeps its own), and the
merged backbone is evaluated on each task's test split with that task's own head put back. Each method's
row gives the absolute accuracy per task and the normalised accuracy (merged / the task's own fine-tune,
per task, then averaged), with the time and peak memory of the merge.

A pool is a JSON file (:func:`read_pool`, format in ``docs/multitask.md``): the model, the pretrained base,
which tensors are heads, and one entry per member (its task, its checkpoint: a path or ``hf://org/name``,
and optionally its head in a file of its own and the jointly trained multi-task model's copy for the task).
:func:`build_pool` trains the offline pool A: a small CNN pretrained on MNIST, fine-tuned separately on
MNIST digits, MNIST parity, MNIST rotated 90 degrees, inverted MNIST and sklearn digits upsampled to
28x28 (:func:`load_task`), with the existing training loop (:func:`merge.train.fit`).
:func:`run_multitask` evaluates every method of a pool; a method that is not registered in
:mod:`merge.ops` gives a row that says so.

Example:
    >>> from merge.multitask import build_pool, run_multitask, format_multitask
    >>> pool = build_pool("pool-a/", seed=0)  # doctest: +SKIP
    >>> print(format_multitask(run_multitask(pool)))  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import json
import os
import re
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from merge.data import ImageArrayTable, SplitDataset, Splits, load_dataset
from merge.data.datasets import DATASETS
from merge.errors import (CheckpointFormatError, CheckpointNotFoundError, InvalidArgumentError, MismatchError,
                          UnknownNameError)
from merge.io import AtomicOutput, open_checkpoint, write_state_dict
from merge.io import schemes
from merge.models import build_model, load_weights, model_spec
from merge.keys import DATA_KEY, MODEL_KEY
from merge.ops import get_operator, list_operators
from merge.soups import soup
from merge.train import Recipe, evaluate_model, fit
from merge.train.kit import save_member, train_loader, train_record

__all__ = ["TASKS", "POOL_A", "METHODS", "MethodSpec", "Pool", "PoolMember", "MultitaskRow", "MultitaskResult",
           "list_tasks", "load_task", "read_pool", "write_pool", "build_pool", "run_multitask", "format_multitask",
           "POOL_FORMAT", "RESULT_FORMAT", "write_json"]

POOL_FORMAT = "papa-merge-pool/1"
TASK_PREFIX = "multitask:"
RESULT_FORMAT = "papa-merge-multitask/1"
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081

# --------------------------------------------------------------------------------------------------
# Tasks: MNIST and sklearn digits, and label- or input-transformed variants of them


TASKS = {
    "mnist": "MNIST digits, 10 classes",
    "mnist-parity": "MNIST digit parity (even, odd): the same images, another label",
    "mnist-rot90": "MNIST digits rotated by 90 degrees, 10 classes",
    "mnist-inverted": "MNIST digits with inverted intensities (white background), 10 classes",
    "digits-28": "sklearn's 8x8 digits upsampled to 28x28 (bilinear), 10 classes",
}
# Pool A: every built-in task; pretraining is on MNIST digits (other rows than the fine-tunes').
POOL_A = tuple(TASKS)


def list_tasks() -> list[str]:
    """The built-in task names :func:`load_task` accepts (any :func:`merge.data.load_dataset` name works too)."""
    return sorted(TASKS)


def _task_seed(name: str, seed: int) -> int:
    """A split seed of its own per task: tasks drawn from MNIST train on different rows."""
    return int(seed) * 1000 + (sorted(TASKS).index(name) if name in TASKS else 0)


def load_task(name: str, *, seed: int = 0, limit: int | None = None, eval_limit: int | None = None,
              val_fraction: float = 0.1) -> Splits:
    """The splits of a task: a built-in one (:data:`TASKS`) or any dataset :func:`merge.data.load_dataset` loads.

    A built-in task is also the dataset ``multitask:<name>`` once this module is imported, so members trained
    on it reload their split from their metadata as any member does (``papa-merge eval``, the merges that use
    data).

    Args:
        name: ``mnist``, ``mnist-parity``, ``mnist-rot90``, ``mnist-inverted``, ``digits-28``, or a dataset
            name (``imagefolder:<path>`` for a task of a pool trained elsewhere).
        seed: the split seed; built-in tasks each offset it, so they train on different rows.
        limit, eval_limit, val_fraction: as in :func:`merge.data.load_dataset`.

    Returns:
        :class:`merge.data.Splits` whose ``spec["dataset"]`` is ``multitask:<name>`` for a built-in task.

    Raises:
        UnknownNameError: neither a task nor a dataset (the message lists both).

    Example:
        >>> s = load_task("mnist-parity", limit=100, eval_limit=50)
        >>> s.num_classes, len(s.train), len(s.test)
        (2, 100, 50)
    """
    if name in TASKS:
        name = TASK_PREFIX + name
    try:
        return load_dataset(name, seed=seed, limit=limit, eval_limit=eval_limit, val_fraction=val_fraction)
    except UnknownNameError:
        raise UnknownNameError("task", name, list_tasks() + ["or a dataset: mnist, digits, imagefolder:<path>"]) \
            from None


def _load_builtin(name: str, seed: int, val_fraction: float, limit: int | None, image_size: int | None) -> Splits:
    """A built-in task's full splits (``load_dataset`` then keeps ``eval_limit`` rows of val and test)."""
    if image_size not in (None, 28):
        raise InvalidArgumentError(f"task {name} has 28x28 images; image_size={image_size} does not apply")
    source = "digits" if name == "digits-28" else "mnist"
    base = load_dataset(source, seed=_task_seed(name, seed), limit=limit, val_fraction=val_fraction)
    rows = [s.indices for s in (base.train, base.val, base.test)]
    table = base.train.table
    images = table.images[np.concatenate(rows)]
    labels = table.labels[np.concatenate(rows)]
    classes = list(base.classes)
    if name == "mnist-parity":
        labels, classes = labels % 2, ["even", "odd"]
    elif name == "mnist-rot90":
        images = torch.rot90(images, 1, dims=(2, 3))
    elif name == "mnist-inverted":
        images = 255 - images
    elif name == "digits-28":
        # Values stay on sklearn's 0..16 scale (rounded after the bilinear upsampling), so the table stays integer.
        up = torch.nn.functional.interpolate(images.float(), size=(28, 28), mode="bilinear", align_corners=False)
        images = up.round().clamp(0, 16).to(torch.uint8)
    n_train, n_val = len(rows[0]), len(rows[1])
    # Each task is normalised by its own training images' mean and std, as a dataset's preprocessing is.
    scaled = images[:n_train].float() / table.scale
    mean, std = float(scaled.mean()), float(scaled.std())
    new = ImageArrayTable(images.numpy(), labels, scale=table.scale, mean=[mean], std=[std])
    cut = np.cumsum([0, n_train, n_val, len(rows[2])])
    splits = [SplitDataset(new, np.arange(cut[i], cut[i + 1])) for i in range(3)]
    spec = {**base.spec, "dataset": TASK_PREFIX + name, "seed": int(seed), "num_classes": len(classes),
            "preprocessing": {"scale": table.scale, "mean": [mean], "std": [std], "image_size": 28, "in_chans": 1}}
    return Splits(*splits, num_classes=len(classes), kind="image", classes=classes, spec=spec)


# The built-in tasks as datasets (the pattern of merge.io's schemes: the upper layer registers into the lower's
# table), so a member's recorded split reloads wherever this module is imported.
for _name in TASKS:
    DATASETS.setdefault(TASK_PREFIX + _name, functools.partial(_load_builtin, _name))


# --------------------------------------------------------------------------------------------------
# Pools: the file format


@dataclass(frozen=True)
class PoolMember:
    """One fine-tune of a pool.

    Attributes:
        task: the task name (its data: :func:`load_task` of ``data`` or, when None, of ``task``).
        checkpoint: the member (a path or ``hf://org/name[@rev]``), backbone and (unless ``head``) head.
        head: a checkpoint holding only this member's head tensors (pools whose heads are kept apart,
            e.g. CLIP's zero-shot heads); None: the head is in ``checkpoint``.
        data: the dataset of the task, when it is not the task name itself.
        multitask: the jointly trained multi-task model's checkpoint for this task (its backbone and this
            task's head), for the upper-reference row; None: no such row.
    """

    task: str
    checkpoint: str
    head: str | None = None
    data: str | None = None
    multitask: str | None = None


@dataclass(frozen=True)
class Pool:
    """A multi-task pool (module doc): model, base, head tensors, data settings and members.

    Attributes:
        model: the model spec without its head size (``arch``, ``in_chans``, ``image_size``, ``kwargs``).
        base: the pretrained checkpoint every member was fine-tuned from.
        head: name prefixes of the head tensors (``head.`` for small_cnn, ``classifier.`` for BERT).
        members: one per task.
        seed, limit, eval_limit: how each task's splits are loaded (:func:`load_task`).
        path: the pool file (relative checkpoint paths are relative to its folder).
    """

    model: dict
    base: str
    head: tuple[str, ...]
    members: tuple[PoolMember, ...]
    seed: int = 0
    limit: int | None = None
    eval_limit: int | None = None
    path: Path | None = None

    def resolve(self, ref: str | None) -> str | None:
        """A checkpoint reference as opened: ``hf://`` as given, a relative path under the pool's folder."""
        if ref is None or ref.startswith(schemes.HF_PREFIX) or self.path is None or Path(ref).is_absolute():
            return ref
        return str(self.path.parent / ref)


def _field(raw: Mapping[str, Any], name: str, kind: type | tuple, where: str, *, required: bool = True) -> Any:
    if name not in raw:
        if required:
            raise InvalidArgumentError(f"{where}: needs a {name!r} entry; see docs/multitask.md for the pool format",
                                       option=name)
        return None
    value = raw[name]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise InvalidArgumentError(f"{where}: {name!r} is {value!r}; it should be a {getattr(kind, '__name__', kind)}",
                                   option=name)
    return value


def read_pool(path: str | os.PathLike) -> Pool:
    """Read a pool file (JSON, ``docs/multitask.md``).

    Raises:
        CheckpointFormatError: not JSON, or another format.
        InvalidArgumentError: a missing or ill-typed entry, fewer than 2 members, or a task listed twice.
    """
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"{path}: no such pool file", path=path) from None
    except ValueError as e:
        raise CheckpointFormatError(f"{path}: not a JSON pool file ({e})", path=path) from None
    if not isinstance(raw, dict) or raw.get("format") != POOL_FORMAT:
        raise CheckpointFormatError(f"{path}: not a pool file (its 'format' should be {POOL_FORMAT!r})", path=path)
    where = str(path)
    model = _field(raw, "model", (dict, str), where)
    model = {"arch": model} if isinstance(model, str) else dict(model)
    head = _field(raw, "head", (list, str), where)
    data = _field(raw, "data", dict, where, required=False) or {}
    members = []
    for i, m in enumerate(_field(raw, "members", list, where)):
        at = f"{where}: member {i}"
        if not isinstance(m, dict):
            raise InvalidArgumentError(f"{at}: should be an object with 'task' and 'checkpoint'", member=i)
        members.append(PoolMember(task=_field(m, "task", str, at), checkpoint=_field(m, "checkpoint", str, at),
                                  head=_field(m, "head", str, at, required=False),
                                  data=_field(m, "data", str, at, required=False),
                                  multitask=_field(m, "multitask", str, at, required=False)))
    tasks = [m.task for m in members]
    if len(members) < 2 or len(set(tasks)) != len(tasks):
        raise InvalidArgumentError(f"{where}: a pool needs at least 2 members, one per task; got tasks {tasks}",
                                   option="members")
    heads = tuple([head] if isinstance(head, str) else head)
    return Pool(model=model, base=_field(raw, "base", str, where), head=heads,
                members=tuple(members), seed=int(data.get("seed", 0)), limit=data.get("limit"),
                eval_limit=data.get("eval_limit"), path=path)


def _ours(fmt: str):
    """Recognises a JSON file of format ``fmt`` that papa-merge wrote (``force`` may replace it)."""
    def check(path: Path) -> bool:
        try:
            return json.loads(path.read_text()).get("format") == fmt
        except (OSError, ValueError, AttributeError):
            return False
    return check


def write_json(obj: Mapping[str, Any], path: str | os.PathLike, *, force: bool = False) -> Path:
    """Write ``obj`` (with its ``format`` entry) as JSON, atomically; ``force`` replaces a file of that format.

    Raises:
        OutputExistsError: ``path`` exists and ``force`` is False, or it is another kind of file.
    """
    path = Path(path)
    with AtomicOutput(path, folder=False, force=force, ours=_ours(str(obj.get("format")))) as atomic:
        atomic.file(path.name).write_text(json.dumps(obj, indent=2) + "\n")
        return atomic.commit()


def write_pool(pool: Pool, path: str | os.PathLike, *, force: bool = False) -> Path:
    """Write ``pool`` as a pool file (members' paths as given); returns the path."""
    members = [{k: v for k, v in asdict(m).items() if v is not None} for m in pool.members]
    raw = {"format": POOL_FORMAT, "model": pool.model, "base": pool.base, "head": list(pool.head),
           "data": {"seed": pool.seed, "limit": pool.limit, "eval_limit": pool.eval_limit}, "members": members}
    return write_json(raw, path, force=force)


# --------------------------------------------------------------------------------------------------
# Building pool A with the training loop


class _MultiHead(nn.Module):
    """One backbone, one head per task: logits over all tasks' classes, other tasks' columns masked.

    A masked column is -1e4, not -inf, so its zero target contributes exactly 0 to the cross-entropy.
    """

    def __init__(self, nets: Sequence[nn.Module]):
        super().__init__()
        self.heads = nn.ModuleList(n.head for n in nets)
        self.body = nets[0]
        self.body.head = nn.Identity()  # small_cnn and timm models: the network without its head gives features
        self.sizes = [h.out_features for h in self.heads]
        self.offsets = np.cumsum([0, *self.sizes]).tolist()

    def forward(self, x: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        feats = self.body(x)
        out = feats.new_full((x.shape[0], self.offsets[-1]), -1e4)
        for t, head in enumerate(self.heads):
            rows = task == t
            if rows.any():
                out[rows, self.offsets[t]:self.offsets[t + 1]] = head(feats[rows]).to(out.dtype)
        return out


class _AllTasks(Dataset):
    """The union of the tasks' training splits: ``({"x": image, "task": t}, offset_t + label)``."""

    def __init__(self, splits: Sequence[Splits], offsets: Sequence[int]):
        self.parts = [(t, s.train, offsets[t]) for t, s in enumerate(splits)]
        self.index = [(p, i) for p, (_, ds, _) in enumerate(self.parts) for i in range(len(ds))]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, k: int):
        p, i = self.index[k]
        t, ds, off = self.parts[p]
        x, y = ds[i]
        return {"x": x, "task": t}, off + y


def _recipe(seed: int, epochs: float, lr: float, batch_size: int, optimizer: str = "sgd") -> Recipe:
    return Recipe(seed=seed, data_seed=seed, lr=lr, epochs=epochs, batch_size=batch_size, weight_decay=0.0,
                  optimizer=optimizer)


def _build(spec: Mapping[str, Any], seed: int, device: torch.device) -> nn.Module:
    torch.manual_seed(seed)
    opts = {k: spec[k] for k in ("in_chans", "image_size") if spec.get(k) is not None}
    return build_model(spec["arch"], num_classes=spec["num_classes"], **opts, **(spec.get("kwargs") or {})).to(device)


def _train_part(net: nn.Module, head: Sequence[str], head_only: bool, s: Splits, spec: dict, recipe: Recipe,
                device: torch.device, progress: bool, desc: str):
    """Train only the head (``head_only``) or only the rest of ``net``."""
    for name, p in net.named_parameters():
        p.requires_grad_(name.startswith(tuple(head)) == head_only)
    try:
        return fit([net], [train_loader(s, spec, recipe)], [recipe], num_classes=s.num_classes, device=device,
                   progress=progress, desc=desc)
    finally:
        for p in net.parameters():
            p.requires_grad_(True)


def _backbone(tensors: Mapping[str, torch.Tensor], head: Sequence[str]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in tensors.items() if not k.startswith(tuple(head))}


def build_pool(out_dir: str | os.PathLike, *, tasks: Sequence[str] = POOL_A, pretrain: str = "mnist", seed: int = 0,
               limit: int = 2000, pretrain_limit: int = 10000, eval_limit: int | None = 1000, epochs: float = 4.0,
               lr: float = 0.03, pretrain_lr: float = 0.05, probe_epochs: float = 1.0, batch_size: int = 64,
               arch: str = "small_cnn", model_kwargs: Mapping[str, Any] | None = None, optimizer: str = "sgd",
               multitask: bool = True, device: str | torch.device = "cpu", force: bool = False,
               progress: bool = False) -> Pool:
    """Train the offline pool A and write its pool file, ``out_dir/pool.json``.

    1. Pretrain ``arch`` (a small CNN with BatchNorm by default; ``timm:<name>`` with ``model_kwargs``, e.g. a
       small ViT) on ``pretrain`` (``pretrain_limit`` rows drawn with another seed than
       the fine-tunes'); it is the base.
    2. Per task (``limit`` training rows each): fit a new head on the base's frozen features
       (``probe_epochs``, the pretraining learning rate), then fine-tune the backbone under that frozen head
       (``epochs``, ``lr``), as task arithmetic's fine-tunes keep CLIP's zero-shot head frozen (Ilharco et al.,
       2023).
    3. With ``multitask``, train one backbone on all tasks at once under the same frozen heads (batches drawn
       from the union of the tasks' rows, so each task's rows are seen as often as in its own fine-tune): the
       upper reference.

    Every run uses :func:`merge.train.fit`; members are written with their papa_merge metadata.

    Raises:
        InvalidArgumentError: fewer than 2 tasks, or a task listed twice.
        OutputExistsError: a member exists and ``force`` is False.
    """
    if len(tasks) < 2 or len(set(tasks)) != len(tasks):
        raise InvalidArgumentError(f"a pool needs at least 2 different tasks; got {list(tasks)}", option="tasks")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(device)
    splits = [load_task(t, seed=seed, limit=limit, eval_limit=eval_limit) for t in tasks]
    kwargs = dict(model_kwargs if model_kwargs is not None else ({"width": 16} if arch == "small_cnn" else {}))
    model = {"arch": arch, "in_chans": 1, "image_size": 28, "kwargs": kwargs}
    head = ("head.",)

    def spec_for(s: Splits) -> dict:
        return model_spec(arch, s.num_classes, in_chans=1, image_size=28, **kwargs)

    def recipe_for(seed: int, epochs: float, lr: float) -> Recipe:
        return _recipe(seed, epochs, lr, batch_size, optimizer)

    # 1. The base: pretrained on its own rows (seed offset by 500 from every task's).
    pre = load_task(pretrain, seed=seed + 500, limit=pretrain_limit, eval_limit=eval_limit)
    pre_spec, pre_recipe = spec_for(pre), recipe_for(seed, epochs, pretrain_lr)
    net = _build(pre_spec, seed, dev)
    state = fit([net], [train_loader(pre, pre_spec, pre_recipe)], [pre_recipe], num_classes=pre.num_classes,
                device=dev, progress=progress, desc=f"pretrain {pretrain}")
    base_path = save_member(net, out / "base.safetensors", pre_spec, pre,
                            train_record(pre_recipe, state, method="pretrain", pretrained=None, device=dev),
                            evaluate_model(net, pre, pre_spec, device=dev, which=("test",)), force=force)
    base_backbone = _backbone(net.state_dict(), head)
    # 2. Per task: the head fitted on the base's frozen features, then the backbone fine-tuned under it.
    members, heads = [], []
    for i, (task, s) in enumerate(zip(tasks, splits)):
        spec, recipe = spec_for(s), recipe_for(seed * 100 + i + 1, epochs, lr)
        net = _build(spec, recipe.seed, dev)
        net.load_state_dict({**net.state_dict(), **base_backbone})
        _train_part(net, head, True, s, spec, recipe_for(recipe.seed, probe_epochs, pretrain_lr), dev, progress,
                    f"head of {task}")
        heads.append({k: v.clone() for k, v in net.state_dict().items() if k.startswith(head)})
        state = _train_part(net, head, False, s, spec, recipe, dev, progress, f"fine-tune {task}")
        path = save_member(net, out / f"member-{task}.safetensors", spec, s,
                           train_record(recipe, state, method="finetune", pretrained=base_path.name, device=dev,
                                        extra={"head": "fitted on the base's features, then frozen"}),
                           evaluate_model(net, s, spec, device=dev, which=("test",)), force=force)
        members.append(PoolMember(task=task, checkpoint=path.name))
    if multitask:
        members = _train_multitask(out, tasks, splits, [spec_for(s) for s in splits], members, base_backbone, heads,
                                   recipe=recipe_for(seed * 100, epochs, lr), device=dev, force=force,
                                   progress=progress)
    pool = Pool(model=model, base=base_path.name, head=head, members=tuple(members), seed=seed, limit=limit,
                eval_limit=eval_limit, path=out / "pool.json")
    write_pool(pool, out / "pool.json", force=force)
    return pool


def _train_multitask(out: Path, tasks: Sequence[str], splits: Sequence[Splits], specs: Sequence[dict],
                     members: list[PoolMember], base_backbone: Mapping[str, torch.Tensor],
                     heads: Sequence[Mapping[str, torch.Tensor]], *, recipe: Recipe, device: torch.device,
                     force: bool, progress: bool) -> list[PoolMember]:
    """Step 3 of :func:`build_pool`: one backbone trained on all tasks under their frozen heads."""
    nets = []
    for i, spec in enumerate(specs):
        net = _build(spec, recipe.seed + i + 1, device)
        net.load_state_dict({**net.state_dict(), **base_backbone, **heads[i]})  # the fine-tunes' own heads
        nets.append(net)
    joint = _MultiHead(nets)
    for p in joint.heads.parameters():
        p.requires_grad_(False)
    data = _AllTasks(splits, joint.offsets)
    loader = DataLoader(data, batch_size=recipe.batch_size, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(recipe.data_seed))
    state = fit([joint], [loader], [recipe], num_classes=joint.offsets[-1], device=device,
                progress=progress, desc="multi-task training")
    result = []
    body = joint.body.state_dict()
    for i, (task, s, spec, m) in enumerate(zip(tasks, splits, specs, members)):
        net = _build(spec, 0, device)  # the joint model's backbone and this task's head
        net.load_state_dict({**body, **{f"head.{k}": v for k, v in joint.heads[i].state_dict().items()}})
        path = save_member(net, out / f"multitask-{task}.safetensors", spec, s,
                           train_record(recipe, state, method="multitask", pretrained="base.safetensors",
                                        device=device, extra={"tasks": list(tasks)}),
                           evaluate_model(net, s, spec, device=device, which=("test",)), force=force)
        result.append(PoolMember(task=m.task, checkpoint=m.checkpoint, head=m.head, data=m.data,
                                 multitask=path.name))
    return result


# --------------------------------------------------------------------------------------------------
# Running the methods


@dataclass(frozen=True)
class MethodSpec:
    """A row of the table: the operator it runs and the parameters it runs with."""

    label: str
    operator: str
    params: dict = field(default_factory=dict)


# The parameters follow FusionBench's CLIP ViT-B/32 configs where the operator has one (task arithmetic and
# DARE scaled by 0.3; TIES keeps the top 20% and takes the disjoint mean, lambda 1 as in the TIES paper);
# the newer operators run with their registered defaults (their papers' recommended values).
METHODS: tuple[MethodSpec, ...] = (
    MethodSpec("weight averaging", "uniform"),
    MethodSpec("task arithmetic", "task_arithmetic", {"lambda": 0.3}),
    MethodSpec("TIES", "ties", {"density": 0.2, "lambda": 1.0}),
    MethodSpec("DARE-TIES", "dare_ties", {"density": 0.5, "lambda": 0.3}),
    MethodSpec("TSV-M", "tsv"),
    MethodSpec("Iso-C", "iso_c"),
    MethodSpec("Iso-CTS", "iso_cts"),
    MethodSpec("RegMean", "regmean"),
    MethodSpec("Fisher", "fisher"),
    MethodSpec("AdaMerging", "adamerging"),
)


@dataclass
class MultitaskRow:
    """One row: a method's accuracy per task, normalised per task, their means, and the merge's cost.

    ``accuracy`` and ``normalized`` are fractions (0..1); ``seconds`` and ``peak_bytes`` are the merge's wall
    time and the growth of the process's peak resident memory during it (None for rows that merge nothing);
    ``note`` says why a row has no numbers (a method not registered) or what it ran with.
    """

    method: str
    accuracy: dict[str, float] = field(default_factory=dict)
    normalized: dict[str, float] = field(default_factory=dict)
    seconds: float | None = None
    peak_bytes: int | None = None
    note: str = ""

    @property
    def available(self) -> bool:
        return bool(self.accuracy)

    @property
    def mean_accuracy(self) -> float | None:
        return float(np.mean(list(self.accuracy.values()))) if self.accuracy else None

    @property
    def mean_normalized(self) -> float | None:
        return float(np.mean(list(self.normalized.values()))) if self.normalized else None


@dataclass
class MultitaskResult:
    """The rows of one pool's run, its tasks in order, and what ran it."""

    tasks: list[str]
    rows: list[MultitaskRow]
    pool: str
    device: str

    def to_dict(self) -> dict:
        return {"format": RESULT_FORMAT, "tasks": self.tasks, "pool": self.pool, "device": self.device,
                "rows": [asdict(r) for r in self.rows]}


def _rss(field_name: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    found = re.search(rf"^{field_name}:\s+(\d+) kB", text, re.M)
    return int(found.group(1)) * 1024 if found else None


def _reset_peak() -> int | None:
    """Reset the process's peak resident memory (Linux ``clear_refs`` 5) and return the current one."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    return _rss("VmRSS")


class _Evaluator:
    """Each task's model (the pool's architecture with the task's head size) and test split, loaded once."""

    def __init__(self, pool: Pool, heads: Mapping[str, Mapping[str, torch.Tensor]], device: torch.device,
                 batch_size: int):
        self.device, self.batch_size, self.heads = device, batch_size, heads
        self.splits, self.specs, self.nets = {}, {}, {}
        for m in pool.members:
            s = load_task(m.data or m.task, seed=pool.seed, limit=pool.limit, eval_limit=pool.eval_limit)
            extra = {k: pool.model[k] for k in ("in_chans", "image_size") if pool.model.get(k) is not None}
            spec = model_spec(pool.model["arch"], s.num_classes, **extra, **(pool.model.get("kwargs") or {}))
            self.splits[m.task], self.specs[m.task] = s, spec
            self.nets[m.task] = _build(spec, 0, device)

    def accuracy(self, task: str, backbone: Mapping[str, torch.Tensor]) -> float:
        net = self.nets[task]
        load_weights(net, {**backbone, **self.heads[task]}, what=f"the merged backbone with the {task} head")
        return float(evaluate_model(net, self.splits[task], self.specs[task], device=self.device,
                                    batch_size=self.batch_size, which=("test",))["test"]["acc"])


def _split_member(pool: Pool, m: PoolMember, i: int) -> tuple[dict, dict]:
    """A member's (backbone, head) tensors, the head from its own file when the pool keeps heads apart."""
    with open_checkpoint(pool.resolve(m.checkpoint)) as src:
        tensors = src.state_dict()
    if m.head is not None:
        with open_checkpoint(pool.resolve(m.head)) as src:
            head = src.state_dict()
        tensors = {**_backbone(tensors, pool.head), **head}
    head = {k: v for k, v in tensors.items() if k.startswith(pool.head)}
    if not head:
        raise MismatchError(f"member {i} ({m.task}, {m.checkpoint}) holds no tensor starting with {list(pool.head)}; "
                            "name the head's prefix in the pool's 'head' entry", member=i)
    return _backbone(tensors, pool.head), head


def run_multitask(pool: Pool | str | os.PathLike, *, methods: Sequence[MethodSpec | str] | None = None,
                  params: Mapping[str, Mapping[str, object]] | None = None, device: str | torch.device = "cpu",
                  batch_size: int = 256, work_dir: str | os.PathLike | None = None) -> MultitaskResult:
    """Evaluate a pool: individual fine-tunes, the multi-task model, and each merge method's merged backbone.

    Args:
        pool: a :class:`Pool` or a pool file.
        methods: rows to run (:class:`MethodSpec` or labels/operator names of :data:`METHODS`); default all.
            A method whose operator is not registered gives a row without numbers that says so.
        params: per operator name, parameters that replace the defaults (``{"ties": {"density": 0.5}}``).
        device: where the merges and evaluations run.
        batch_size: evaluation batch size.
        work_dir: where the backbone files and merges are written (default: a temporary folder, removed).

    Returns:
        :class:`MultitaskResult`: ``individual``, ``multi-task training`` and one row per method.

    Raises:
        UnknownNameError: a method that is not in :data:`METHODS`.
        MismatchError: a member without head tensors, or members whose backbones differ.
    """
    pool = read_pool(pool) if not isinstance(pool, Pool) else pool
    chosen = _choose(methods)
    dev = torch.device(device)
    if work_dir is None:
        with tempfile.TemporaryDirectory(prefix="papa-multitask-") as tmp:
            return _run(pool, chosen, params or {}, dev, batch_size, Path(tmp))
    Path(work_dir).mkdir(parents=True, exist_ok=True)
    return _run(pool, chosen, params or {}, dev, batch_size, Path(work_dir))


def _choose(methods: Sequence[MethodSpec | str] | None) -> list[MethodSpec]:
    if methods is None:
        return list(METHODS)
    by_name = {**{m.label: m for m in METHODS}, **{m.operator: m for m in METHODS}}
    chosen = []
    for m in methods:
        if isinstance(m, MethodSpec):
            chosen.append(m)
        elif m in by_name:
            chosen.append(by_name[m])
        else:
            raise UnknownNameError("multi-task method", str(m), [x.operator for x in METHODS])
    return chosen


def _run(pool: Pool, methods: list[MethodSpec], params: Mapping[str, Mapping[str, object]], dev: torch.device,
         batch_size: int, work: Path) -> MultitaskResult:
    tasks = [m.task for m in pool.members]
    parts = [_split_member(pool, m, i) for i, m in enumerate(pool.members)]
    heads = {t: head for t, (_, head) in zip(tasks, parts)}
    with open_checkpoint(pool.resolve(pool.base)) as src:
        base = _backbone(src.state_dict(), pool.head)
    evaluator = _Evaluator(pool, heads, dev, batch_size)
    # The merges read backbone-only files: a head's shape differs from task to task and never enters a merge.
    files = [write_state_dict(b, work / f"backbone-{i}.safetensors", force=True) for i, (b, _) in enumerate(parts)]
    base_file = write_state_dict(base, work / "backbone-base.safetensors", force=True)
    individual = {t: evaluator.accuracy(t, b) for t, (b, _) in zip(tasks, parts)}
    rows = [MultitaskRow("individual", dict(individual), {t: 1.0 for t in tasks}, note="each task's own fine-tune")]
    rows.append(_multitask_row(pool, evaluator, individual))
    registered = set(list_operators())
    full: list[Path] = []
    for spec in methods:
        if spec.operator not in registered:
            rows.append(MultitaskRow(spec.label, note=f"not available: no operator {spec.operator!r} is registered"))
            continue
        options = {**spec.params, **dict(params.get(spec.operator) or {})}
        out = work / f"merged-{spec.operator}.safetensors"
        data = _data_method(spec.operator)
        if data and not full:
            full = _full_members(parts, evaluator, tasks, work)
        before = _reset_peak()
        started = time.perf_counter()
        base_arg = str(base_file) if get_operator(spec.operator).base != "none" else None
        if data:
            # Each member runs with its own head on its own task's batches; the heads (of different shapes) are
            # skipped by the merge, and each task's own is put back for the evaluation.
            data(full, out=out, method=spec.operator, base=base_arg, params=options, device=dev, force=True,
                 on_mismatch="skip")
        else:
            soup([str(f) for f in files], out=out, method=spec.operator, base=base_arg, params=options, device=dev,
                 force=True)
        seconds = time.perf_counter() - started
        peak = _rss("VmHWM")
        with open_checkpoint(out) as src:
            merged = _backbone(src.state_dict(), pool.head)
        acc = {t: evaluator.accuracy(t, merged) for t in tasks}
        rows.append(MultitaskRow(spec.label, acc, {t: acc[t] / individual[t] for t in tasks}, seconds,
                                 None if before is None or peak is None else max(0, peak - before),
                                 note=", ".join(f"{k}={v}" for k, v in options.items())))
    return MultitaskResult(tasks, rows, pool=str(pool.path) if pool.path else "", device=dev.type)


def _data_method(operator: str):
    """``merge.datamerge.merge_with_data`` when ``operator`` runs the members on data, else None."""
    try:
        from merge.datamerge import merge_with_data, needs_data
    except ImportError:  # a tree without the merges that use data: their operators are not registered either
        return None
    return merge_with_data if needs_data(operator) else None


def _full_members(parts: Sequence[tuple[dict, dict]], evaluator: _Evaluator, tasks: Sequence[str],
                  work: Path) -> list[Path]:
    """Each member whole (backbone and head) with the model and data it is evaluated with as its metadata, so the
    merges that use data rebuild it and run it on its own task's split (a pool trained elsewhere records neither)."""
    files = []
    for i, (t, (body, head)) in enumerate(zip(tasks, parts)):
        meta = {MODEL_KEY: json.dumps(evaluator.specs[t], sort_keys=True),
                DATA_KEY: json.dumps(evaluator.splits[t].spec, sort_keys=True)}
        files.append(write_state_dict({**body, **head}, work / f"member-{i}.safetensors", metadata=meta, force=True))
    return files


def _multitask_row(pool: Pool, evaluator: _Evaluator, individual: Mapping[str, float]) -> MultitaskRow:
    missing = [m.task for m in pool.members if m.multitask is None]
    if missing:
        return MultitaskRow("multi-task training",
                            note=f"not available: the pool has no multi-task model for {missing}")
    acc = {}
    for m in pool.members:
        with open_checkpoint(pool.resolve(m.multitask)) as src:
            tensors = src.state_dict()
        acc[m.task] = _accuracy_whole(evaluator, m.task, tensors)
    return MultitaskRow("multi-task training", acc, {t: acc[t] / individual[t] for t in acc},
                        note="one model trained on all tasks (upper reference)")


def _accuracy_whole(evaluator: _Evaluator, task: str, tensors: Mapping[str, torch.Tensor]) -> float:
    """Accuracy of a whole model (its own backbone and head), through the evaluator's model for the task."""
    net = evaluator.nets[task]
    load_weights(net, tensors, what=f"the multi-task model for {task}")
    return float(evaluate_model(net, evaluator.splits[task], evaluator.specs[task], device=evaluator.device,
                                batch_size=evaluator.batch_size, which=("test",))["test"]["acc"])


def format_multitask(result: MultitaskResult) -> str:
    """The rows as a Markdown table: accuracy per task (%), mean accuracy, mean normalised accuracy, cost."""
    head = ["method", *result.tasks, "avg acc", "norm acc", "merge s", "peak MB", "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result.rows:
        if not r.available:
            cells = [r.method, *["-"] * len(result.tasks), "-", "-", "-", "-", r.note]
        else:
            cells = [r.method, *[f"{100 * r.accuracy[t]:.1f}" for t in result.tasks], f"{100 * r.mean_accuracy:.1f}",
                     f"{100 * r.mean_normalized:.1f}", "-" if r.seconds is None else f"{r.seconds:.2f}",
                     "-" if r.peak_bytes is None else f"{r.peak_bytes / 2**20:.1f}", r.note]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
