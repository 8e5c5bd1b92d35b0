"""Late-phase weights (issue 8): per-copy BatchNorm and optimizer state, cycle-accumulated shared steps, collapse."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import merge
from merge.collapse import collapse_batchnorm, collapse_checkpoint, collapse_state_dict
from merge.data import load_dataset
from merge.errors import InvalidArgumentError, MissingMetadataError, SameInputOutputError
from merge.models import TRAIN_KEY, build_model, load_member
from merge.train import (
    LatePhaseNet,
    LatePhaseOptimizer,
    LatePhaseSchedule,
    Recipe,
    TrainJob,
    fit,
    late_phase_modules,
    run_method,
    train_late_phase_member,
)


@pytest.fixture(scope="module")
def small_digits():
    return load_dataset("digits", seed=0, limit=256)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, small_digits):
    out = tmp_path_factory.mktemp("lpw")
    return train_late_phase_member(Recipe(epochs=2, batch_size=32, lr=0.1, seed=3), model="small_cnn",
                                   data=small_digits, out=out / "m.safetensors", late_phase_out=out / "m.lpw.safetensors",
                                   copies=3, start_epoch=1.0, progress=False)


def _distinct_copies(lpn: LatePhaseNet, seed: int = 0) -> None:
    """Give every copy its own parameters and statistics (as K specialists would have after training)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k in range(lpn.k):
            for m in lpn.copy_modules(k).values():
                for p in m.parameters():
                    p.add_(0.3 * torch.randn(p.shape, generator=g))
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.running_mean.add_(torch.randn(m.running_mean.shape, generator=g))
                    m.running_var.mul_(torch.rand(m.running_var.shape, generator=g) + 0.5)


# --- the collapse ---------------------------------------------------------------------------------------


def test_collapse_batchnorm_is_the_mean_of_the_copies_affine_maps():
    w, b = [torch.tensor([2.0, 1.0]), torch.tensor([4.0, 3.0])], [torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 2.0])]
    m, v = [torch.tensor([3.0, 0.0]), torch.tensor([1.0, 2.0])], [torch.tensor([3.0, 0.0]), torch.tensor([15.0, 8.0])]
    eps = 1.0
    out = collapse_batchnorm(w, b, m, v, eps=eps)
    # By hand: copy 0 maps x to (2x - 5, x), copy 1 to (x + 0, 1x + 0); channel 1 of copy 1: s = 3/3 = 1, t = 2 - 2 = 0.
    s = [(2 / 2 + 4 / 4) / 2, (1 / 1 + 3 / 3) / 2]
    t = [((1 - 1 * 3) + (-1 - 1 * 1)) / 2, ((0 - 0) + (2 - 1 * 2)) / 2]
    torch.testing.assert_close(out["weight"], torch.tensor(s))
    torch.testing.assert_close(out["bias"], torch.tensor(t))
    assert out["running_mean"].tolist() == [0.0, 0.0] and out["running_var"].tolist() == [0.0, 0.0]  # 1 - eps
    bn = nn.BatchNorm1d(2, eps=eps).eval()
    bn.load_state_dict({**out, "num_batches_tracked": torch.tensor(0)})
    x = torch.randn(7, 2)
    copies = []
    for i in range(2):
        c = nn.BatchNorm1d(2, eps=eps).eval()
        c.load_state_dict({"weight": w[i], "bias": b[i], "running_mean": m[i], "running_var": v[i],
                           "num_batches_tracked": torch.tensor(0)})
        copies.append(c(x))
    torch.testing.assert_close(bn(x), (copies[0] + copies[1]) / 2)
    with pytest.raises(InvalidArgumentError, match="same number"):
        collapse_batchnorm(w, b[:1], m, v, eps=eps)


@pytest.mark.parametrize("kind", ["batchnorm-only", "head-only"])
def test_collapse_equals_the_mean_of_the_specialists_outputs_where_that_is_linear(kind):
    torch.manual_seed(0)
    trunk = [nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    last = nn.BatchNorm1d(4, eps=1e-3) if kind == "batchnorm-only" else nn.Linear(4, 3)
    lpn = LatePhaseNet(nn.Sequential(*trunk, last), copies=3)
    assert lpn.names == ["4"]
    lpn.release()
    _distinct_copies(lpn)
    lpn.eval()
    x = torch.randn(6, 1, 8, 8)
    specialists = []
    for k in range(3):
        with lpn.specialist(k):
            specialists.append(lpn(x).double())
    collapsed = lpn.net.__class__(*[copy.deepcopy(m) for m in lpn.net])  # a plain Sequential
    collapsed.load_state_dict(collapse_state_dict(lpn.late_phase_state_dict(), lpn.info()), strict=True)
    collapsed.eval()
    torch.testing.assert_close(collapsed(x).double(), torch.stack(specialists).mean(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lpn(x), collapsed(x), rtol=1e-5, atol=1e-5)  # eval mode runs the collapse


def _layerwise_average_forward(lpn: LatePhaseNet, x: torch.Tensor) -> torch.Tensor:
    """The reference's eval (``set_average_specialists(True)``), written independently: each late-phase layer
    returns the mean of its K copies' outputs, in float64."""

    class Mean(nn.Module):
        def __init__(self, mods):
            super().__init__()
            self.mods = nn.ModuleList(mods)

        def forward(self, h):
            return torch.stack([m(h) for m in self.mods]).mean(0)

    net = copy.deepcopy(lpn.net).double().eval()
    for name in lpn.names:
        parent_name, _, leaf = name.rpartition(".")
        parent = net.get_submodule(parent_name) if parent_name else net
        parent._modules[leaf] = Mean([copy.deepcopy(lpn.copies[k][name.replace(".", "__")]).double().eval()
                                      for k in range(lpn.k)])
    return net(x.double())


def test_collapsed_small_cnn_computes_the_references_layerwise_average_and_loads_strictly(tmp_path):
    torch.manual_seed(1)
    net = build_model("small_cnn", num_classes=10, in_chans=1)
    lpn = LatePhaseNet(net, copies=4)
    assert lpn.names == ["features.1", "features.5", "features.9", "head"]
    lpn.release()
    _distinct_copies(lpn, seed=5)
    lpn.eval()
    x = torch.randn(5, 1, 8, 8)
    plain = build_model("small_cnn", num_classes=10, in_chans=1)
    plain.load_state_dict(collapse_state_dict(lpn.late_phase_state_dict(), lpn.info()), strict=True)
    plain.eval()
    torch.testing.assert_close(plain(x).double(), _layerwise_average_forward(lpn, x), rtol=1e-5, atol=1e-5)
    # It is not the mean of the specialists' (nonlinear) networks, nor a plain average of gamma/beta/statistics.
    specialists = []
    for k in range(4):
        with lpn.specialist(k):
            specialists.append(lpn(x))
    assert not torch.allclose(plain(x), torch.stack(specialists).mean(0), atol=1e-3)
    naive = collapse_state_dict(lpn.late_phase_state_dict(), lpn.info())
    for n in ("features.1", "features.5", "features.9"):
        for t in ("weight", "bias", "running_mean", "running_var"):
            naive[f"{n}.{t}"] = torch.stack([lpn.copies[k][n.replace(".", "__")].state_dict()[t]
                                             for k in range(4)]).mean(0)
    plain_naive = build_model("small_cnn", num_classes=10, in_chans=1).eval()
    plain_naive.load_state_dict(naive)
    assert not torch.allclose(plain_naive(x), plain(x), atol=1e-3)


def test_collapse_of_the_trained_checkpoint_is_the_member_and_loads_into_the_plain_architecture(tmp_path, trained):
    member, raw = trained
    meta = merge.read_safetensors_metadata(raw)
    info = json.loads(meta[TRAIN_KEY])["late_phase"]
    assert info["copies"] == 3 and info["layout"] == "late_phase.{copy}.{module}.{tensor}"
    assert info["modules"]["features.1"] == {"kind": "batchnorm", "eps": 1e-5} and info["modules"]["head"] == {
        "kind": "linear"}
    with merge.open_checkpoint(raw) as src:
        names = list(src.keys()) if hasattr(src, "keys") else list(src.state_dict())
    assert "head.weight" not in names and "late_phase.2.head.weight" in names
    assert "late_phase.0.features.5.running_var" in names
    out = tmp_path / "collapsed.safetensors"
    r = CliRunner().invoke(__import__("cli.main", fromlist=["cli"]).cli, ["collapse", str(raw), "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "3 copies of 3 BatchNorm layer(s) and 1 head collapsed" in r.output
    a, b = merge.open_checkpoint(out).state_dict(), merge.open_checkpoint(member).state_dict()
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    model, meta_out = load_member(out)  # strict loading into small_cnn
    assert json.loads(meta_out["papa_merge.recipe"])["method"] == "late-phase-collapse"
    # The collapsed model is what the late-phase model computes in eval mode: its recorded metrics hold.
    rows = merge.evaluate_checkpoints([out])
    recorded = json.loads(meta["papa_merge.metrics"])
    assert rows[0].metrics["val"]["acc"] == pytest.approx(recorded["val"]["acc"])
    assert rows[0].metrics["test"]["nll"] == pytest.approx(recorded["test"]["nll"], rel=1e-5)


def test_collapse_refuses_what_it_cannot_collapse(tmp_path, trained):
    member, raw = trained
    with pytest.raises(InvalidArgumentError, match="already collapsed"):
        collapse_checkpoint(member, out=tmp_path / "x.safetensors")
    plain = merge.write_state_dict({"w": torch.zeros(2)}, tmp_path / "plain.safetensors")
    with pytest.raises(MissingMetadataError, match="not a late-phase checkpoint"):
        collapse_checkpoint(plain, out=tmp_path / "x.safetensors")
    with pytest.raises(SameInputOutputError, match="is the late-phase checkpoint itself"):
        collapse_checkpoint(raw, out=raw, force=True)
    with pytest.raises(InvalidArgumentError, match="end the path in .safetensors"):
        collapse_checkpoint(raw, out=tmp_path / "x.pt")
    from cli.main import cli

    r = CliRunner().invoke(cli, ["collapse", str(plain), "-o", str(tmp_path / "y.safetensors")])
    assert r.exit_code == 1 and "not a late-phase checkpoint" in r.output


# --- training ----------------------------------------------------------------------------------------------


def test_shared_weights_step_once_per_cycle_on_the_summed_gradient_and_copies_keep_their_own_statistics():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    batches = [(torch.randn(8, 3), torch.randint(0, 2, (8,))) for _ in range(4)]
    lr = 0.1
    recipe = Recipe(lr=lr, momentum=0.0, weight_decay=0.0, schedule="constant", epochs=1, batch_size=8)
    # The reference, by hand: K = 2 copies released at step 0 from the initial layers.
    ref = copy.deepcopy(base)
    shared = ref[0]
    copies = [(copy.deepcopy(ref[1]), copy.deepcopy(ref[2])) for _ in range(2)]
    summed = [torch.zeros_like(p) for p in shared.parameters()]
    expected_shared = []
    for t, (x, y) in enumerate(batches):
        bn, head = copies[t % 2]
        bn.train()
        loss = nn.functional.cross_entropy(head(bn(shared(x))), y)
        params = [*shared.parameters(), *bn.parameters(), *head.parameters()]
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g in zip([*bn.parameters(), *head.parameters()], grads[2:]):
                p -= lr * g  # the copy steps at once
            for s, g in zip(summed, grads[:2]):
                s += g
            if t % 2 == 1:  # end of a cycle: the shared weights step once on the summed gradient
                for p, s in zip(shared.parameters(), summed):
                    p -= lr * s
                    s.zero_()
        expected_shared.append(shared.weight.detach().clone())

    lpn = LatePhaseNet(copy.deepcopy(base), copies=2)
    seen = []

    class Record(LatePhaseSchedule):
        def on_step_end(self, state):
            seen.append(lpn.net[0].weight.detach().clone())

    fit([lpn], [batches], [recipe], num_classes=2, callbacks=[Record(start_epoch=0)],
        optimizers=[LatePhaseOptimizer(lpn, recipe)])
    torch.testing.assert_close(seen[0], base[0].weight)  # mid-cycle: the shared weights did not move
    for got, want in zip(seen, expected_shared):
        torch.testing.assert_close(got, want)
    for k in range(2):
        bn, head = copies[k]
        got = lpn.copy_modules(k)
        torch.testing.assert_close(got["2"].weight, head.weight)
        torch.testing.assert_close(got["1"].running_mean, bn.running_mean)  # its own batches' statistics only
        assert int(got["1"].num_batches_tracked) == 2
    assert not torch.equal(lpn.copy_modules(0)["1"].running_mean, lpn.copy_modules(1)["1"].running_mean)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_each_copy_has_its_own_optimizer_state(optimizer, small_digits):
    from merge.models import make_loader, model_spec

    spec = model_spec("small_cnn", 10, in_chans=1, image_size=8)
    recipe = Recipe(epochs=1, batch_size=32, lr=0.05, optimizer=optimizer)
    lpn = LatePhaseNet(build_model("small_cnn", num_classes=10, in_chans=1), copies=3)
    opt = LatePhaseOptimizer(lpn, recipe)
    assert opt.param_groups[0] is opt.shared.param_groups[0]  # one scheduler drives every part
    loader = make_loader(small_digits.train, spec, batch_size=32, shuffle=True, drop_last=True)
    fit([lpn], [loader], [recipe], num_classes=10, callbacks=[LatePhaseSchedule(start_epoch=0.25)], optimizers=[opt])
    key = "momentum_buffer" if optimizer == "sgd" else "exp_avg"
    states = [opt.specialists[k].state[lpn.copy_modules(k)["head"].weight][key] for k in range(3)]
    assert not torch.allclose(states[0], states[1]) and not torch.allclose(states[1], states[2])
    for k in range(3):  # a copy's parameters live in its own optimizer only
        for p in lpn.copies[k].parameters():
            assert p not in opt.shared.state and all(p not in opt.specialists[j].state for j in range(3) if j != k)
    assert lpn.net.head.weight not in opt.specialists[0].state


def test_late_phase_method_in_the_registry_and_the_cli(tmp_path, small_digits):
    from cli.main import cli

    job = TrainJob(model="small_cnn", data=small_digits, out_dir=tmp_path / "run", members=2, progress=False,
                   base=Recipe(epochs=1, batch_size=64, lr=0.1))
    result = run_method("late-phase", job, copies=2, start_epoch=0.5)
    assert [p.name for p in result.paths] == ["member-00.safetensors", "member-01.safetensors"]
    assert result.outputs["late-phase-01"] == tmp_path / "run" / "late-phase" / "member-01.safetensors"
    train = json.loads(merge.read_safetensors_metadata(result.paths[1])[TRAIN_KEY])
    assert train["method"] == "late-phase" and train["late_phase"]["start_step"] == 2
    before = result.paths[0].stat().st_mtime_ns
    assert run_method("late-phase", job, copies=2, start_epoch=0.5).paths == result.paths  # resumed, not retrained
    assert result.paths[0].stat().st_mtime_ns == before
    with pytest.raises(InvalidArgumentError, match=r"start_epoch 1.0 is not in \[0, 1\)"):
        run_method("late-phase", TrainJob(model="small_cnn", data=small_digits, out_dir=tmp_path / "x", members=1,
                                          base=Recipe(epochs=1)), start_epoch=1.0)
    with pytest.raises(InvalidArgumentError, match="at least 2 copies"):
        LatePhaseNet(nn.Linear(2, 2), copies=1)
    common = ["train", "--model", "small_cnn", "--data", "digits", "--limit", "200", "--epochs", "1",
              "--batch-size", "64", "--no-progress", "--members", "1"]
    r = CliRunner().invoke(cli, [*common, "--out", str(tmp_path / "cli"), "--method", "late-phase", "--late-phase", "2",
                                 "--late-phase-start", "0.5"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "cli" / "late-phase" / "member-00.safetensors").exists()
    bad = CliRunner().invoke(cli, [*common, "--out", str(tmp_path / "bad"), "--late-phase", "2"])
    # The fix names the method the flag belongs to, not the flag the user already passed.
    assert bad.exit_code == 2 and "'independent' does not take copies" in bad.output, bad.output
    assert "copies is an option of late-phase: pass --method late-phase with --late-phase" in bad.output


def test_late_phase_modules_pick_batchnorm_and_the_head():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.BatchNorm2d(2, affine=False), nn.Flatten(),
                        nn.Linear(2, 3), nn.Linear(3, 4))
    assert list(late_phase_modules(net)) == ["1", "5"]  # affine BatchNorm and the last linear layer
    with pytest.raises(InvalidArgumentError, match="no BatchNorm layer and no linear head"):
        LatePhaseNet(nn.Sequential(nn.Conv2d(1, 1, 1)), copies=2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_late_phase_trains_and_collapses_on_the_gpu(tmp_path, small_digits):
    member, raw = train_late_phase_member(Recipe(epochs=1, batch_size=32, lr=0.1), model="small_cnn",
                                          data=small_digits, out=tmp_path / "m.safetensors",
                                          late_phase_out=tmp_path / "m.lpw.safetensors", copies=2, start_epoch=0.5,
                                          device="cuda", progress=False)
    with merge.open_checkpoint(raw) as src:
        tensors, info = src.state_dict(), json.loads(src.metadata[TRAIN_KEY])["late_phase"]
    assert json.loads(merge.read_safetensors_metadata(member)[TRAIN_KEY])["device"] == "cuda"
    expected = collapse_state_dict(tensors, info)
    got = merge.open_checkpoint(member).state_dict()
    assert all(torch.equal(got[k], expected[k]) for k in got)
