"""Checkpoint windows: average the last checkpoints of a training run, weighted by a named schedule.

A language-model run saves a checkpoint every few hundred steps. Averaging a window of the last ones in the
stable phase of training stands in for a learning-rate decay (PMA, arXiv 2505.12082; WSM, arXiv 2507.17634;
Megatron-LM's ``tools/checkpoint/weighted_merge.py``, used for Nemotron 3). This module orders the members by
training step, keeps the window, and turns a schedule name into one weight per member; :func:`window_soup`
hands them to the exact streaming soup (:func:`merge.soups.soup`, method ``weighted``).

Schedules (a registry of named functions, :data:`SCHEDULES`; members oldest first, ``i = 0 .. n-1``):

- ``uniform``: the simple moving average (PMA's SMA), ``w_i = 1/n``.
- ``ema:DECAY``: PMA's exponential moving average ``avg_k = DECAY * avg_(k-1) + (1 - DECAY) * theta_k``
  started at the oldest member, i.e. ``w_0 = DECAY^(n-1)``, ``w_i = (1 - DECAY) * DECAY^(n-1-i)``
  (PMA writes ``alpha = 1 - DECAY`` for the newest model's share).
- ``linear``, ``cosine``, ``minus-sqrt``: WSM's decay-emulating merges. A decay ``s(x)`` on ``[0, 1]``
  (``1 - x``; ``(1 + cos(pi x)) / 2``; ``1 - sqrt(x)``) is sampled at ``x_i = i/n`` and each checkpoint gets the
  drop of the decay over its interval: ``w_i = s(i/n) - s((i+1)/n)`` for ``0 < i < n-1``, ``w_(n-1) = s((n-1)/n)``
  and ``w_0 = 1 - sum of the others``, exactly as Megatron-LM's ``schedule_to_merge_coefficients`` (so ``linear``
  is the uniform average, WSM's Theorem: merging emulates the decay of the updates).

Example:
    >>> schedule_weights("linear", 4)
    [0.25, 0.25, 0.25, 0.25]
    >>> [round(w, 4) for w in schedule_weights("ema:0.5", 3)]
    [0.25, 0.25, 0.5]
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from merge.errors import InvalidArgumentError, MergeError, UnknownNameError
from merge.io import schemes
from merge.io.formats import FOLDER_CANDIDATES, PICKLE_SUFFIXES
from merge.keys import TRAIN_KEY

__all__ = ["Schedule", "SCHEDULES", "register_schedule", "parse_schedule", "schedule_weights", "checkpoint_step",
           "Window", "plan_window", "window_soup", "TRAINER_STATE_FILE"]

TRAINER_STATE_FILE = "trainer_state.json"  # what transformers' Trainer writes into each checkpoint-N folder
_PMA = "Tian et al., Model Merging in Pre-training of Large Language Models (PMA), arXiv 2505.12082"
_WSM = ("Tian et al., WSM: Decay-Free Learning Rate Schedule via Checkpoint Merging for LLM Pre-training, "
        "arXiv 2507.17634; discretised as Megatron-LM tools/checkpoint/weighted_merge.py "
        "(schedule_to_merge_coefficients)")


@dataclass(frozen=True)
class Schedule:
    """A named rule giving one weight per checkpoint of a window (oldest first).

    Attributes:
        name: the registry key (``ema`` is written ``ema:DECAY``).
        weights: ``weights(n, parameter) -> n weights summing to one``.
        formula: the rule in one line, as printed and recorded in the recipe.
        citation: where it comes from.
        parameter: the name of its one parameter (``decay`` for ``ema``), or None.
    """

    name: str
    weights: Callable[[int, float | None], list[float]]
    formula: str
    citation: str
    parameter: str | None = None


SCHEDULES: dict[str, Schedule] = {}


def register_schedule(schedule: Schedule) -> Schedule:
    """Add a schedule to :data:`SCHEDULES` (its name is then valid in :func:`window_soup` and ``--schedule``)."""
    SCHEDULES[schedule.name] = schedule
    return schedule


def _uniform(n: int, _: float | None) -> list[float]:
    return [1.0 / n] * n


def _ema(n: int, decay: float | None) -> list[float]:
    # PMA's recursion avg_k = decay * avg_(k-1) + (1 - decay) * theta_k, avg_1 = theta_1, unrolled.
    d = float(decay)  # type: ignore[arg-type]
    return [d ** (n - 1)] + [(1.0 - d) * d ** (n - 1 - i) for i in range(1, n)]


def _from_decay(s: Callable[[float], float]) -> Callable[[int, float | None], list[float]]:
    """Megatron-LM's ``schedule_to_merge_coefficients``: the drop of the decay ``s`` over each checkpoint's interval."""
    def weights(n: int, _: float | None) -> list[float]:
        if n <= 1:
            return [1.0] * n
        decay = [s(i / n) for i in range(n)]
        c = [0.0] * n
        c[-1] = decay[-1]
        for i in range(1, n - 1):
            c[i] = decay[i] - decay[i + 1]
        c[0] = 1.0 - sum(c)
        return c
    return weights


register_schedule(Schedule("uniform", _uniform, "w_i = 1/n (simple moving average, SMA)", _PMA))
register_schedule(Schedule("ema", _ema, "w_0 = d^(n-1), w_i = (1-d) d^(n-1-i) (exponential moving average, "
                           "avg_k = d avg_(k-1) + (1-d) theta_k)", _PMA, parameter="decay"))
register_schedule(Schedule("linear", _from_decay(lambda x: 1.0 - x),
                           "w_i = s(i/n) - s((i+1)/n), w_(n-1) = s((n-1)/n), w_0 = 1 - sum(rest); s(x) = 1 - x", _WSM))
register_schedule(Schedule("cosine", _from_decay(lambda x: 0.5 * (1.0 + math.cos(math.pi * x))),
                           "w_i = s(i/n) - s((i+1)/n), w_(n-1) = s((n-1)/n), w_0 = 1 - sum(rest); "
                           "s(x) = (1 + cos(pi x))/2", _WSM))
register_schedule(Schedule("minus-sqrt", _from_decay(lambda x: 1.0 - math.sqrt(x)),
                           "w_i = s(i/n) - s((i+1)/n), w_(n-1) = s((n-1)/n), w_0 = 1 - sum(rest); "
                           "s(x) = 1 - sqrt(x)", _WSM))


def parse_schedule(spec: str) -> tuple[Schedule, float | None]:
    """``"ema:0.9"`` -> (the ``ema`` schedule, 0.9); ``"cosine"`` -> (``cosine``, None).

    Raises:
        UnknownNameError: no such schedule (the message lists them).
        InvalidArgumentError: a parameter missing, extra, or out of range (``ema`` needs 0 <= DECAY < 1).
    """
    name, sep, arg = str(spec).strip().partition(":")
    name = name.strip().lower()
    if name not in SCHEDULES:
        raise UnknownNameError("schedule", name, [s if SCHEDULES[s].parameter is None else f"{s}:DECAY"
                                                  for s in SCHEDULES], option="schedule")
    sched = SCHEDULES[name]
    if sched.parameter is None:
        if sep:
            raise InvalidArgumentError(f"schedule {name!r} takes no parameter, got {spec!r}; write {name}",
                                       option="schedule")
        return sched, None
    try:
        value = float(arg)
    except ValueError:
        raise InvalidArgumentError(f"schedule {spec!r}: {name} needs its {sched.parameter} as a number, e.g. "
                                   f"{name}:0.9", option="schedule") from None
    if name == "ema" and not 0.0 <= value < 1.0:
        raise InvalidArgumentError(f"schedule {spec!r}: the EMA decay must lie in [0, 1), got {value}; e.g. ema:0.9",
                                   option="schedule")
    return sched, value


def schedule_weights(spec: str, n: int) -> list[float]:
    """The weights of ``n`` checkpoints (oldest first) under the schedule ``spec`` (``uniform``, ``ema:0.9``, ...).

    Raises:
        UnknownNameError, InvalidArgumentError: see :func:`parse_schedule`; ``n < 1``.
    """
    sched, value = parse_schedule(spec)
    if n < 1:
        raise InvalidArgumentError(f"a window needs at least one checkpoint, got {n}", option="window")
    return sched.weights(n, value)


# --- the training step of a member ---------------------------------------------------------------------------

_NUMBER = re.compile(r"\d+")


def _trainer_state_step(folder: Path) -> int | None:
    state = folder / TRAINER_STATE_FILE
    if not state.is_file():
        return None
    try:
        step = json.loads(state.read_text()).get("global_step")
    except (OSError, ValueError, AttributeError):
        return None
    return int(step) if isinstance(step, int) and not isinstance(step, bool) else None


def _metadata_step(path: Path) -> int | None:
    """The ``steps`` papa-merge's training records in ``papa_merge.train`` (safetensors members only)."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return None  # reading a pickle's metadata means loading it whole
    from merge.io.sources import read_safetensors_metadata

    try:
        train = json.loads(read_safetensors_metadata(path).get(TRAIN_KEY) or "{}")
    except (MergeError, ValueError):
        return None
    step = train.get("steps") if isinstance(train, dict) else None
    return int(step) if isinstance(step, int) and not isinstance(step, bool) else None


def _name_step(text: str) -> int | None:
    found = _NUMBER.findall(text)
    return int(found[-1]) if found else None


def checkpoint_step(member: str | os.PathLike) -> tuple[int, str]:
    """The training step of a checkpoint and where it was read: ``(500, "trainer_state.json")``.

    In order: ``trainer_state.json``'s ``global_step`` (a transformers ``Trainer`` checkpoint folder, or the
    folder of its ``model.safetensors``); the ``steps`` papa-merge's training records in its metadata; the last
    number in the name (``checkpoint-500``, ``iter_0000500``, ``step1000.safetensors``; for ``model.safetensors``
    the folder's name). ``hf://`` members are ordered by the number in the reference.

    Raises:
        InvalidArgumentError: none of them gives a step (the message names the member).
    """
    text = os.fspath(member)
    if text.startswith(schemes.HF_PREFIX):
        step = _name_step(text[len(schemes.HF_PREFIX):].split("/", 1)[-1])
        if step is None:
            raise InvalidArgumentError(f"{text}: no training step in the reference; name a revision or path with "
                                       "the step (hf://org/run@step-1000) or list the members in order with "
                                       "weights", path=text, option="schedule")
        return step, "name"
    path = Path(text)
    folder = path if path.is_dir() else (path.parent if path.name in FOLDER_CANDIDATES else None)
    if folder is not None:
        step = _trainer_state_step(folder)
        if step is not None:
            return step, TRAINER_STATE_FILE
    if path.exists():
        step = _metadata_step(path)
        if step is not None:
            return step, "metadata"
    name = path.name if path.name not in FOLDER_CANDIDATES else path.parent.name
    for suffix in (".safetensors", *PICKLE_SUFFIXES):
        name = name.removesuffix(suffix)
    step = _name_step(name)
    if step is None:
        raise InvalidArgumentError(f"{text}: cannot tell its training step (no {TRAINER_STATE_FILE}, no papa-merge "
                                   "training record, no number in its name); rename it with its step "
                                   "(checkpoint-500) or give the members in order with weights",
                                   path=text, option="schedule")
    return step, "name"


# --- the window -----------------------------------------------------------------------------------------------

@dataclass
class Window:
    """The members a window keeps, oldest first, with their steps and weights.

    Attributes:
        members: the kept members, oldest first (as given).
        steps: their training steps; ``step_sources`` where each step was read.
        weights: one per kept member, summing to one.
        schedule: the schedule as given (``ema:0.9``); ``formula`` and ``citation`` from the registry.
        dropped: members outside the window (older), oldest first.
    """

    members: list[str | os.PathLike]
    steps: list[int]
    step_sources: list[str]
    weights: list[float]
    schedule: str
    formula: str
    citation: str
    window: int | None = None
    window_steps: int | None = None
    dropped: list[str | os.PathLike] = field(default_factory=list)

    def record(self) -> dict:
        """What the recipe records (``recipe["window"]``)."""
        rec: dict[str, object] = {"schedule": self.schedule, "formula": self.formula, "citation": self.citation,
                                  "steps": self.steps, "step_sources": self.step_sources, "weights": self.weights}
        if self.window is not None:
            rec["window"] = self.window
        if self.window_steps is not None:
            rec["window_steps"] = self.window_steps
        if self.dropped:
            rec["dropped"] = len(self.dropped)
        return rec


def plan_window(members: Sequence[str | os.PathLike], *, schedule: str = "uniform", window: int | None = None,
                window_steps: int | None = None) -> Window:
    """Order checkpoints by training step, keep the window, and weight it by ``schedule``; nothing is read but
    each member's step (see :func:`checkpoint_step`).

    Args:
        members: checkpoint paths (or ``hf://`` references), in any order.
        schedule: ``uniform``, ``ema:DECAY``, ``linear``, ``cosine`` or ``minus-sqrt`` (:data:`SCHEDULES`).
        window: keep the last ``window`` checkpoints (default: all).
        window_steps: keep the checkpoints whose step is at least the last step minus ``window_steps``
            (Megatron-LM's ``start_iteration <= iteration <= end_iteration``).

    Raises:
        InvalidArgumentError: no members, a member without a step, two members at the same step, a window < 1.
        UnknownNameError: an unknown schedule.
    """
    sched, value = parse_schedule(schedule)
    if not members:
        raise InvalidArgumentError("no members given; pass the checkpoints of the run", option="members")
    for opt, v in (("window", window), ("window_steps", window_steps)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < (1 if opt == "window" else 0)):
            raise InvalidArgumentError(f"{opt} must be a whole number {'>= 1' if opt == 'window' else '>= 0'}, "
                                       f"got {v!r}", option=opt)
    found = [(*checkpoint_step(m), i) for i, m in enumerate(members)]
    by_step: dict[int, int] = {}
    for step, _, i in found:
        if step in by_step:
            raise InvalidArgumentError(f"{os.fspath(members[by_step[step]])} and {os.fspath(members[i])} are both at "
                                       f"step {step}; a window holds one checkpoint per step, drop one",
                                       path=os.fspath(members[i]), option="members")
        by_step[step] = i
    order = sorted(found)
    keep = order
    if window_steps is not None:
        last = order[-1][0]
        keep = [o for o in keep if o[0] >= last - window_steps]
    if window is not None:
        keep = keep[-window:]
    kept_idx = {i for _, _, i in keep}
    weights = sched.weights(len(keep), value)
    return Window([members[i] for _, _, i in keep], [s for s, _, _ in keep], [src for _, src, _ in keep],
                  weights, str(schedule).strip(), sched.formula, sched.citation, window, window_steps,
                  [members[i] for _, _, i in order if i not in kept_idx])


def window_soup(members: Sequence[str | os.PathLike], *, out: str | os.PathLike, schedule: str = "uniform",
                window: int | None = None, window_steps: int | None = None,
                recipe_extra: Mapping[str, object] | None = None, **options: object):
    """Merge the window of a run's checkpoints, weighted by a schedule: :func:`plan_window`, then
    :func:`merge.soups.soup` with method ``weighted``.

    Args:
        members: the run's checkpoints (``run/checkpoint-*/``), in any order.
        out: as in :func:`merge.soups.soup`.
        schedule, window, window_steps: see :func:`plan_window`.
        recipe_extra: extra recipe fields; the recipe also records ``window`` (schedule, formula, citation,
            steps, weights).
        **options: any other :func:`merge.soups.soup` option (``dtype``, ``shard_size``, ``force``, ``verify``...).

    Returns:
        The soup's :class:`merge.soups.MergeResult` (its ``recipe["window"]`` holds the steps and weights).

    Raises:
        As :func:`plan_window` and :func:`merge.soups.soup`; passing ``weights`` or ``method`` too is refused.

    Example:
        >>> import glob, merge.windows
        >>> merge.windows.window_soup(glob.glob("run/checkpoint-*"), out="run/window-5", schedule="ema:0.9",
        ...                           window=5)  # doctest: +SKIP
    """
    for given in ("weights", "method"):
        if options.get(given) is not None:
            raise InvalidArgumentError(f"a window soup weighs its members by its schedule; drop {given}",
                                       option="schedule")
    options.pop("weights", None)
    options.pop("method", None)
    from merge.soups import soup

    win = plan_window(members, schedule=schedule, window=window, window_steps=window_steps)
    extra = {**(recipe_extra or {}), "window": win.record()}
    return soup(win.members, out=out, method="weighted", weights=win.weights, recipe_extra=extra,
                **options)  # type: ignore[arg-type]
