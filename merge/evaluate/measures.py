"""Evaluation: accuracy, NLL and calibration error of members, prediction ensembles and soups.

The metrics follow the papers' definitions so the numbers are comparable with them:

- accuracy: top-1;
- NLL: mean cross-entropy of the softmax (natural log), as in hyperparameter ensembles (Wenzel et
  al., 2020), which select members by validation NLL;
- ECE: expected calibration error with equal-width bins of top-1 confidence, each bin's
  |accuracy - mean confidence| weighted by its share of the examples (Guo et al., 2017).

A *prediction ensemble* averages the members' softmax probabilities (the usual deep-ensemble
prediction); it costs one forward pass per member, which is what a soup avoids.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from merge.errors import InvalidArgumentError

__all__ = ["metrics", "metrics_from_probs", "ensemble_probs"]


def _check_labels(n: int, labels: Tensor, what: str) -> Tensor:
    if labels.ndim != 1 or labels.shape[0] != n:
        raise InvalidArgumentError(f"{what}: expected {n} labels as a 1-D tensor, got shape {tuple(labels.shape)}")
    if n == 0:
        raise InvalidArgumentError(f"{what}: no examples to evaluate")
    return labels.long()


def metrics_from_probs(probs: Tensor, labels: Tensor, *, n_bins: int = 15) -> dict[str, float]:
    """Accuracy, NLL and ECE of class probabilities (e.g. a prediction ensemble's).

    Args:
        probs: ``(N, C)`` probabilities, each row summing to one.
        labels: ``(N,)`` integer class labels.
        n_bins: number of equal-width confidence bins for the ECE.

    Returns:
        ``{"acc": float, "nll": float, "ece": float}``; ``acc`` and ``ece`` in [0, 1].

    Raises:
        InvalidArgumentError: shapes disagree or there are no examples.

    Example:
        >>> p = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
        >>> round(metrics_from_probs(p, torch.tensor([0, 0]))["acc"], 2)
        0.5
    """
    if probs.ndim != 2:
        raise InvalidArgumentError(f"probs: expected a (N, C) tensor, got shape {tuple(probs.shape)}")
    labels = _check_labels(probs.shape[0], labels.to(probs.device), "probs")
    p = probs.detach().double()
    # Clamping only guards log(0) for a probability that underflowed; it changes nothing else.
    nll = -torch.log(p.gather(1, labels[:, None]).squeeze(1).clamp_min(torch.finfo(torch.float64).tiny))
    return _acc_ece(p, labels, nll, n_bins)


def metrics(logits: Tensor, labels: Tensor, *, n_bins: int = 15) -> dict[str, float]:
    """Accuracy, NLL (mean softmax cross-entropy) and ECE of logits.

    Computed in float64 from ``log_softmax`` so NLL stays exact for confident, wrong predictions.

    Args:
        logits: ``(N, C)`` unnormalised scores.
        labels: ``(N,)`` integer class labels.
        n_bins: number of equal-width confidence bins for the ECE.

    Returns:
        ``{"acc": float, "nll": float, "ece": float}``.

    Raises:
        InvalidArgumentError: shapes disagree or there are no examples.

    Example:
        >>> m = metrics(torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1]))
        >>> m["acc"], round(m["nll"], 4)
        (1.0, 0.2201)
    """
    if logits.ndim != 2:
        raise InvalidArgumentError(f"logits: expected a (N, C) tensor, got shape {tuple(logits.shape)}")
    labels = _check_labels(logits.shape[0], labels.to(logits.device), "logits")
    logp = torch.log_softmax(logits.detach().double(), dim=1)
    nll = -logp.gather(1, labels[:, None]).squeeze(1)
    return _acc_ece(logp.exp(), labels, nll, n_bins)


def _acc_ece(p: Tensor, labels: Tensor, nll: Tensor, n_bins: int) -> dict[str, float]:
    conf, pred = p.max(dim=1)
    correct = (pred == labels).double()
    # Bin i holds confidences in (i/B, (i+1)/B]; a confidence of exactly 0 cannot occur for a top-1.
    bins = (conf * n_bins).ceil().long().clamp(1, n_bins) - 1
    n = p.shape[0]
    count = torch.zeros(n_bins, dtype=torch.float64, device=p.device).index_add_(0, bins, torch.ones_like(conf))
    sum_conf = torch.zeros_like(count).index_add_(0, bins, conf)
    sum_acc = torch.zeros_like(count).index_add_(0, bins, correct)
    ece = (sum_acc - sum_conf).abs().sum() / n  # sum_b |B|/n * |acc_b - conf_b| = sum_b |sum_acc - sum_conf| / n
    return {"acc": float(correct.mean()), "nll": float(nll.mean()), "ece": float(ece)}


def ensemble_probs(logits: Sequence[Tensor], *, weights: Sequence[float] | None = None) -> Tensor:
    """The prediction ensemble: the (weighted) mean of the members' softmax probabilities.

    Args:
        logits: one ``(N, C)`` logits tensor per member, same examples in the same order.
        weights: one non-negative weight per member (e.g. greedy selection's pick counts); None: equal.

    Returns:
        ``(N, C)`` float64 probabilities.

    Raises:
        InvalidArgumentError: no members, members with different shapes, or bad weights.

    Example:
        >>> import math
        >>> ensemble_probs([torch.zeros(1, 2), torch.tensor([[0.0, math.log(3)]])])
        tensor([[0.3750, 0.6250]], dtype=torch.float64)
    """
    if not logits:
        raise InvalidArgumentError("ensemble_probs: no members given")
    if weights is None:
        weights = [1.0] * len(logits)
    w = [float(x) for x in weights]
    if len(w) != len(logits) or any(not x >= 0 or x == float("inf") for x in w) or sum(w) <= 0:
        raise InvalidArgumentError(f"ensemble_probs: need one finite weight >= 0 per member ({len(logits)}), "
                                   f"not all zero; got {list(weights)}")
    shape = tuple(logits[0].shape)
    acc = torch.zeros(shape, dtype=torch.float64, device=logits[0].device)
    for i, (lg, wi) in enumerate(zip(logits, w)):
        if tuple(lg.shape) != shape:
            raise InvalidArgumentError(f"ensemble_probs: member {i} has logits of shape {tuple(lg.shape)}, "
                                       f"member 0 has {shape}; members must be evaluated on the same examples")
        acc += wi * torch.softmax(lg.detach().double(), dim=1)
    return acc / sum(w)
