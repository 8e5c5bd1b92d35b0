"""Training callbacks that write a checkpoint-window merge beside each saved checkpoint, without stopping training.

- :class:`WindowMergeCallback` for the transformers ``Trainer``: on each save, the window of the run's
  ``checkpoint-*`` folders (:func:`merge.windows.plan_window`) is merged into ``OUTPUT_DIR/window-STEP`` and,
  if asked, pushed to the Hub (:func:`merge.hub.push`).
- :class:`WindowMergeLoopCallback` for papa-merge's own loop (:func:`merge.train.loop.fit`), which saves no
  checkpoints itself: every ``save_steps`` steps it saves the member as ``DIR/checkpoint-STEP/model.safetensors``
  (its step in papa-merge's training metadata), then merges the window the same way.

Training waits only for what must happen in its own thread: each member's safetensors header is read and its
file held open (so the Trainer deleting an old checkpoint, ``save_total_limit``, cannot pull it from under the
merge), then the merge runs in a background thread, written atomically (the output appears complete or not at
all). At most one merge runs at a time: a save that comes while the previous merge is still writing waits for
it. A merge that fails warns (:class:`WindowMergeWarning`) and training goes on; :meth:`wait` re-raises nothing.
The merge is :func:`merge.soups.soup` with the window's weights, as ``papa-merge soup --schedule`` writes it.

Example:
    >>> from transformers import Trainer
    >>> from merge.callbacks import WindowMergeCallback
    >>> trainer = Trainer(model, args, train_dataset=ds,
    ...                   callbacks=[WindowMergeCallback(schedule="ema:0.9", window=5)])  # doctest: +SKIP
"""

from __future__ import annotations

import os
import re
import shutil
import threading
import warnings
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path

from merge.errors import MergeError, MergeWarning
from merge.io.sources import open_checkpoint
from merge.keys import TRAIN_KEY
from merge.train.loop import Callback
from merge.windows import TRAINER_STATE_FILE, parse_schedule, plan_window

__all__ = ["WindowMerger", "WindowMergeCallback", "WindowMergeLoopCallback", "WindowMergeWarning",
           "trainer_checkpoints"]

_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")  # the folders transformers' Trainer writes


class WindowMergeWarning(MergeWarning):
    """A window merge during training failed; training went on without it."""


def trainer_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """The ``checkpoint-N`` folders of a Trainer run that hold a ``trainer_state.json`` (complete saves)."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and _CHECKPOINT_RE.match(p.name)
                   and (p / TRAINER_STATE_FILE).is_file()), key=lambda p: int(_CHECKPOINT_RE.match(p.name)[1]))


class WindowMerger:
    """Merges windows of checkpoints in a background thread, one at a time (the engine of both callbacks).

    Args:
        schedule, window, window_steps: as in :func:`merge.windows.plan_window`.
        push_to: a Hub repo id to push each merge to (:func:`merge.hub.push`), or None.
        push_options: extra :func:`merge.hub.push` arguments (``private``, ``revision``, ``endpoint``, ...).
        keep: how many of this run's window merges to keep on disk (older ones are removed once a newer one is
            complete); None keeps all.
        background: False merges in the caller's thread (for debugging).
        soup_options: extra :func:`merge.soups.soup` arguments (``dtype``, ``shard_size``, ``verify``...).
    """

    def __init__(self, *, schedule: str = "uniform", window: int | None = None, window_steps: int | None = None,
                 push_to: str | None = None, push_options: Mapping[str, object] | None = None,
                 keep: int | None = 1, background: bool = True, soup_options: Mapping[str, object] | None = None):
        parse_schedule(schedule)  # a bad schedule is refused before the first training step
        self.schedule, self.window, self.window_steps = schedule, window, window_steps
        self.push_to, self.push_options = push_to, dict(push_options or {})
        self.keep, self.background = keep, background
        self.soup_options = dict(soup_options or {})
        self.written: list[Path] = []  # merges written, oldest first
        self.results: list[object] = []  # their MergeResults
        self.pushed: list[object] = []  # their PushResults
        self.errors: list[BaseException] = []
        self._thread: threading.Thread | None = None

    def submit(self, checkpoints: Sequence[str | os.PathLike], out: str | os.PathLike) -> None:
        """Start merging the window of ``checkpoints`` into ``out`` (after the previous merge, if one runs)."""
        self.wait()
        stack = ExitStack()
        try:
            win = plan_window(list(checkpoints), schedule=self.schedule, window=self.window,
                              window_steps=self.window_steps)
            # Held open from here: a checkpoint the trainer deletes meanwhile is still read whole.
            sources = [stack.enter_context(open_checkpoint(m)) for m in win.members]
        except MergeError as e:
            stack.close()
            self._failed(out, e)
            return
        except BaseException:
            stack.close()
            raise
        job = (win, sources, Path(out), stack)
        if not self.background:
            self._run(*job)
            return
        self._thread = threading.Thread(target=self._run, args=job, name="papa-merge-window", daemon=False)
        self._thread.start()

    def _run(self, win, sources, out: Path, stack: ExitStack) -> None:
        from merge.soups import soup

        try:
            with stack:
                result = soup(sources, out=out, method="weighted", weights=win.weights,
                              recipe_extra={"window": win.record()}, **self.soup_options)
            self.written.append(Path(result.path))
            self.results.append(result)
            if self.push_to:
                from merge.hub import push

                self.pushed.append(push(result.path, self.push_to, **self.push_options))
            self._prune()
        except Exception as e:  # noqa: BLE001 - a failed merge must not end the training run
            self._failed(out, e)

    def _failed(self, out: str | os.PathLike, e: BaseException) -> None:
        self.errors.append(e)
        warnings.warn(WindowMergeWarning(f"the window merge into {out} failed ({type(e).__name__}: {e}); "
                                         "training goes on without it"), stacklevel=3)

    def _prune(self) -> None:
        if self.keep is None:
            return
        while len(self.written) > self.keep:
            old = self.written.pop(0)
            if old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)

    def wait(self) -> None:
        """Block until the running merge (if any) is written (and pushed)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None


try:  # the Trainer callback needs transformers; the loop callback does not
    from transformers import TrainerCallback as _TrainerCallback
except ImportError:  # pragma: no cover - transformers is a dependency of the train extra
    _TrainerCallback = object  # type: ignore[assignment,misc]


class WindowMergeCallback(_TrainerCallback):  # type: ignore[misc,valid-type]
    """A transformers ``TrainerCallback``: on each save, merge the window of the run's checkpoints into
    ``OUTPUT_DIR/NAME-STEP`` in the background (and push it if ``push_to``).

    Args:
        schedule: ``uniform``, ``ema:DECAY``, ``linear``, ``cosine``, ``minus-sqrt`` (:mod:`merge.windows`).
        window: the last N checkpoints (default: all of the run's); ``window_steps``: the last S steps.
        name: the output folder's name before ``-STEP`` (``window``: ``OUTPUT_DIR/window-500``), a sibling of
            ``checkpoint-500`` (never inside it: a merge may not sit inside one of its members).
        push_to, push_options, keep, background, soup_options: see :class:`WindowMerger`.

    Attributes:
        merger: the :class:`WindowMerger` (``merger.written``, ``merger.results``, ``merger.errors``).
    """

    def __init__(self, *, schedule: str = "uniform", window: int | None = None, window_steps: int | None = None,
                 name: str = "window", push_to: str | None = None, push_options: Mapping[str, object] | None = None,
                 keep: int | None = 1, background: bool = True, soup_options: Mapping[str, object] | None = None):
        self.name = name
        self.merger = WindowMerger(schedule=schedule, window=window, window_steps=window_steps, push_to=push_to,
                                   push_options=push_options, keep=keep, background=background,
                                   soup_options=soup_options)

    def on_step_end(self, args, state, control, **kwargs):  # transformers' signature
        if control.should_save:  # the Trainer saves next, then deletes checkpoints past save_total_limit: the
            self.merger.wait()   # previous merge, which reads them, finishes first
        return control

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return control
        checkpoints = trainer_checkpoints(args.output_dir)
        if checkpoints:
            self.merger.submit(checkpoints, Path(args.output_dir) / f"{self.name}-{state.global_step}")
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self.merger.wait()  # train() returns with the last merge on disk
        return control


class WindowMergeLoopCallback(Callback):
    """For :func:`merge.train.loop.fit`: every ``save_steps`` steps save member ``member`` as
    ``folder/checkpoint-STEP/model.safetensors`` and merge the window of those saves into ``folder/NAME-STEP``.

    The checkpoints record their step in papa-merge's training metadata, so ``papa-merge soup
    folder/checkpoint-*/ --schedule ...`` orders them the same way.

    Args:
        folder: where the checkpoints and merges go.
        save_steps: save (and merge) every this many optimizer steps; the last step is always saved.
        member: which member of the population to save (0 for a single run).
        metadata: extra header entries of each saved checkpoint.
        Others as in :class:`WindowMergeCallback`.
    """

    def __init__(self, folder: str | os.PathLike, *, save_steps: int, schedule: str = "uniform",
                 window: int | None = None, window_steps: int | None = None, name: str = "window",
                 member: int = 0, metadata: Mapping[str, str] | None = None, push_to: str | None = None,
                 push_options: Mapping[str, object] | None = None, keep: int | None = 1, background: bool = True,
                 soup_options: Mapping[str, object] | None = None):
        from merge.errors import InvalidArgumentError

        if isinstance(save_steps, bool) or not isinstance(save_steps, int) or save_steps < 1:
            raise InvalidArgumentError(f"save_steps must be a whole number >= 1, got {save_steps!r}",
                                       option="save_steps")
        self.folder, self.save_steps, self.name, self.member = Path(folder), save_steps, name, member
        self.metadata = dict(metadata or {})
        self.merger = WindowMerger(schedule=schedule, window=window, window_steps=window_steps, push_to=push_to,
                                   push_options=push_options, keep=keep, background=background,
                                   soup_options=soup_options)
        self.saved: list[Path] = []

    def _save(self, state) -> None:
        import json

        from merge.io.writer import write_state_dict

        step = state.step
        path = self.folder / f"checkpoint-{step}" / "model.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {**self.metadata, TRAIN_KEY: json.dumps({"steps": step}, sort_keys=True)}
        write_state_dict(state.models[self.member].state_dict(), path, metadata=meta, force=True)
        self.saved.append(path)
        self.merger.submit(self.saved, self.folder / f"{self.name}-{step}")

    def on_step_end(self, state) -> None:
        if state.step % self.save_steps == 0:
            self._save(state)

    def on_train_end(self, state) -> None:
        if not self.saved or self.saved[-1].parent.name != f"checkpoint-{state.step}":
            self._save(state)  # the last step, if it fell between saves
        self.merger.wait()

