"""BatchNorm recalibration: recompute running statistics after weights have been averaged.

Averaging the weights of BatchNorm networks leaves running means and variances that describe none of
the members' features, so soups of ResNets lose accuracy until the statistics are recomputed on a few
training batches (model soups, Wortsman et al., 2022; PAPA, Jolicoeur-Martineau et al., 2023; the
subspace midpoint, Wortsman et al., 2021). This is the same post-processing step as
``torch.optim.swa_utils.update_bn``: reset the statistics, set ``momentum=None`` so PyTorch keeps a
cumulative (equal-weight) average of the per-batch statistics instead of an exponential one, forward
the batches in train mode without gradients, and restore each layer's momentum.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

__all__ = ["recompute_bn", "bn_layers", "move_to", "inputs_of"]


def bn_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers of ``model`` (1d, 2d, 3d, sync, lazy) that track running statistics."""
    return [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
            and m.running_mean is not None]


def move_to(batch: Any, device: torch.device | str) -> Any:
    """Move a tensor, or the tensors inside a dict/list/tuple (tokenised text), to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict) or hasattr(batch, "items") and hasattr(batch, "keys"):
        return {k: move_to(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to(v, device) for v in batch)
    return batch


def inputs_of(batch: Any) -> Any:
    """The inputs of a batch: loaders of this package yield (inputs, labels); a bare tensor or dict is the inputs."""
    if isinstance(batch, (list, tuple)):
        return batch[0]
    return batch


def recompute_bn(model: nn.Module, loader: Iterable[Any], *, num_batches: int | None = None,
                 device: str | torch.device = "cpu",
                 forward: Callable[[nn.Module, Any], Any] | None = None) -> nn.Module:
    """Recompute the running statistics of every BatchNorm layer of ``model`` from ``loader``.

    After the call each layer's ``running_mean`` is the mean, over the batches seen, of the batch
    means of its input features, and ``running_var`` the mean of their unbiased batch variances
    (``momentum=None``, PyTorch's cumulative average); ``num_batches_tracked`` counts the batches.
    Weights are untouched, gradients are not computed, and the model's train/eval mode and each
    layer's momentum are restored. A model without BatchNorm is returned unchanged.

    Args:
        model: the network, modified in place (its parameters must already be on ``device``).
        loader: yields ``(inputs, labels)`` or bare inputs (a tensor or a dict of tensors); use
            training data with the training-time preprocessing but without augmentation.
        num_batches: how many batches to use (None: the whole loader).
        device: where the inputs are sent.
        forward: ``forward(model, inputs)``; default ``model(inputs)`` (``model(**inputs)`` for a dict).

    Returns:
        ``model`` itself.

    Raises:
        InvalidArgumentError: ``num_batches`` is not positive, or the loader yields no batch (the
            statistics are then left as they were).

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
        >>> batches = [(torch.randn(8, 3), torch.zeros(8)) for _ in range(4)]
        >>> _ = recompute_bn(net, batches, num_batches=2)
        >>> int(net[1].num_batches_tracked)
        2
    """
    from merge.errors import InvalidArgumentError

    if num_batches is not None and num_batches < 1:
        raise InvalidArgumentError(f"num_batches must be a positive number of batches, got {num_batches}")
    layers = bn_layers(model)
    if not layers:
        return model
    saved = [(m.momentum, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
             for m in layers]
    was_training = model.training
    for m in layers:
        m.reset_running_stats()
        m.momentum = None
    seen = 0
    try:
        model.train()
        with torch.no_grad():
            for batch in loader:
                if num_batches is not None and seen >= num_batches:
                    break
                inputs = move_to(inputs_of(batch), device)
                if forward is not None:
                    forward(model, inputs)
                elif isinstance(inputs, dict):
                    model(**inputs)
                else:
                    model(inputs)
                seen += 1
    except BaseException:
        _restore(layers, saved)
        raise
    finally:
        model.train(was_training)
        for m, (momentum, *_rest) in zip(layers, saved):
            m.momentum = momentum
    if seen == 0:
        _restore(layers, saved)
        raise InvalidArgumentError("recompute_bn: the loader yielded no batch; BatchNorm statistics left unchanged")
    return model


def _restore(layers: list[nn.modules.batchnorm._BatchNorm], saved: list[tuple]) -> None:
    for m, (momentum, mean, var, count) in zip(layers, saved):
        m.momentum = momentum
        m.running_mean.copy_(mean)
        m.running_var.copy_(var)
        m.num_batches_tracked.copy_(count)
