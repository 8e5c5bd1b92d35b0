"""Running a model: its logits on a loader, and the ``evaluate(model)`` / ``score(state_dict)`` callbacks.

Greedy soup (:func:`merge.greedy.greedy_soup`) scores candidate state dicts; these turn any model and
held-out loader into such a score.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from merge.bn import move_to, recompute_bn
from merge.errors import InvalidArgumentError
from merge.evaluate.measures import metrics
from merge.models import forward_logits, load_weights

__all__ = ["predict", "model_evaluator", "state_dict_scorer", "load_into", "Evaluate", "StateDictScore"]


Evaluate = Callable[[nn.Module], float]
"""``evaluate(model) -> float``: a held-out score of any model, higher is better."""
StateDictScore = Callable[[Mapping[str, Tensor]], float]
"""``score(state_dict) -> float``: what :func:`merge.greedy.greedy_soup` calls on each candidate soup."""


def predict(model: nn.Module, loader: Iterable[Any], *, device: str | torch.device = "cpu",
            forward: Callable[[nn.Module, Any], Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """Run ``model`` over ``loader`` in eval mode without gradients; return all logits and labels.

    Args:
        model: any module; its train/eval mode is restored afterwards.
        loader: yields ``(inputs, labels)``; inputs are a tensor or a dict of tensors (tokenised text).
        device: where the forward passes run (the model must already be there).
        forward: ``forward(model, inputs) -> logits``; default :func:`merge.models.forward_logits`
            (``model(inputs)``, or ``model(**inputs)`` for a dict, with Hugging Face outputs unwrapped).

    Returns:
        ``(logits, labels)``: float32 ``(N, C)`` and int64 ``(N,)`` CPU tensors, in loader order.

    Raises:
        InvalidArgumentError: the loader yielded nothing.

    Example:
        >>> net = nn.Linear(4, 3)
        >>> logits, labels = predict(net, [(torch.randn(5, 4), torch.arange(5) % 3)])
        >>> tuple(logits.shape), labels.tolist()
        ((5, 3), [0, 1, 2, 0, 1])
    """
    fwd = forward or forward_logits
    was_training = model.training
    outs, labs = [], []
    model.eval()
    try:
        with torch.inference_mode():
            for inputs, labels in loader:
                outs.append(fwd(model, move_to(inputs, device)).float().cpu())
                labs.append(torch.as_tensor(labels).long().cpu())
    finally:
        model.train(was_training)
    if not outs:
        raise InvalidArgumentError("predict: the loader yielded no batch; nothing to evaluate")
    return torch.cat(outs), torch.cat(labs)


def model_evaluator(loader: Iterable[Any], *, metric: str = "acc", device: str | torch.device = "cpu",
                    forward: Callable[[nn.Module, Any], Tensor] | None = None, n_bins: int = 15) -> Evaluate:
    """An ``evaluate(model) -> float`` callback on a held-out loader, higher is better.

    Args:
        loader: held-out ``(inputs, labels)`` batches (the validation set for greedy soup).
        metric: ``acc``, ``nll`` (returned negated) or ``ece`` (returned negated).
        device, forward: as in :func:`predict`.

    Returns:
        The callback.

    Raises:
        InvalidArgumentError: an unknown metric.

    Example:
        >>> ev = model_evaluator([(torch.eye(3), torch.arange(3))])
        >>> ev(nn.Identity())
        1.0
    """
    if metric not in ("acc", "nll", "ece"):
        raise InvalidArgumentError(f"metric must be one of acc, nll, ece; got {metric!r}")
    sign = 1.0 if metric == "acc" else -1.0

    def evaluate(model: nn.Module) -> float:
        logits, labels = predict(model, loader, device=device, forward=forward)
        return sign * metrics(logits, labels, n_bins=n_bins)[metric]

    return evaluate


def state_dict_scorer(model: nn.Module, evaluate: Evaluate, *, bn_loader: Iterable[Any] | None = None,
                      bn_batches: int | None = None, device: str | torch.device = "cpu",
                      forward: Callable[[nn.Module, Any], Any] | None = None) -> StateDictScore:
    """Turn ``evaluate(model)`` into ``score(state_dict)`` for greedy soup, for any model.

    Each call loads the state dict into ``model`` (strictly: every key must match), recomputes the
    BatchNorm statistics on ``bn_batches`` batches of ``bn_loader`` when given, and returns
    ``evaluate(model)``. ``model``'s weights are overwritten on every call; the state dict is not.

    Args:
        model: a module of the members' architecture, on ``device``.
        evaluate: held-out score of a model, higher is better (:func:`model_evaluator`).
        bn_loader: training batches for :func:`merge.bn.recompute_bn` (None: no recalibration).
        bn_batches: how many of them (None: all).
        device, forward: passed to :func:`merge.bn.recompute_bn`.

    Returns:
        The score callback.

    Raises:
        MismatchError: (when called) the state dict's keys or shapes do not fit ``model``.

    Example:
        >>> net = nn.Linear(2, 2, bias=False)
        >>> score = state_dict_scorer(net, lambda m: float(m.weight.detach().sum()))
        >>> score({"weight": torch.ones(2, 2)})
        4.0
    """

    def score(state_dict: Mapping[str, Tensor]) -> float:
        load_into(model, state_dict)
        if bn_loader is not None:
            recompute_bn(model, bn_loader, num_batches=bn_batches, device=device, forward=forward)
        return float(evaluate(model))

    return score


def load_into(model: nn.Module, state_dict: Mapping[str, Tensor]) -> nn.Module:
    """``model.load_state_dict(state_dict)``, strict, with an error that names the mismatched tensors.

    Raises:
        MismatchError: missing or unexpected keys, or shapes that differ.
    """
    return load_weights(model, state_dict, what="the state dict's tensors")
