"""merge.repair: REPAIR (Jordan et al.) on convolutional networks without BatchNorm, and which fix each network gets."""

from __future__ import annotations

import pytest
import torch
from torch import nn

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
    for (gm, gs), (wm, ws) in zip(got, want):
        torch.testing.assert_close(gm.double(), wm, atol=1e-5, rtol=0)
        torch.testing.assert_close(gs.double(), ws, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("w", [0.5, 0.3])
def test_repair_restores_each_channels_statistics_to_the_target(w):
    a, b, xs = conv_net(0), conv_net(1), batches()
    target = repair_targets([channel_stats(a, xs), channel_stats(b, xs)], [w, 1 - w])
    # The goal is the weighted average of the parents' statistics, per channel.
    ra, rb = reference_stats(a, xs), reference_stats(b, xs)
    for (tm, ts), (am, as_), (bm, bs) in zip(target, ra, rb):
        torch.testing.assert_close(tm.double(), w * am + (1 - w) * bm, atol=1e-5, rtol=0)
        torch.testing.assert_close(ts.double(), w * as_ + (1 - w) * bs, atol=1e-5, rtol=1e-5)
    child = averaged(a, b, w)
    before = reference_stats(child, xs)
    # Averaging independent networks collapses the variance of the deeper layers (what REPAIR fixes).
    assert min(float((s / t.double()).min()) for (_, s), (_, t) in zip(before[1:], target[1:])) < 0.7
    repair(child, target, xs)
    after = reference_stats(child, xs)
    for (m, s), (tm, ts) in zip(after, target):
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
