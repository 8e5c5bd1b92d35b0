"""REPAIR (Jordan et al., 2023): give a mixed network back the neuron statistics of its parents.

Averaging the weights of two or more networks shrinks the variance of many of its neurons (the
"variance collapse" of Jordan et al., "REPAIR: REnormalizing Permuted Activations for Interpolation
Repair", ICLR 2023; code KellerJordan/REPAIR). REPAIR measures, on a few training batches, the mean
and standard deviation of every channel of every convolution's output (the pre-activation) in each
parent, sets the mixed network's goal to their weighted average (the weights of the mix), and
rescales and shifts each channel of the mixed network so it reaches that goal; the correction is then
folded into the convolution's weight and bias, so the network keeps its architecture and tensor names.

The reference this follows is PAPA's multi-parent REPAIR (SamsungSAILMontreal/PAPA,
``recombine/repair.py``: ``correct_neuron_stats_multiple``, ``make_tracked_net``/``TrackLayer``,
``make_repaired_net``/``ResetLayer``, ``reset_bn_stats``, ``fuse_conv_bn``), itself adapted from
KellerJordan/REPAIR. It wraps every ``Conv2d`` but the network's very last module, BatchNorm network or
not: a ``TrackLayer`` measures each parent's statistics, a ``ResetLayer`` (a BatchNorm with weight
``goal_std`` and bias ``goal_mean``) follows each convolution of the mix, every BatchNorm of the wrapped
mix (the network's own and the added ones) is reset with ``momentum=None`` in one train-mode pass over
the batches, and each added BatchNorm is fused back into its convolution.

Which statistics fix a mixed network needs (:func:`statistics_fix`):

- ``batchnorm``: a BatchNorm network in which every convolution (but the last module) feeds a BatchNorm.
  The reference's reset of the network's own BatchNorms is then all of REPAIR that counts: the
  correction it fuses into a convolution that feeds a BatchNorm is undone by that BatchNorm, reset in
  the same pass (Jordan et al. call REPAIR "a generalization of resetting BatchNorms"). So here the
  running statistics are only recomputed (:func:`merge.bn.recompute_bn`) and those convolutions keep
  their mixed weights.
- ``repair``: a network with convolutions that feed no BatchNorm: every convolution of a network
  without BatchNorm, and in a BatchNorm network the ones the reference corrects for real, such as the
  squeeze-excite convolutions and MobileNetV3's ``conv_head`` (:func:`repair_layers`). Those get
  REPAIR; the network's BatchNorms, if any, are reset in the same pass, as the reference resets them
  together with its added layers.
- ``none``: networks with neither (LayerNorm transformers such as the MiniLM, MLPs) are left as
  mixed. LayerNorm recomputes its statistics from every input, so there is no stored statistic to go
  stale, and the reference REPAIR only wraps ``Conv2d`` layers: on a transformer it changes nothing
  either. :func:`fix_statistics` reports ``none`` so the caller can record it.

Statistics are accumulated as REPAIR's tracking BatchNorm layers do (``momentum=None``): the mean over
batches of the per-batch channel means, and the mean over batches of the per-batch unbiased variances;
the standard deviation is the square root of the latter.

Deliberate differences from the reference, each a decision:

- A convolution that feeds a BatchNorm is not corrected (the reference corrects it and resets the
  BatchNorm after it). For a convolution with a bias the network computes the same function either way,
  up to BatchNorm's ``eps`` (``(s x - s m) / sqrt(s^2 v + eps)`` against ``(x - m) / sqrt(v + eps)``),
  and its weights stay the mix's. For one without a bias (timm's and torchvision's convolutions before a
  BatchNorm) the reference's ``fuse_conv_bn`` keeps the scale and drops the shift, while the BatchNorm
  after it was reset on the shifted outputs, so that BatchNorm's eval-mode mean ends off by the shift;
  leaving the convolution alone avoids that (``tests/test_repair.py`` shows both cases).
  "Feeds a BatchNorm" is read from the module order: the next module after the convolution (containers
  skipped) is a BatchNorm over its channels, as in ``nn.Sequential(conv, bn)`` and timm's ``conv``/``bn``
  pairs. A convolution wrongly taken for one that feeds no BatchNorm is simply corrected, as the
  reference corrects every convolution.
- ``Conv1d`` and ``Conv3d`` are corrected too (the reference names only ``Conv2d`` and says how to
  extend it).
- Statistics are accumulated in float64 and corrections folded in float64, cast back once; the
  reference runs its passes under float16 autocast.
- A network without BatchNorm is measured and corrected in eval mode (no dropout noise in the
  statistics); the reference runs every pass in train mode. A BatchNorm network runs its passes in
  train mode, as the reference and :func:`merge.bn.recompute_bn` do, so its BatchNorms normalise with
  batch statistics; the parents' BatchNorm buffers are restored after they are measured (the reference
  measures deep copies).
- The batches are the caller's, the same for every parent and child (the reference's ``same_repair``
  draws the same shuffled batches for all of them, optionally with each member's mixup).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from merge.bn import inputs_of, bn_layers, move_to, recompute_bn
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

    ``batchnorm`` when the network has BatchNorm and every convolution feeds one, ``repair`` when some
    convolution (the last module excepted) feeds no BatchNorm, ``none`` without either.

    Example:
        >>> statistics_fix(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2, 2)))
        'repair'
        >>> statistics_fix(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(2, 2)))
        'batchnorm'
    """
    if repair_layers(model):
        return "repair"
    if bn_layers(model):
        return "batchnorm"
    return "none"


def repair_layers(model: nn.Module) -> list[nn.Module]:
    """The convolutions REPAIR corrects: every ``Conv1d/2d/3d`` of ``model`` that feeds no BatchNorm, except
    the very last module (as PAPA's ``make_repaired_net``).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1), nn.ReLU(), nn.Flatten())
        >>> repair_layers(net) == [net[2]]
        True
    """
    modules = list(model.modules())
    return [m for i, m in enumerate(modules[:-1]) if isinstance(m, _CONVS) and not _feeds_batchnorm(modules, i)]


def _feeds_batchnorm(modules: list[nn.Module], i: int) -> bool:
    """Whether the module after ``modules[i]`` (a convolution) in registration order, containers skipped, is
    a BatchNorm over its output channels."""
    conv = modules[i]
    own = {id(m) for m in conv.modules()}  # e.g. the parametrizations of a weight-normed convolution
    for m in modules[i + 1:]:
        if id(m) in own:
            continue
        if isinstance(m, nn.modules.batchnorm._BatchNorm):  # timm's BatchNormAct2d has children: test it first
            return m.num_features == conv.out_channels
        if not any(True for _ in m.children()):
            return False
    return False


@contextlib.contextmanager
def _statistics_pass(model: nn.Module, *, reset_bn: bool) -> Iterator[None]:
    """The mode REPAIR's passes run in: eval without BatchNorm; with BatchNorm, train (batch statistics, as the
    reference's ``reset_bn_stats``), the running statistics either reset with ``momentum=None`` (``reset_bn``,
    kept, as :func:`merge.bn.recompute_bn`) or left as they were (restored afterwards)."""
    layers = bn_layers(model)
    saved = [(m.momentum, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
             for m in layers]
    was_training = model.training
    if reset_bn:
        for m in layers:
            m.reset_running_stats()
            m.momentum = None
    ok = False
    try:
        model.train(bool(layers))
        yield
        ok = True
    finally:
        model.train(was_training)
        for m, (momentum, mean, var, count) in zip(layers, saved, strict=True):
            m.momentum = momentum
            if not (ok and reset_bn):
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(count)


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
        model: the network: in eval mode, or with BatchNorm in train mode (BatchNorm normalises with batch
            statistics, as in the reference's tracking pass); its mode and BatchNorm buffers are restored.
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

    def hook(i: int):
        def fn(_m: nn.Module, _inp: Any, out: Tensor) -> None:
            mean, _biased, unbiased = _batch_moments(out)
            s = sums[i]
            s[0] = mean if s[0] is None else s[0] + mean
            s[1] = unbiased if s[1] is None else s[1] + unbiased
        return fn

    handles = [m.register_forward_hook(hook(i)) for i, m in enumerate(layers)]
    try:
        with _statistics_pass(model, reset_bn=False):
            for batch in batches:
                _forward(model, move_to(inputs_of(batch), device), forward)
    finally:
        for h in handles:
            h.remove()
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
        mean = sum(float(w) * p[layer][0].double() for p, w in zip(parents, weights, strict=True))
        std = sum(float(w) * p[layer][1].double() for p, w in zip(parents, weights, strict=True))
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

    In a network with BatchNorm the pass runs in train mode and also resets every BatchNorm's running
    statistics (``momentum=None``, as :func:`merge.bn.recompute_bn`), as the reference's one
    ``reset_bn_stats`` pass over the wrapped network does; convolutions that feed a BatchNorm are left as
    they are (:func:`repair_layers`).

    Args:
        model: the mixed network, modified in place (eval mode during the pass, train mode with BatchNorm;
            its mode is restored).
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
    for (mean, std), m in zip(targets, layers, strict=True):
        if mean.shape != (m.out_channels,) or std.shape != (m.out_channels,):
            raise InvalidArgumentError(f"repair: a target of shape {tuple(mean.shape)} for a layer of "
                                       f"{m.out_channels} channels")
    sums = [[0.0, 0.0] for _ in layers]

    def hook(i: int):
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
    try:
        with _statistics_pass(model, reset_bn=True):
            for batch in batches:
                _forward(model, move_to(inputs_of(batch), device), forward)
    finally:
        for h in handles:
            h.remove()
    n = len(batches)
    for (goal_mean, goal_std), m, (s_mean, s_var) in zip(targets, layers, sums, strict=True):
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
        What was done: ``batchnorm`` (running statistics recomputed), ``repair`` (REPAIR applied to the
        convolutions that feed no BatchNorm, BatchNorm statistics recomputed in the same pass) or ``none``
        (no BatchNorm and no convolution: nothing to fix).

    Raises:
        InvalidArgumentError: a ``repair`` network without ``targets``, or no batches.
    """
    kind = statistics_fix(model)
    if kind == "batchnorm":
        recompute_bn(model, batches, device=device, forward=forward)
    elif kind == "repair":
        if targets is None:
            raise InvalidArgumentError("fix_statistics: this network has convolutions that feed no BatchNorm, so "
                                       "REPAIR needs the parents' statistics (merge.repair.repair_targets)",
                                       option="targets")
        repair(model, targets, list(batches), device=device, forward=forward)
    return kind
