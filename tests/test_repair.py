"""merge.repair: REPAIR (Jordan et al.) on convolutional networks without BatchNorm, and which fix each network gets."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from merge.bn import recompute_bn
from merge.errors import InvalidArgumentError
from merge.repair import channel_stats, fix_statistics, repair, repair_layers, repair_targets, statistics_fix


def conv_net(seed: int) -> nn.Sequential:
    """A VGG-like stack without normalisation (REPAIR's own setting), conv biases included."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 6, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3))


def batches(n: int = 6, seed: int = 5) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 3, 10, 10, generator=g) for _ in range(n)]


def reference_stats(model: nn.Module, xs: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Float64 per-channel statistics of each conv output, computed without hooks: mean of batch means,
    sqrt of the mean of unbiased batch variances (REPAIR's momentum-free tracking BatchNorm)."""
    convs = [i for i, m in enumerate(model) if isinstance(m, nn.Conv2d)]
    out = []
    with torch.no_grad():
        for c in convs:
            means, vars_ = [], []
            for x in xs:
                y = model[: c + 1](x).double().transpose(0, 1).reshape(model[c].out_channels, -1)
                means.append(y.mean(1))
                vars_.append(y.var(1, unbiased=True))
            out.append((torch.stack(means).mean(0), torch.stack(vars_).mean(0).sqrt()))
    return out


def averaged(a: nn.Module, b: nn.Module, w: float = 0.5) -> nn.Module:
    child = conv_net(99)
    child.load_state_dict({k: w * a.state_dict()[k] + (1 - w) * b.state_dict()[k] for k in a.state_dict()})
    return child


def test_channel_stats_match_a_float64_reference():
    net, xs = conv_net(0), batches()
    got = channel_stats(net, xs)
    want = reference_stats(net, xs)
    assert len(got) == len(want) == 3
    for (gm, gs), (wm, ws) in zip(got, want, strict=True):
        torch.testing.assert_close(gm.double(), wm, atol=1e-5, rtol=0)
        torch.testing.assert_close(gs.double(), ws, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("w", [0.5, 0.3])
def test_repair_restores_each_channels_statistics_to_the_target(w):
    a, b, xs = conv_net(0), conv_net(1), batches()
    target = repair_targets([channel_stats(a, xs), channel_stats(b, xs)], [w, 1 - w])
    # The goal is the weighted average of the parents' statistics, per channel.
    ra, rb = reference_stats(a, xs), reference_stats(b, xs)
    for (tm, ts), (am, as_), (bm, bs) in zip(target, ra, rb, strict=True):
        torch.testing.assert_close(tm.double(), w * am + (1 - w) * bm, atol=1e-5, rtol=0)
        torch.testing.assert_close(ts.double(), w * as_ + (1 - w) * bs, atol=1e-5, rtol=1e-5)
    child = averaged(a, b, w)
    before = reference_stats(child, xs)
    # Averaging independent networks collapses the variance of the deeper layers (what REPAIR fixes).
    assert min(float((s / t.double()).min()) for (_, s), (_, t) in zip(before[1:], target[1:], strict=True)) < 0.7
    repair(child, target, xs)
    after = reference_stats(child, xs)
    for (m, s), (tm, ts) in zip(after, target, strict=True):
        ratio = s / ts.double()
        assert float((ratio - 1).abs().max()) < 0.01, ratio
        assert float(((m - tm.double()).abs() / ts.double()).max()) < 0.01
    # The fix lives in the weights: same architecture, same tensor names, the head untouched.
    assert set(child.state_dict()) == set(a.state_dict())
    torch.testing.assert_close(child[8].weight, w * a[8].weight + (1 - w) * b[8].weight)


def test_which_fix_each_network_gets():
    bn = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten())
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    transformer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16)
    assert statistics_fix(bn) == "batchnorm"
    assert statistics_fix(conv_net(0)) == "repair"
    assert statistics_fix(mlp) == "none" and statistics_fix(transformer) == "none"
    # The last module is never corrected (a convolutional head keeps its outputs), as in PAPA's REPAIR.
    head = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1))
    assert repair_layers(head) == [head[0]]
    # "none" leaves the weights exactly as mixed; "batchnorm" recomputes the statistics (momentum-free).
    before = {k: v.clone() for k, v in transformer.state_dict().items()}
    assert fix_statistics(transformer, [torch.randn(5, 3, 8)]) == "none"
    assert all(torch.equal(before[k], v) for k, v in transformer.state_dict().items())
    xs = [torch.randn(6, 1, 5, 5) for _ in range(3)]
    assert fix_statistics(bn, xs) == "batchnorm"
    with torch.no_grad():
        feats = [bn[0](x).transpose(0, 1).reshape(4, -1) for x in xs]
    torch.testing.assert_close(bn[1].running_mean, torch.stack([f.mean(1) for f in feats]).mean(0))
    torch.testing.assert_close(bn[1].running_var, torch.stack([f.var(1, unbiased=True) for f in feats]).mean(0))
    assert int(bn[1].num_batches_tracked) == 3


def test_repair_refuses_bad_input():
    net, xs = conv_net(0), batches(2)
    with pytest.raises(InvalidArgumentError, match="REPAIR needs at least one batch"):
        repair(net, channel_stats(net, xs), [])
    with pytest.raises(InvalidArgumentError, match=r"repair: 2 targets for 3 convolutions"):
        repair(net, channel_stats(net, xs)[:2], xs)
    with pytest.raises(InvalidArgumentError, match=r"2 parents and 1 weights; give one weight per parent"):
        repair_targets([channel_stats(net, xs)] * 2, [1.0])
    with pytest.raises(InvalidArgumentError, match=r"REPAIR needs the parents' statistics") as e:
        fix_statistics(net, xs)
    assert e.value.option == "targets"


# -- A BatchNorm network with convolutions that feed no BatchNorm: timm's MobileNetV3 ---------------------------

def mobilenet(seed: int) -> nn.Module:
    """MobileNetV3-Small 0.5 (random init): squeeze-excite convolutions (``se.conv_reduce``, ``se.conv_expand``)
    and ``conv_head`` feed no BatchNorm; every other convolution feeds one."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(seed)
    return timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=10)


def tracked_stats(model: nn.Module, names: list[str], xs: list[torch.Tensor], *,
                  inputs: bool = False) -> dict[str, tuple]:
    """Float64 statistics of the named modules' outputs (or ``inputs``), on a copy of ``model`` run in train mode
    as the reference's tracking pass runs (PAPA recombine/repair.py ``reset_bn_stats``: BatchNorm normalises with
    batch statistics): per channel, the mean of the batch means and the sqrt of the mean of unbiased variances."""
    net = copy.deepcopy(model).train()
    modules = dict(net.named_modules())
    seen: dict[str, list] = {n: [] for n in names}

    def keep(n: str):
        return lambda _m, inp, out: seen[n].append((inp[0] if inputs else out).detach().double())

    handles = [modules[n].register_forward_hook(keep(n)) for n in names]
    with torch.no_grad():
        for x in xs:
            net(x)
    for h in handles:
        h.remove()
    out = {}
    for n, outs in seen.items():
        flat = [o.transpose(0, 1).reshape(o.shape[1], -1) for o in outs]
        out[n] = (torch.stack([f.mean(1) for f in flat]).mean(0),
                  torch.stack([f.var(1, unbiased=True) for f in flat]).mean(0).sqrt())
    return out


class ResetLayer(nn.Module):
    """PAPA's ``ResetLayer`` (recombine/repair.py): a convolution followed by a BatchNorm with weight goal_std
    and bias goal_mean."""

    def __init__(self, conv: nn.Conv2d, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.layer, self.bn = conv, nn.BatchNorm2d(conv.out_channels)
        self.bn.weight.data, self.bn.bias.data = std.float().clone(), mean.float().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.layer(x))


def reference_repair(model: nn.Module, goals: dict[str, tuple], xs: list[torch.Tensor], *,
                     shift_without_bias: bool = False) -> nn.Module:
    """PAPA's REPAIR written out independently (``make_repaired_net``, ``reset_bn_stats``, ``fuse_tracked_net``):
    a ResetLayer around each named convolution, every BatchNorm reset (momentum None) in one train-mode pass,
    then each ResetLayer's BatchNorm fused into its convolution (``fuse_conv_bn``: a convolution without a bias
    gets the scale only, unless ``shift_without_bias`` gives it a bias for the shift)."""
    net = copy.deepcopy(model)
    for n, (mean, std) in goals.items():
        parent, _, attr = n.rpartition(".")
        holder = net.get_submodule(parent) if parent else net
        setattr(holder, attr, ResetLayer(getattr(holder, attr), mean, std))
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
            m.reset_running_stats()
    net.train()
    with torch.no_grad():
        for x in xs:
            net(x)
        for n in goals:
            parent, _, attr = n.rpartition(".")
            holder = net.get_submodule(parent) if parent else net
            reset = getattr(holder, attr)
            conv, bn = reset.layer, reset.bn
            gamma = bn.weight / (bn.eps + bn.running_var).sqrt()
            conv.weight.data = conv.weight * gamma.reshape(-1, 1, 1, 1)
            if conv.bias is not None:
                conv.bias.data = bn.bias + gamma * (conv.bias - bn.running_mean)
            elif shift_without_bias:
                conv.bias = nn.Parameter(bn.bias - gamma * bn.running_mean)
            setattr(holder, attr, conv)
    return net.eval()


def test_repair_on_a_batchnorm_network_corrects_the_convolutions_that_feed_no_batchnorm():
    w = 0.3
    a, b = mobilenet(0), mobilenet(1)
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(128, 3, 32, 32, generator=g) for _ in range(3)]
    convs = [n for n, m in a.named_modules() if isinstance(m, nn.Conv2d)]
    free = [n for n in convs if ".se." in n or n == "conv_head"]
    fed = [n for n in convs if n not in free]
    names = {id(m): n for n, m in a.named_modules()}
    # The convolutions PAPA's REPAIR really corrects in this network: those that no BatchNorm follows.
    assert [names[id(m)] for m in repair_layers(a)] == free and len(free) == 19
    assert statistics_fix(a) == "repair"

    # The goal, computed independently: the weighted average of the parents' statistics.
    sa, sb = tracked_stats(a, free, xs), tracked_stats(b, free, xs)
    goal = {n: (w * sa[n][0] + (1 - w) * sb[n][0], w * sa[n][1] + (1 - w) * sb[n][1]) for n in free}
    bn_before = {k: v.clone() for k, v in a.state_dict().items() if "running" in k or "num_batches" in k}
    measured = repair_targets([channel_stats(a, xs), channel_stats(b, xs)], [w, 1 - w])
    for (gm, gs), n in zip(measured, free, strict=True):
        torch.testing.assert_close(gm.double(), goal[n][0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(gs.double(), goal[n][1], atol=1e-4, rtol=1e-4)
    # Measuring a parent leaves its BatchNorm statistics as they were.
    assert all(torch.equal(v, a.state_dict()[k]) for k, v in bn_before.items())

    mixed = {k: (w * v + (1 - w) * b.state_dict()[k]) if v.is_floating_point() else v
             for k, v in a.state_dict().items()}
    child = mobilenet(2)
    child.load_state_dict(mixed)
    before = tracked_stats(child, free, xs)
    # The mix has lost its parents' statistics (what REPAIR is for).
    assert max(float((before[n][1] / goal[n][1] - 1).abs().max()) for n in free) > 0.3
    expected = reference_repair(child, {n: goal[n] for n in free}, xs)
    assert fix_statistics(child, xs, targets=measured) == "repair"

    # 1. The network the reference's REPAIR makes of the corrected convolutions, BatchNorm statistics included.
    state = child.state_dict()
    for k, v in expected.state_dict().items():
        torch.testing.assert_close(state[k], v, rtol=1e-4, atol=1e-5, msg=k)
    # 2. Every repaired convolution's output channels have the goal's mean and standard deviation, up to
    #    what a pass that normalises with batch statistics and a fold of their average leave (the reference's
    #    too: the deviation shrinks with the batch size; at 128 examples it is a few percent by the head).
    after = tracked_stats(child, free, xs)
    for n in free:
        (m, s), (tm, ts) = after[n], goal[n]
        std_err, mean_err = (s / ts - 1).abs(), (m - tm).abs() / ts
        assert float((before[n][1] / ts - 1).abs().mean()) > 0.2, n
        assert float(std_err.mean()) < 0.025 and float(std_err.max()) < 0.12, n
        assert float(mean_err.mean()) < 0.01 and float(mean_err.max()) < 0.04, n
    assert float((after[free[0]][1] / goal[free[0]][1] - 1).abs().max()) < 0.005  # the first one: no layer before
    # 3. Convolutions that feed a BatchNorm keep the mix's weights, and so does the head.
    for n in fed:
        assert torch.equal(state[f"{n}.weight"], mixed[f"{n}.weight"]), n
    assert torch.equal(state["classifier.weight"], mixed["classifier.weight"])
    # 4. Every BatchNorm was reset in the same pass, momentum-free; those before the first repaired convolution
    #    hold what merge.bn.recompute_bn gives the mix.
    plain = mobilenet(2)
    plain.load_state_dict(mixed)
    recompute_bn(plain, xs)
    bns = [n for n, m in child.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(int(child.get_submodule(n).num_batches_tracked) == len(xs) for n in bns)
    for n in ("bn1", "blocks.0.0.bn1"):
        for k in ("running_mean", "running_var"):
            torch.testing.assert_close(state[f"{n}.{k}"], plain.state_dict()[f"{n}.{k}"], rtol=1e-5, atol=1e-6)


def bn_net(seed: int, bias: bool) -> nn.Sequential:
    """Convolutions feeding BatchNorms (with or without a bias) around one that feeds none."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=bias), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1, bias=bias), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 1), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1, bias=bias), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))


@pytest.mark.parametrize("bias", [True, False])
def test_leaving_convolutions_that_feed_a_batchnorm_alone_computes_what_the_reference_computes(bias):
    """The deliberate difference: the reference corrects every convolution; correcting one that feeds a
    BatchNorm reset in the same pass changes nothing the network computes (up to eps), provided the fold keeps
    the shift. The reference's fold drops it for a convolution without a bias, which moves that BatchNorm's
    eval-mode mean: there the reference computes something else, and leaving the convolution alone is the fix."""
    a, b = bn_net(0, bias), bn_net(1, bias)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(32, 3, 12, 12, generator=g) for _ in range(4)]
    convs = [n for n, m in a.named_modules() if isinstance(m, nn.Conv2d)]
    assert repair_layers(a) == [a[6]] and statistics_fix(a) == "repair"
    sa, sb = tracked_stats(a, convs, xs), tracked_stats(b, convs, xs)
    goal = {n: ((sa[n][0] + sb[n][0]) / 2, (sa[n][1] + sb[n][1]) / 2) for n in convs}
    child = bn_net(2, bias)
    child.load_state_dict({k: (v + b.state_dict()[k]) / 2 if v.is_floating_point() else v
                           for k, v in a.state_dict().items()})
    every = reference_repair(child, goal, xs, shift_without_bias=True)
    as_written = reference_repair(child, goal, xs)
    fix_statistics(child, xs, targets=repair_targets([channel_stats(a, xs), channel_stats(b, xs)], [0.5, 0.5]))
    x = torch.cat(xs)
    with torch.no_grad():
        got, want, written = child.eval()(x), every(x), as_written(x)
    scale = float(want.abs().max())
    torch.testing.assert_close(got, want, rtol=0, atol=2e-3 * scale)
    if bias:
        torch.testing.assert_close(got, written, rtol=0, atol=2e-3 * scale)
    else:
        assert float((got - written).abs().max()) > 0.05 * scale
