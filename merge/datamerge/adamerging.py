"""AdaMerging's coefficients, learned by entropy minimisation on unlabeled held-out batches.

Yang et al., ICLR 2024, AdaMerging: Adaptive Model Merging for Multi-Task Learning
(``EnnengYang/AdaMerging``, ``src/main_layer_wise_adamerging.py`` and ``main_task_wise_adamerging.py``).
The merged model is ``base + sum_i lambda_{i,l} (x_i - base)`` for every layer ``l`` (layer-wise: one
coefficient per member per tensor; task-wise: one per member), each coefficient clamped to ``[0, 1]``
in the forward pass and initialised at 0.3 as the reference; the coefficients minimise the summed mean
Shannon entropy of the merged model's predictions on each task's unlabeled batches, by Adam
(``lr=1e-3``, betas ``(0.9, 0.999)``, no weight decay) as the reference.

Deliberate differences from the reference (also listed in the operator's ``differences``):

- floating buffers (BatchNorm running statistics) are merged too, with the coefficients of their
  layer's weight (the reference merges ``named_parameters`` only and keeps the base's buffers: its CLIP
  encoders have none, and a base's statistics do not describe its fine-tunes); they carry no gradient;
- each step takes one batch per task, cycling over a fixed set of ``batches`` batches (the reference
  draws two fresh batches of 16 per task per step from a shuffled test loader), and the data is the
  members' held-out validation split, never their test split;
- the default is 100 steps, sized for a CPU (the reference runs 500 on a GPU).

The base and every task vector are held in memory while the coefficients are learned, as the
reference holds them (O(members x model)); the merge itself is then streamed from disk by the engine.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from merge.datamerge.hooks import functional_logits
from merge.errors import InvalidArgumentError
from merge.models import forward_logits, to_device

__all__ = ["PRIOR", "LR", "DEFAULT_STEPS", "Task", "Coefficients", "softmax_entropy", "learn_coefficients"]

PRIOR = 0.3  # the reference's initial coefficient ("prior")
LR = 1e-3
DEFAULT_STEPS = 100


@dataclass
class Task:
    """One task's model and unlabeled batches: ``model`` holds that task's own tensors (its head), and the
    merged tensors replace those of the same names in each forward pass."""

    model: nn.Module
    batches: Sequence[Any]
    device: torch.device = torch.device("cpu")
    forward: Callable[[nn.Module, Any], Tensor] = forward_logits


@dataclass
class Coefficients:
    """Learned coefficients: ``values[name][i]`` for member ``i`` (layer-wise: per tensor name; task-wise the
    same value for every name), and the loss (summed entropy) before each step and after the last."""

    names: list[str]
    values: dict[str, list[float]]
    layer_wise: bool
    losses: list[float] = field(default_factory=list)

    def record(self) -> dict:
        """For the recipe: the mode, the losses, and the coefficients (per tensor, or one list)."""
        entropy = {"first": self.losses[0], "last": self.losses[-1]} if self.losses else None
        rec: dict[str, object] = {"granularity": "layer-wise" if self.layer_wise else "task-wise",
                                  "steps": max(len(self.losses) - 1, 0), "entropy": entropy}
        rec["coefficients"] = self.values if self.layer_wise else (self.values[self.names[0]] if self.names else [])
        return rec


def softmax_entropy(logits: Tensor) -> Tensor:
    """Per-row Shannon entropy of ``softmax(logits)`` (the reference's ``softmax_entropy``)."""
    return -(logits.softmax(1) * logits.log_softmax(1)).sum(1)


def learn_coefficients(base: Mapping[str, Tensor], members: Sequence[Mapping[str, Tensor]], tasks: Sequence[Task], *,
                       layer_wise: bool = True, steps: int = DEFAULT_STEPS, lr: float = LR, prior: float = PRIOR,
                       device: torch.device | str = "cpu") -> Coefficients:
    """Learn AdaMerging's coefficients on the tasks' unlabeled batches.

    Args:
        base: the pretrained model's floating tensors that are merged (name -> tensor).
        members: each member's tensors of the same names.
        tasks: one per task (member, or group of members sharing model and data).
        layer_wise: one coefficient per member per tensor (True), or one per member (task-wise).
        steps: Adam steps; each sums, over the tasks, the mean entropy of one batch.
        lr, prior: Adam's learning rate and the coefficients' initial value.
        device: where the task vectors and the coefficients live (the tasks' models run on their own device).

    Returns:
        :class:`Coefficients` (clamped to [0, 1], as the merged model used them).

    Raises:
        InvalidArgumentError: no members or tasks, or a task without batches.
    """
    if not members or not tasks or any(len(t.batches) == 0 for t in tasks):
        raise InvalidArgumentError("adamerging needs members and, for each task, at least one unlabeled batch",
                                   option="batches")
    names = list(base)
    dev = torch.device(device)
    b = {k: base[k].detach().to(dev, torch.float32) for k in names}
    # Task vectors, one member at a time (float32: the members' own dtype may be half precision).
    taus = [{k: m[k].detach().to(dev, torch.float32) - b[k] for k in names} for m in members]
    n = len(members)
    # One row of coefficients per parameter; a buffer (BatchNorm statistics: no gradient flows into them) takes its
    # layer's weight's row, held fixed while it is used, or the prior where its layer has no parameter.
    learned = {k for k, _ in tasks[0].model.named_parameters()} & set(names)
    rows = {k: j for j, k in enumerate(k for k in names if k in learned)}
    tied = {k: _layer_parameter(k, rows) for k in names if k not in rows}
    raw = torch.nn.Parameter(torch.full((max(len(rows), 1) if layer_wise else 1, n), float(prior), device=dev))
    opt = torch.optim.Adam([raw], lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
    for t in tasks:
        t.model.eval()
        for p in t.model.parameters():
            p.requires_grad_(False)

    def row_of(lam: Tensor, k: str) -> Tensor:
        if not layer_wise:
            return lam[0] if k in rows else lam[0].detach()
        if k in rows:
            return lam[rows[k]]
        return lam[rows[tied[k]]].detach() if tied[k] is not None else torch.full((n,), float(prior), device=dev)

    def merged(lam: Tensor) -> dict[str, Tensor]:
        out = {}
        for k in names:
            row = row_of(lam, k)
            out[k] = b[k] + sum(row[i] * taus[i][k] for i in range(n))
        return out

    def loss_at(step: int) -> Tensor:
        lam = raw.clamp(0.0, 1.0)  # 1. the reference clamps the coefficients in the forward pass
        tensors = merged(lam)  # 2. the merged model's tensors, differentiable in the coefficients
        total = torch.zeros((), device=dev)
        for t in tasks:  # 3. summed over tasks: the mean entropy of the merged model's predictions on one batch
            x = to_device(t.batches[step % len(t.batches)], t.device)
            moved = {k: v.to(t.device) for k, v in tensors.items()}
            logits = functional_logits(t.model, moved, x, t.forward)
            total = total + softmax_entropy(logits.float()).mean().to(dev)
        return total

    losses = []
    for step in range(steps):
        loss = loss_at(step)
        losses.append(float(loss.detach()))
        opt.zero_grad()
        loss.backward()  # 4. one Adam step on the coefficients
        opt.step()
    with torch.no_grad():
        losses.append(float(loss_at(steps)))
        lam = raw.detach().clamp(0.0, 1.0).cpu()
    values = {k: [float(v) for v in row_of(lam, k)] for k in names}
    return Coefficients(names, values, layer_wise, losses)


def _layer_parameter(name: str, rows: Mapping[str, int]) -> str | None:
    """The parameter whose coefficients a buffer follows: its module's ``weight`` (else ``bias``), if learned."""
    prefix = name.rpartition(".")[0]
    for leaf in ("weight", "bias"):
        cand = f"{prefix}.{leaf}" if prefix else leaf
        if cand in rows:
            return cand
    return None
