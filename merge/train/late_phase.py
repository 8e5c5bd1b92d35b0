"""Late-phase weights (von Oswald et al., 2021), as a training callback.

From epoch ``start_epoch`` on, a small set of weights (the BatchNorm affine parameters and the
classifier head) gets ``k`` copies; minibatch t trains copy ``t mod k`` while every other weight is
shared. At the end the copies collapse into one model by averaging them in weight space. The
BatchNorm running statistics are shared by the copies, so averaging gamma and beta is the same as
averaging each channel's eval-mode affine map, which is what averaging BatchNorm must mean.

The optimizer's state (SGD momentum) is shared by the copies, as in a plain implementation of the
paper's BatchNorm variant; each copy still sees only its own minibatches' gradients.
"""

from __future__ import annotations

import torch
from torch import nn

from merge.errors import InvalidArgumentError
from merge.train.loop import Callback, TrainState

__all__ = ["LatePhaseWeights", "late_phase_parameters"]


def late_phase_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The BatchNorm affine parameters and the classifier head's parameters of ``model``, by name."""
    chosen: dict[str, nn.Parameter] = {}
    for mname, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
            chosen[f"{mname}.weight"] = module.weight
            chosen[f"{mname}.bias"] = module.bias
    get = getattr(model, "get_classifier", None)
    head = get() if callable(get) else getattr(model, "head", None)
    if not isinstance(head, nn.Module):
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        head = linears[-1] if linears else None
    if head is not None:
        ids = {id(p) for p in head.parameters()}
        chosen.update({n: p for n, p in model.named_parameters() if id(p) in ids})
    return chosen


class LatePhaseWeights(Callback):
    """K copies of the BatchNorm and head weights, one trained per minibatch, averaged at the end.

    Args:
        k: number of copies (the paper uses 5 for BatchNorm late-phase weights).
        start_epoch: epoch (float) from which the copies exist; before it training is plain.

    Example:
        >>> train_member(recipe, model="small_cnn", data="mnist", out="lpw.safetensors",
        ...              callbacks=[LatePhaseWeights(k=5, start_epoch=1)])  # doctest: +SKIP
    """

    def __init__(self, *, k: int = 5, start_epoch: float = 0.0):
        if k < 2:
            raise InvalidArgumentError(f"late-phase weights need k >= 2 copies, got {k}")
        if start_epoch < 0:
            raise InvalidArgumentError(f"start_epoch must be >= 0, got {start_epoch}")
        self.k, self.start_epoch = k, start_epoch
        # Per member: parameter name -> the k copies; and which copy the live parameters hold now.
        self.copies: list[dict[str, list[torch.Tensor]]] = []
        self.active: list[int] = []

    def on_train_begin(self, state: TrainState) -> None:
        self.copies, self.active = [], []  # one instance may serve several runs (train_members)

    @torch.no_grad()
    def on_step_begin(self, state: TrainState) -> None:
        if state.step < self.start_epoch * state.steps_per_epoch:
            return
        if not self.copies:
            # 1. Entering the late phase: every copy starts from the weights trained so far.
            for model in state.models:
                params = late_phase_parameters(model)
                self.copies.append({n: [p.detach().clone() for _ in range(self.k)] for n, p in params.items()})
                self.active.append(0)
        # 2. This minibatch trains copy step mod k: park the live weights in their copy, load the next one.
        nxt = state.step % self.k
        for model, copies, cur in zip(state.models, self.copies, self.active):
            params = late_phase_parameters(model)
            for name, slots in copies.items():
                slots[cur].copy_(params[name])
                params[name].copy_(slots[nxt])
        self.active = [nxt] * len(state.models)

    @torch.no_grad()
    def on_train_end(self, state: TrainState) -> None:
        # 3. Collapse: the model keeps the average of the copies.
        for model, copies, cur in zip(state.models, self.copies, self.active):
            params = late_phase_parameters(model)
            for name, slots in copies.items():
                slots[cur].copy_(params[name])
                params[name].copy_(torch.stack([s.float() for s in slots]).mean(0).to(params[name].dtype))
        state.log["late_phase"] = {"k": self.k, "start_epoch": self.start_epoch,
                                   "parameters": sorted(self.copies[0]) if self.copies else []}
