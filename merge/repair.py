"""REPAIR (Jordan et al., 2022): give a mixed network back the neuron statistics of its parents.

Averaging the weights of two or more networks shrinks the variance of many of its neurons (the
"variance collapse" of Jordan et al., "REPAIR: REnormalizing Permuted Activations for Interpolation
Repair", ICLR 2023; code KellerJordan/REPAIR). REPAIR measures, on a few training batches, the mean
and standard deviation of every channel of every convolution's output (the pre-activation) in each
parent, sets the mixed network's goal to their weighted average (the weights of the mix), and
rescales and shifts each channel of the mixed network so it reaches that goal; the correction is then
folded into the convolution's weight and bias, so the network keeps its architecture and tensor names.

Which statistics fix a mixed network needs depends on its normalisation (:func:`statistics_fix`):

- ``batchnorm``: networks with BatchNorm only need their running statistics reset on training batches
  (:func:`merge.bn.recompute_bn`). REPAIR's per-channel affine correction of a convolution that feeds
  a BatchNorm is undone by that BatchNorm once its statistics are recomputed, so the reset is all of
  REPAIR that survives there (Jordan et al. call REPAIR "a generalization of resetting BatchNorms").
- ``repair``: convolutional networks without BatchNorm get REPAIR on every convolution (the last
  module excepted, as in PAPA's code, SamsungSAILMontreal/PAPA recombine/repair.py).
- ``none``: networks with neither (LayerNorm transformers such as the MiniLM, MLPs) are left as
  mixed. LayerNorm recomputes its statistics from every input, so there is no stored statistic to go
  stale, and the reference REPAIR only wraps ``Conv2d`` layers: on a transformer it changes nothing
  either. :func:`fix_statistics` reports ``none`` so the caller can record it.

Statistics are accumulated as REPAIR's tracking BatchNorm layers do (``momentum=None``): the mean over
batches of the per-batch channel means, and the mean over batches of the per-batch unbiased variances;
the standard deviation is the square root of the latter.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from merge.bn import _inputs_of, bn_layers, move_to, recompute_bn
from merge.errors import InvalidArgumentError

__all__ = ["ChannelStats", "statistics_fix", "repair_layers", "channel_stats", "repair_targets", "repair",
           "fix_statistics", "REPAIR_CITATION"]

REPAIR_CITATION = ("Jordan et al., 2023. REPAIR: REnormalizing Permuted Activations for Interpolation Repair. "
                   "ICLR; code KellerJordan/REPAIR")

ChannelStats = list[tuple[Tensor, Tensor]]
"""One ``(mean, std)`` pair of ``[C]`` tensors per REPAIR layer, in :func:`repair_layers` order."""

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def statistics_fix(model: nn.Module) -> str:
    """How a freshly mixed ``model`` gets its statistics back: ``batchnorm``, ``repair`` or ``none``.

    Example:
        >>> statistics_fix(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2, 2)))
        'repair'
    """
    if bn_layers(model):
        return "batchnorm"
    if repair_layers(model):
        return "repair"
    return "none"


def repair_layers(model: nn.Module) -> list[nn.Module]:
    """The convolutions REPAIR corrects: every ``Conv1d/2d/3d`` of ``model`` except the very last module."""
    modules = list(model.modules())
    return [m for m in modules[:-1] if isinstance(m, _CONVS)]


def _forward(model: nn.Module, inputs: Any, forward: Callable[[nn.Module, Any], Any] | None) -> None:
    if forward is not None:
        forward(model, inputs)
    elif isinstance(inputs, dict):
        model(**inputs)
    else:
        model(inputs)


def _batch_moments(out: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel (dim 1) mean, biased and unbiased variance of one batch, in float64."""
    x = out.detach().transpose(0, 1).reshape(out.shape[1], -1).double()
    n = x.shape[1]
    if n < 2:
        raise InvalidArgumentError("REPAIR needs at least 2 values per channel in a batch to measure a variance; "
                                   "use batches of at least 2 examples")
    mean = x.mean(1)
    biased = x.var(1, unbiased=False)
    return mean, biased, biased * n / (n - 1)


def _check_batches(batches: Sequence[Any]) -> None:
    if len(batches) == 0:
        raise InvalidArgumentError("REPAIR needs at least one batch of training inputs; pass batches=[...]")


@torch.no_grad()
def channel_stats(model: nn.Module, batches: Sequence[Any], *, device: str | torch.device = "cpu",
                  forward: Callable[[nn.Module, Any], Any] | None = None,
                  layers: Sequence[nn.Module] | None = None) -> ChannelStats:
    """The mean and standard deviation of every output channel of every REPAIR layer of ``model``.

    Args:
        model: the network (evaluated in eval mode; its mode is restored).
        batches: ``(inputs, labels)`` pairs or bare inputs; the same batches for every network compared.
        device: where the inputs go.
        forward: ``forward(model, inputs)``; default ``model(inputs)`` (``model(**inputs)`` for a dict).
        layers: the layers to measure (default :func:`repair_layers`).

    Returns:
        One ``(mean, std)`` pair per layer, float32 ``[C]`` tensors.

    Raises:
        InvalidArgumentError: no batches.
    """
    _check_batches(batches)
    layers = repair_layers(model) if layers is None else list(layers)
    sums = [[None, None] for _ in layers]

    def hook(i: int):  # noqa: ANN202 - a forward hook factory
        def fn(_m: nn.Module, _inp: Any, out: Tensor) -> None:
            mean, _biased, unbiased = _batch_moments(out)
            s = sums[i]
            s[0] = mean if s[0] is None else s[0] + mean
            s[1] = unbiased if s[1] is None else s[1] + unbiased
        return fn

    handles = [m.register_forward_hook(hook(i)) for i, m in enumerate(layers)]
    was_training = model.training
    try:
        model.eval()
        for batch in batches:
            _forward(model, move_to(_inputs_of(batch), device), forward)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    n = len(batches)
    return [((m / n).float(), (v / n).sqrt().float()) for m, v in sums]


def repair_targets(parents: Sequence[ChannelStats], weights: Sequence[float]) -> ChannelStats:
    """The goal of a mix: per layer, ``sum_j w_j * mean_j`` and ``sum_j w_j * std_j`` (REPAIR's interpolation).

    Raises:
        InvalidArgumentError: no parents, a weight per parent missing, or parents with different layers.
    """
    if not parents or len(parents) != len(weights):
        raise InvalidArgumentError(f"repair_targets: {len(parents)} parents and {len(weights)} weights; "
                                   "give one weight per parent")
    n_layers = {len(p) for p in parents}
    if len(n_layers) != 1:
        raise InvalidArgumentError(f"repair_targets: parents have different numbers of layers {sorted(n_layers)}")
    out = []
    for layer in range(n_layers.pop()):
        mean = sum(float(w) * p[layer][0].double() for p, w in zip(parents, weights))
        std = sum(float(w) * p[layer][1].double() for p, w in zip(parents, weights))
        out.append((mean.float(), std.float()))
    return out


@torch.no_grad()
def repair(model: nn.Module, targets: ChannelStats, batches: Sequence[Any], *, eps: float = 1e-5,
           device: str | torch.device = "cpu", forward: Callable[[nn.Module, Any], Any] | None = None) -> nn.Module:
    """Rescale each channel of every REPAIR layer of ``model`` so its output mean and std reach ``targets``.

    As REPAIR does: during one pass over ``batches``, every layer's output is normalised with its batch
    statistics and given the goal's affine map (``(x - mean_b) / sqrt(var_b + eps) * std* + mean*``, a
    BatchNorm in train mode with weight ``std*`` and bias ``mean*``), so each layer is measured with the
    layers before it already corrected; the running (momentum-free) mean and variance of each layer's
    uncorrected output are accumulated on the way. The correction is then folded into the layer:
    ``weight *= s`` and ``bias = mean* + s * (bias - mean)`` per output channel, with
    ``s = std* / sqrt(var + eps)``. A convolution without a bias gets the scale only, as the reference's
    ``fuse_conv_bn`` does (the shift has nowhere to go without adding a tensor).

    Args:
        model: the mixed network, modified in place (eval mode during the pass; its mode is restored).
        targets: one ``(mean, std)`` per layer of :func:`repair_layers` (:func:`repair_targets`).
        batches: training inputs, the same ones the targets were measured on.
        eps: added to the variance, as BatchNorm does.
        device, forward: as in :func:`channel_stats`.

    Returns:
        ``model``.

    Raises:
        InvalidArgumentError: no batches, or targets that do not match the layers.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten())
        >>> xs = [torch.randn(8, 1, 5, 5) for _ in range(3)]
        >>> goal = [(torch.zeros(4), torch.ones(4))]
        >>> after = channel_stats(repair(net, goal, xs), xs)
        >>> bool(torch.allclose(after[0][1], torch.ones(4), atol=1e-3))
        True
    """
    _check_batches(batches)
    layers = repair_layers(model)
    if len(targets) != len(layers):
        raise InvalidArgumentError(f"repair: {len(targets)} targets for {len(layers)} convolutions; measure the "
                                   "targets on networks of the same architecture")
    for (mean, std), m in zip(targets, layers):
        if mean.shape != (m.out_channels,) or std.shape != (m.out_channels,):
            raise InvalidArgumentError(f"repair: a target of shape {tuple(mean.shape)} for a layer of "
                                       f"{m.out_channels} channels")
    sums = [[0.0, 0.0] for _ in layers]

    def hook(i: int):  # noqa: ANN202 - a forward hook factory
        goal_mean, goal_std = targets[i]

        def fn(_m: nn.Module, _inp: Any, out: Tensor) -> Tensor:
            mean, biased, unbiased = _batch_moments(out)
            sums[i][0] = sums[i][0] + mean
            sums[i][1] = sums[i][1] + unbiased
            shape = (1, -1) + (1,) * (out.dim() - 2)
            scale = (goal_std.double().to(out.device) / (biased + eps).sqrt()).view(shape)
            shift = goal_mean.double().to(out.device).view(shape) - mean.view(shape) * scale
            return (out.double() * scale + shift).to(out.dtype)
        return fn

    handles = [m.register_forward_hook(hook(i)) for i, m in enumerate(layers)]
    was_training = model.training
    try:
        model.eval()
        for batch in batches:
            _forward(model, move_to(_inputs_of(batch), device), forward)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    n = len(batches)
    for (goal_mean, goal_std), m, (s_mean, s_var) in zip(targets, layers, sums):
        run_mean, run_var = s_mean / n, s_var / n
        s = goal_std.double().to(run_var.device) / (run_var + eps).sqrt()
        w = m.weight
        w.copy_((w.double() * s.view((-1,) + (1,) * (w.dim() - 1))).to(w.dtype))
        if m.bias is not None:
            b = m.bias
            b.copy_((goal_mean.double().to(b.device) + s * (b.double() - run_mean)).to(b.dtype))
    return model


def fix_statistics(model: nn.Module, batches: Sequence[Any] | Iterable[Any], *, device: str | torch.device = "cpu",
                   targets: ChannelStats | None = None,
                   forward: Callable[[nn.Module, Any], Any] | None = None) -> str:
    """Give a freshly mixed ``model`` its statistics back, the way its normalisation needs (:func:`statistics_fix`).

    Args:
        model: the mixed network, modified in place.
        batches: a few training batches (PAPA's reference uses 5).
        device, forward: as in :func:`channel_stats`.
        targets: for ``repair``: the weighted average of the parents' :func:`channel_stats`.

    Returns:
        What was done: ``batchnorm`` (running statistics recomputed), ``repair`` (REPAIR applied) or
        ``none`` (no BatchNorm and no convolution: nothing to fix).

    Raises:
        InvalidArgumentError: a ``repair`` network without ``targets``, or no batches.
    """
    kind = statistics_fix(model)
    if kind == "batchnorm":
        recompute_bn(model, batches, device=device, forward=forward)
    elif kind == "repair":
        if targets is None:
            raise InvalidArgumentError("fix_statistics: this network has convolutions without BatchNorm, so REPAIR "
                                       "needs the parents' statistics (merge.repair.repair_targets)",
                                       option="targets")
        repair(model, targets, list(batches), device=device, forward=forward)
    return kind
