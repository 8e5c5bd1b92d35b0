"""Neural network subspaces (issue 8): the global cos^2 penalty, lines and simplexes, BatchNorm recomputed per point."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import merge
from merge.data import load_dataset
from merge.errors import InvalidArgumentError
from merge.evaluate import CheckpointEvaluator
from merge.models import METRICS_KEY, TRAIN_KEY, load_member
from merge.train import Recipe, Subspace, SubspaceLine, SubspacePenalty, TrainJob, run_method, train_subspace
from merge.train.subspace import global_cos2, penalty_weight_names


@pytest.fixture(scope="module")
def small_digits():
    return load_dataset("digits", seed=0, limit=256)


@pytest.fixture(scope="module")
def line(tmp_path_factory, small_digits):
    out = tmp_path_factory.mktemp("line")
    return train_subspace(Recipe(epochs=2, batch_size=32, lr=0.1, seed=2), model="small_cnn", data=small_digits,
                          out_dir=out, bn_batches=2, eval_batch_size=64, progress=False)


def _pair(conv0, conv1, lin0, lin1):
    nets = []
    for c, w in ((conv0, lin0), (conv1, lin1)):
        net = nn.Sequential(nn.Conv2d(1, 1, 1, bias=True), nn.BatchNorm2d(1), nn.Flatten(), nn.Linear(2, 1, bias=True))
        with torch.no_grad():
            net[0].weight.copy_(torch.tensor(c).reshape(1, 1, 1, 1))
            net[3].weight.copy_(torch.tensor([w]))
            net[0].bias.fill_(5.0)  # biases and norm layers must stay out of the penalty
            net[3].bias.fill_(-7.0)
        nets.append(net)
    return nets


def test_penalty_is_one_global_ratio_over_conv_weights_as_in_the_reference():
    sub = Subspace(_pair([3.0], [1.0], [1.0, 0.0], [0.0, 2.0]))
    assert sub.penalty_names == ["0.weight", "3.weight"] == penalty_weight_names(sub.net)
    # The reference formula on the flattened weights, by hand: (3*1 + 1*0 + 0*2)^2 / ((9 + 1) * (1 + 4)) = 9 / 50.
    a, b = np.array([3.0, 1.0, 0.0]), np.array([1.0, 0.0, 2.0])
    assert (a @ b) ** 2 / ((a @ a) * (b @ b)) == pytest.approx(0.18)
    assert float(sub.cos2().detach()) == pytest.approx(0.18, rel=1e-6)
    # Not the mean of per-layer cosines (1 for the conv, 0 for the linear layer: 0.5).
    assert abs(float(sub.cos2().detach()) - 0.5) > 0.3
    assert float(global_cos2([torch.tensor([1.0, 2.0])], [torch.tensor([2.0, 4.0])])) == pytest.approx(1.0)
    # The callback adds beta times it to the loss of a subspace member, and nothing to other models.
    from merge.train import TrainState

    state = TrainState([sub, nn.Linear(1, 1)], [], [], [], [], torch.device("cpu"), 1, 1, 1)
    pen = SubspacePenalty(beta=2.0)
    assert float(pen.on_loss(state, 0, torch.tensor(1.0)).detach()) == pytest.approx(1.0 + 2 * 0.18, rel=1e-6)
    assert float(pen.on_loss(state, 1, torch.tensor(1.0))) == 1.0
    with pytest.raises(InvalidArgumentError, match="beta must be >= 0"):
        SubspacePenalty(beta=-1)


def test_points_of_a_line_and_of_a_simplex():
    torch.manual_seed(0)
    nets = [nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)) for _ in range(3)]
    line = SubspaceLine(nets[0], nets[1])
    mid = line.weights_at([0.5, 0.5])
    for n, p in nets[0].named_parameters():
        want = (p.detach().double() + dict(nets[1].named_parameters())[n].detach().double()) / 2
        torch.testing.assert_close(mid[n].detach().double(), want)
    torch.testing.assert_close(line.endpoint_state_dict(1)["2.weight"], nets[1][2].weight.detach())
    x = torch.randn(5, 3)
    simplex = Subspace(nets, seed=3)
    assert simplex.kind == "simplex" and simplex.eval_coefficients == pytest.approx([1 / 3] * 3)
    draws = [simplex.sample() for _ in range(200)]
    assert all(min(c) >= 0 and sum(c) == pytest.approx(1.0) for c in draws)
    assert np.mean([c[0] for c in draws]) == pytest.approx(1 / 3, abs=0.06)  # uniform on the simplex: mean 1/3
    pairs = {simplex.penalty_pair() for _ in range(50)}
    assert all(i != j for i, j in pairs) and len(pairs) > 1
    assert line.penalty_pair() == (0, 1)
    simplex.train()
    simplex(x)
    assert sum(simplex.coefficients) == pytest.approx(1.0) and simplex.coefficients != simplex.eval_coefficients
    with pytest.raises(InvalidArgumentError, match="3 non-negative coefficients summing to 1"):
        simplex.weights_at([0.5, 0.5])
    with pytest.raises(InvalidArgumentError, match="at least 2 endpoints"):
        Subspace([nets[0]])


def test_endpoints_are_written_with_batchnorm_recomputed_at_each_endpoint(line, small_digits):
    for i, p in enumerate(line):
        meta = merge.read_safetensors_metadata(p)
        train = json.loads(meta[TRAIN_KEY])["subspace"]
        assert train["kind"] == "line" and train["endpoint"] == i and train["bn_recomputed"]["batches"] == 2
        # The recorded metrics are those of the endpoint with its own statistics, recomputed on the same
        # fixed training batches that papa-merge eval --recompute-bn uses.
        ev = CheckpointEvaluator.from_checkpoints([p], batch_size=64)
        with merge.open_checkpoint(p) as src:
            sd = src.state_dict()
        model = ev.model_with(sd, recompute_bn=2)
        torch.testing.assert_close(model.state_dict()["features.5.running_var"], sd["features.5.running_var"])
        from merge.evaluate import metrics, predict

        got = metrics(*predict(model, ev.loader("val")))
        assert got["acc"] == pytest.approx(json.loads(meta[METRICS_KEY])["val"]["acc"])


# Tiny runs: a member far below the others is expected here (tests/test_training_reports.py checks the warning).
@pytest.mark.filterwarnings("ignore::merge.errors.WeakMemberWarning")
def test_subspace_method_trains_a_simplex_from_the_registry(tmp_path, small_digits):
    job = TrainJob(model="small_cnn", data=small_digits, out_dir=tmp_path, members=3, progress=False,
                   base=Recipe(epochs=1, batch_size=64, lr=0.1), eval_batch_size=128)
    paths = run_method("subspace", job, beta=0.5, bn_batches=1).paths
    assert len(paths) == 3
    infos = [json.loads(merge.read_safetensors_metadata(p)[TRAIN_KEY])["subspace"] for p in paths]
    assert [i["endpoint"] for i in infos] == [0, 1, 2] and {i["kind"] for i in infos} == {"simplex"}
    assert infos[0]["beta"] == 0.5 and len(set(infos[0]["seeds"])) == 3
    load_member(paths[2])  # each endpoint is a plain checkpoint of the architecture
    with pytest.raises(InvalidArgumentError, match="at least 2 members"):
        run_method("subspace", TrainJob(model="small_cnn", data=small_digits, out_dir=tmp_path / "x", members=2,
                                        pretrained="efficientnet-lite0-pypi"))
    from cli.main import cli

    r = CliRunner().invoke(cli, ["train", "--model", "small_cnn", "--data", "digits", "--limit", "200", "--epochs",
                                 "1", "--no-progress", "--members", "2", "--method", "subspace", "--subspace-beta",
                                 "2", "--bn-batches", "1", "--out", str(tmp_path / "cli")])
    assert r.exit_code == 0, r.output
    assert json.loads(merge.read_safetensors_metadata(tmp_path / "cli" / "member-01.safetensors")[TRAIN_KEY])[
        "subspace"]["beta"] == 2.0
