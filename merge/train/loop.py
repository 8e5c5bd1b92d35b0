"""The fine-tune loop: a population of members stepping in lockstep, with a small callback surface.

One member is a population of one. Each optimizer step, every member takes the next batch of its own
loader (its own data order and augmentations), mixes it (mixup/CutMix), and takes one step on its own
loss; then the callbacks see the whole population. The population methods are small additions:

- PAPA (Jolicoeur-Martineau et al., 2023): ``on_step_end`` pulls every member toward the average
  every k steps (:class:`merge.train.papa.PAPA`);
- StarSSE and SSE (Sadrtdinov et al., 2023): cycles started from a fine-tuned centre, each a fresh
  ``fit`` (a fresh optimizer) with a cosine from a peak learning rate (:mod:`merge.train.starsse`);
- late-phase weights (von Oswald et al., 2021): the member is a :class:`merge.train.late_phase.LatePhaseNet`
  with K copies of its BatchNorm layers and head, ``on_step_begin`` picks the copy of this minibatch, and
  a :class:`~merge.train.late_phase.LatePhaseOptimizer` passed as ``optimizers`` steps each copy and the
  shared weights (once per cycle);
- subspaces (Wortsman et al., 2021): a line or simplex of networks as the member, and ``on_loss`` adding
  the cos^2 penalty (:mod:`merge.train.subspace`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from merge.errors import InvalidArgumentError
from merge.models.loaders import forward_logits, to_device
from merge.train.recipe import Recipe

__all__ = ["TrainState", "Callback", "fit", "make_optimizer", "make_scheduler", "mix_batch", "soft_cross_entropy"]


@dataclass
class TrainState:
    """What callbacks see: the population, its optimizers, and where training is.

    Attributes:
        models, optimizers, schedulers, recipes, loaders: one per member, aligned.
        device: where the members train.
        epochs: planned epochs; ``steps_per_epoch`` and ``total_steps`` follow from the loaders.
        step: optimizer steps taken by each member so far (1 after the first step).
        epoch: the current epoch (0-based; ``on_epoch_end`` sees the epoch that just finished).
        batch: this step's ``(inputs, labels)`` of each member (on ``device``), before mixing.
        losses: this step's training loss of each member.
        stop: set True in a callback to end training after the current step.
        log: free-form per-run notes callbacks may add to (recorded by the trainer).
    """

    models: list[nn.Module]
    optimizers: list[torch.optim.Optimizer]
    schedulers: list[Any]
    recipes: list[Recipe]
    loaders: list[DataLoader]
    device: torch.device
    epochs: float
    steps_per_epoch: int
    total_steps: int
    step: int = 0
    epoch: int = 0
    batch: list[tuple[Any, Tensor]] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    stop: bool = False
    log: dict[str, Any] = field(default_factory=dict)

    @property
    def model(self) -> nn.Module:
        """The first (for a single run, the only) member."""
        return self.models[0]

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.optimizers[0]

    def __len__(self) -> int:
        return len(self.models)


class Callback:
    """Hooks around the step; override the ones a method needs. All default to doing nothing.

    The order within one optimizer step is ``on_step_begin`` -> for each member (forward, ``on_loss``,
    backward, optimizer step) -> ``on_step_end``.
    """

    def on_train_begin(self, state: TrainState) -> None:
        """Before the first step (e.g. load a starting checkpoint, make K copies of some weights)."""

    def on_step_begin(self, state: TrainState) -> None:
        """Before this step's batches are used (e.g. pick the late-phase copy for this minibatch)."""

    def on_loss(self, state: TrainState, index: int, loss: Tensor) -> Tensor:
        """Member ``index``'s loss before backward; return it, or it plus a penalty (subspaces' cos^2)."""
        return loss

    def on_step_end(self, state: TrainState) -> None:
        """After every member took this optimizer step (PAPA pulls members to their average here)."""

    def on_epoch_end(self, state: TrainState) -> None:
        """After each full pass over the data (PAPA-all averages every few epochs here)."""

    def on_train_end(self, state: TrainState) -> None:
        """After the last step (e.g. collapse late-phase copies, set members to the final average)."""


def make_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    """SGD (momentum, Nesterov) or AdamW; weight decay on weights only, not on biases and norm scales."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=recipe.lr, momentum=recipe.momentum, nesterov=recipe.momentum > 0)
    return torch.optim.AdamW(groups, lr=recipe.lr)


def make_scheduler(optimizer: torch.optim.Optimizer, recipe: Recipe, *, steps_per_epoch: int,
                   total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup to ``recipe.lr`` over ``warmup_epochs``, then cosine to zero or constant, per step.

    A high peak with a warmup and cosine decay is also StarSSE's cyclic schedule for one branch.
    """
    warmup = int(round(recipe.warmup_epochs * steps_per_epoch))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if recipe.schedule == "constant":
            return 1.0
        t = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def soft_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Mean cross-entropy against a distribution per example (mixed and/or smoothed labels)."""
    return -(target * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()


def mix_batch(x: Any, y: Tensor, *, num_classes: int, recipe: Recipe,
              rng: np.random.Generator) -> tuple[Any, Tensor]:
    """Label smoothing, then mixup or CutMix of the batch with itself in a random order.

    Mixup (Zhang et al., 2018) blends two images and their labels with lam ~ Beta(a, a); CutMix (Yun et
    al., 2019) pastes a box of area 1 - lam from the other image, and lam is corrected to the pasted
    area. Text inputs (dicts of token ids) are never mixed.

    Returns:
        ``(inputs, target)`` with ``target`` a ``[B, C]`` distribution per example.
    """
    eps = recipe.label_smoothing
    target = F.one_hot(y, num_classes).float() * (1.0 - eps) + eps / num_classes
    if not isinstance(x, Tensor) or (recipe.mixup <= 0 and recipe.cutmix <= 0) or x.shape[0] < 2:
        return x, target
    use_cutmix = recipe.cutmix > 0 and (recipe.mixup <= 0 or rng.random() < 0.5)
    alpha = recipe.cutmix if use_cutmix else recipe.mixup
    lam = float(rng.beta(alpha, alpha))
    perm = torch.from_numpy(rng.permutation(x.shape[0])).to(x.device)
    if use_cutmix:
        h, w = x.shape[-2:]
        ch, cw = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
        cy, cx = int(rng.integers(h)), int(rng.integers(w))
        t, b = max(cy - ch // 2, 0), min(cy + ch // 2, h)
        left, r = max(cx - cw // 2, 0), min(cx + cw // 2, w)
        x = x.clone()
        x[:, :, t:b, left:r] = x[perm][:, :, t:b, left:r]
        lam = 1.0 - (b - t) * (r - left) / (h * w)
    else:
        x = lam * x + (1.0 - lam) * x[perm]
    return x, lam * target + (1.0 - lam) * target[perm]


def fit(models: Sequence[nn.Module], loaders: Sequence[DataLoader], recipes: Sequence[Recipe], *,
        num_classes: int, device: torch.device | str = "cpu", callbacks: Sequence[Callback] = (),
        optimizers: Sequence[torch.optim.Optimizer] | None = None, progress: bool = False,
        desc: str = "train") -> TrainState:
    """Train a population of models in lockstep (one model is a population of one).

    Args:
        models: the members, already on ``device``.
        loaders: one training loader per member (its own order and augmentations); all must yield
            the same number of batches per epoch (same data and batch size).
        recipes: one per member: optimizer, schedule, regularisation, epochs (all members share the
            first recipe's ``epochs``: lockstep).
        num_classes: classes of the labels (for label smoothing and mixing).
        device: where the batches go.
        callbacks: hooks around the step (:class:`Callback`).
        optimizers: to continue with existing optimizers (default: fresh ones from the recipes).
        progress: a tqdm bar over steps with the mean loss.
        desc: the bar's label.

    Returns:
        The final :class:`TrainState`.

    Raises:
        InvalidArgumentError: mismatched list lengths, or loaders of different lengths.
    """
    n = len(models)
    if n == 0 or len(loaders) != n or len(recipes) != n:
        raise InvalidArgumentError(f"need one loader and one recipe per model; got {n} models, {len(loaders)} "
                                   f"loaders, {len(recipes)} recipes")
    lengths = {len(dl) for dl in loaders}
    if len(lengths) != 1 or 0 in lengths:
        raise InvalidArgumentError(f"members' loaders must yield the same non-zero number of batches per epoch "
                                   f"to step in lockstep; got {sorted(lengths)}")
    device = torch.device(device)
    steps_per_epoch = lengths.pop()
    epochs = recipes[0].epochs
    total_steps = max(1, int(round(epochs * steps_per_epoch)))
    # 1. One optimizer and schedule per member, each from its own recipe.
    opts = list(optimizers) if optimizers is not None else [make_optimizer(m, r) for m, r in zip(models, recipes)]
    scheds = [make_scheduler(o, r, steps_per_epoch=steps_per_epoch, total_steps=total_steps)
              for o, r in zip(opts, recipes)]
    rngs = [np.random.default_rng([r.seed, 11]) for r in recipes]  # mixup/CutMix draws, per member
    state = TrainState(list(models), opts, scheds, list(recipes), list(loaders), device, epochs, steps_per_epoch,
                       total_steps)
    for m in models:
        m.train()
    for cb in callbacks:
        cb.on_train_begin(state)
    bar = tqdm(total=total_steps, desc=desc, disable=not progress, dynamic_ncols=True, leave=False)
    started = time.perf_counter()
    try:
        while state.step < total_steps and not state.stop:
            iters = [iter(dl) for dl in loaders]
            for _ in range(steps_per_epoch):
                # 2. Every member draws its next batch (its own order and augmentations).
                state.batch = [(to_device(x, device), y.to(device)) for x, y in (next(it) for it in iters)]
                for cb in callbacks:
                    cb.on_step_begin(state)
                state.losses = []
                for i, (model, opt, sched, recipe) in enumerate(zip(models, opts, scheds, recipes)):
                    # 3. Mix (mixup/CutMix, label smoothing), forward, loss, callbacks' penalties.
                    x, y = state.batch[i]
                    x, target = mix_batch(x, y, num_classes=num_classes, recipe=recipe, rng=rngs[i])
                    loss = soft_cross_entropy(forward_logits(model, x), target)
                    for cb in callbacks:
                        loss = cb.on_loss(state, i, loss)
                    # 4. One optimizer step on this member alone.
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    if recipe.grad_clip > 0:
                        nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
                    opt.step()
                    sched.step()
                    state.losses.append(float(loss.detach()))
                state.step += 1
                # 5. The population hooks: PAPA's pull toward the average happens here.
                for cb in callbacks:
                    cb.on_step_end(state)
                bar.update(1)
                bar.set_postfix(loss=f"{sum(state.losses) / n:.4f}", refresh=False)
                if state.step >= total_steps or state.stop:
                    break
            # 6. End of a pass over the data.
            for cb in callbacks:
                cb.on_epoch_end(state)
            state.epoch += 1
    finally:
        bar.close()
    for cb in callbacks:
        cb.on_train_end(state)
    state.log["seconds"] = time.perf_counter() - started
    return state
