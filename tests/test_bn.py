"""BatchNorm recalibration against statistics computed by hand, without BatchNorm modules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import merge
from merge.bn import bn_layers, recompute_bn
from merge.errors import InvalidArgumentError
from merge.evaluate import CheckpointEvaluator, evaluate_checkpoints
from tests.eval_fixtures import one_thread, train_digit_members


class TinyNet(nn.Module):
    """conv -> BN -> ReLU -> conv -> BN -> pool -> linear -> BN1d, in float64."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3, momentum=0.3)
        self.c2, self.b2 = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.fc, self.b3 = nn.Linear(4, 5), nn.BatchNorm1d(5, momentum=0.7)
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.b1(self.c1(x)))
        h = self.b2(self.c2(h)).mean(dim=(2, 3))
        return self.b3(self.fc(h))


def reference_stats(net: TinyNet, batches: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per BN layer: the mean over batches of the batch mean and of the unbiased batch variance of its input.

    Written with plain tensor ops: each layer normalises with its batch's biased statistics in train
    mode, which is what the next layer's input depends on.
    """
    def bn(x: torch.Tensor, layer: nn.BatchNorm2d | nn.BatchNorm1d, dims: tuple[int, ...]) -> torch.Tensor:
        mean, var = x.mean(dim=dims), x.var(dim=dims, unbiased=False)
        shape = (1, -1) + (1,) * (x.ndim - 2)
        return (x - mean.view(shape)) / torch.sqrt(var.view(shape) + layer.eps) * layer.weight.view(shape) \
            + layer.bias.view(shape)

    sums: list[list[torch.Tensor]] = [[torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)],
                                      [torch.zeros(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)],
                                      [torch.zeros(5, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)]]
    with torch.no_grad():
        for x in batches:
            x1 = F.conv2d(x, net.c1.weight, net.c1.bias, padding=1)
            x2 = F.conv2d(F.relu(bn(x1, net.b1, (0, 2, 3))), net.c2.weight, net.c2.bias)
            x3 = F.linear(bn(x2, net.b2, (0, 2, 3)).mean(dim=(2, 3)), net.fc.weight, net.fc.bias)
            for acc, feats, dims in zip(sums, (x1, x2, x3), ((0, 2, 3), (0, 2, 3), (0,))):
                acc[0] += feats.mean(dim=dims)
                acc[1] += feats.var(dim=dims, unbiased=True)
    return [(m / len(batches), v / len(batches)) for m, v in sums]


@pytest.fixture
def net() -> TinyNet:
    torch.manual_seed(0)
    n = TinyNet()
    with torch.no_grad():  # non-trivial affine maps, so a wrong normalisation changes later layers
        for layer in bn_layers(n):
            layer.weight.uniform_(0.5, 2.0)
            layer.bias.uniform_(-1.0, 1.0)
            layer.running_mean.fill_(7.0)
            layer.running_var.fill_(9.0)
    return n


def batches_of(sizes: list[int], seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, 2, 6, 6, generator=g, dtype=torch.float64) * 2 + 1, torch.zeros(b)) for b in sizes]


@pytest.mark.parametrize("num_batches", [None, 2])
def test_recomputed_stats_equal_an_independent_reference(net: TinyNet, num_batches: int | None) -> None:
    data = batches_of([8, 8, 8, 5])
    used = data if num_batches is None else data[:num_batches]
    want = reference_stats(net, [x for x, _ in used])
    weights = {k: v.clone() for k, v in net.named_parameters()}
    net.eval()
    out = recompute_bn(net, data, num_batches=num_batches)
    assert out is net and not net.training  # mode restored
    for layer, (mean, var) in zip(bn_layers(net), want):
        torch.testing.assert_close(layer.running_mean, mean, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(layer.running_var, var, rtol=1e-10, atol=1e-12)
        assert int(layer.num_batches_tracked) == len(used)
    assert [m.momentum for m in bn_layers(net)] == [0.3, 0.1, 0.7]  # restored
    for k, v in net.named_parameters():
        assert torch.equal(v, weights[k]), k  # weights untouched


def test_train_mode_is_restored_and_bare_tensors_are_accepted(net: TinyNet) -> None:
    data = batches_of([6, 6])
    net.train()
    recompute_bn(net, [x for x, _ in data])
    assert net.training
    want = reference_stats(net, [x for x, _ in data])
    torch.testing.assert_close(net.b2.running_mean, want[1][0], rtol=1e-10, atol=1e-12)


def test_model_without_batchnorm_is_unchanged() -> None:
    lin = nn.Linear(3, 2)
    before = {k: v.clone() for k, v in lin.state_dict().items()}
    assert recompute_bn(lin, [(torch.randn(4, 3), None)]) is lin
    assert all(torch.equal(v, before[k]) for k, v in lin.state_dict().items())


def test_bad_inputs_leave_the_statistics_alone(net: TinyNet) -> None:
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(InvalidArgumentError, match="yielded no batch; BatchNorm statistics left unchanged"):
        recompute_bn(net, [])
    with pytest.raises(InvalidArgumentError, match="num_batches must be a positive number of batches, got 0"):
        recompute_bn(net, batches_of([4]), num_batches=0)

    def broken():
        yield batches_of([4])[0]
        raise RuntimeError("disk gone")

    with pytest.raises(RuntimeError, match="disk gone"):
        recompute_bn(net, broken())
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert [m.momentum for m in bn_layers(net)] == [0.3, 0.1, 0.7]


def test_recalibration_repairs_a_soup_with_wrong_statistics(tmp_path: Path) -> None:
    """A soup whose BN statistics are wrong loses accuracy; recompute_bn gives it back (real digits data)."""
    with one_thread():
        paths, _ = train_digit_members(tmp_path, 2)
        soup = merge.soup(paths, out=tmp_path / "soup.safetensors").path
        ev = CheckpointEvaluator.from_checkpoints([soup], batch_size=64)
        sd = merge.open_checkpoint(soup).state_dict()
        for k in sd:  # statistics that describe no network: what a careless merge can produce
            if k.endswith("running_mean"):
                sd[k] = sd[k] + 3.0
        broken = ev.scorer()(sd)
        repaired = ev.scorer(recompute_bn=10)(sd)
        assert repaired > broken + 0.2, (broken, repaired)
        # The evaluator's recalibration is recompute_bn on its fixed training subset: recompute by hand.
        model = ev.model_with(sd)
        recompute_bn(model, ev.bn_loader(10))
        by_hand = {k: v.clone() for k, v in model.state_dict().items()}
        for k, v in ev.model_with(sd, recompute_bn=10).state_dict().items():
            assert torch.equal(v, by_hand[k]), k
        rows = evaluate_checkpoints([soup], split="val", recompute_bn=10, batch_size=64)
        assert rows[0].metrics["val"]["acc"] == pytest.approx(ev.scorer(recompute_bn=10)(merge.open_checkpoint(soup).state_dict()))
    assert json.loads(merge.read_safetensors_metadata(soup)["papa_merge.model"])["arch"] == "small_cnn"
