"""PAPA: population parameter averaging (Jolicoeur-Martineau et al., 2023), as a training callback.

Every ``every`` optimizer steps each member is pulled toward the population's average,
``w_i <- alpha * w_i + (1 - alpha) * mean_j(w_j)``, so members trained with different data orders and
regularisations stay close enough to average well. The paper uses ``every=10`` with ``alpha=0.99``
from scratch and ``alpha=0.9995`` when fine-tuning, and averages floating buffers (BatchNorm running
statistics) too; integer buffers (``num_batches_tracked``) are counters and stay as they are.
"""

from __future__ import annotations

import torch

from merge.errors import InvalidArgumentError
from merge.train.loop import Callback, TrainState

__all__ = ["PAPA", "pull_to_average"]


@torch.no_grad()
def pull_to_average(models: list[torch.nn.Module], alpha: float, *, buffers: bool = True) -> None:
    """``w_i <- alpha * w_i + (1 - alpha) * mean(w)`` for every floating parameter (and buffer) of every member.

    The mean is accumulated in float32 whatever the parameters' dtype; ``alpha=0`` replaces every
    member by the average (PAPA-all).
    """
    if not 0.0 <= alpha <= 1.0:
        raise InvalidArgumentError(f"PAPA alpha must be in [0, 1], got {alpha}")
    tensors = [dict(m.named_parameters()) for m in models]
    if buffers:
        for t, m in zip(tensors, models):
            t.update(dict(m.named_buffers()))
    for name, first in tensors[0].items():
        if not first.is_floating_point():
            continue
        mean = torch.stack([t[name].detach().float() for t in tensors]).mean(0)
        for t in tensors:
            w = t[name]
            w.copy_((alpha * w.float() + (1.0 - alpha) * mean).to(w.dtype))


class PAPA(Callback):
    """Pull every member toward the population average every ``every`` steps.

    Args:
        every: optimizer steps between pulls (the paper's k = 10).
        alpha: how much of each member is kept (0.99 from scratch, 0.9995 fine-tuning).
        buffers: average floating buffers (BatchNorm statistics) too, as the paper does.

    Example:
        >>> from merge.train import train_population, diverse_recipes
        >>> train_population(diverse_recipes(4, diversity="augment"), model="small_cnn", data="digits",
        ...                  out_dir="papa/", callbacks=[PAPA(every=10, alpha=0.99)])  # doctest: +SKIP
    """

    def __init__(self, *, every: int = 10, alpha: float = 0.99, buffers: bool = True):
        if every < 1:
            raise InvalidArgumentError(f"PAPA every must be >= 1 step, got {every}")
        if not 0.0 <= alpha <= 1.0:
            raise InvalidArgumentError(f"PAPA alpha must be in [0, 1], got {alpha}")
        self.every, self.alpha, self.buffers = every, alpha, buffers
        self.pulls = 0

    def on_train_begin(self, state: TrainState) -> None:
        self.pulls = 0

    def on_step_end(self, state: TrainState) -> None:
        if len(state.models) > 1 and state.step % self.every == 0:
            pull_to_average(state.models, self.alpha, buffers=self.buffers)
            self.pulls += 1

    def on_train_end(self, state: TrainState) -> None:
        state.log["papa"] = {"every": self.every, "alpha": self.alpha, "buffers": self.buffers, "pulls": self.pulls}
