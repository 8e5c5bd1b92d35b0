"""PAPA (gradual), PAPA-all, PAPA-2, the shuffled regularisation grid and the final model."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import merge
from merge.train.papa import WEAK_PULL, WeakPullWarning
from merge.bn import recompute_bn
from merge.data import load_dataset
from merge.errors import InvalidArgumentError, UnknownNameError
from merge.models import TRAIN_KEY
from merge.keys import RECIPE_KEY
from merge.train import (
    PAPA,
    PAPA_CHOICES,
    Callback,
    PopulationMix,
    Recipe,
    TrainJob,
    diverse_recipes,
    draw_pairs,
    fit,
    get_method,
    mix_matrix,
    mix_population,
    papa_grid,
    pull_to_average,
    run_method,
    train_member,
    train_population,
)


@pytest.fixture(scope="module")
def small_digits():
    return load_dataset("digits", seed=0, limit=256)


def toy_loaders(k: int, *, n: int = 80, batch: int = 8) -> list[DataLoader]:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)
    return [DataLoader(TensorDataset(x, y), batch_size=batch) for _ in range(k)]


def mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))


class Snapshot(Callback):
    """Records every member's state at a hook (placed before or after the callback under test)."""

    def __init__(self, hook: str):
        self.hook, self.seen = hook, []

    def _take(self, state):
        self.seen.append((state.step, state.epoch, [{k: v.detach().double().clone() for k, v in m.state_dict().items()}
                                                    for m in state.models]))

    def on_step_end(self, state):
        if self.hook == "step":
            self._take(state)

    def on_epoch_end(self, state):
        if self.hook == "epoch":
            self._take(state)


# --- PAPA (gradual) --------------------------------------------------------------------------------------


def test_pull_to_average_is_the_formula_and_alpha_one_is_the_identity():
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)) for _ in range(3)]
    for m in models:
        m[1].running_var.uniform_(0.5, 2.0)
        m[1].num_batches_tracked += 3
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in models]
    pull_to_average(models, 1.0)
    assert all(torch.equal(b[k], m.state_dict()[k]) for b, m in zip(before, models) for k in b)
    pull_to_average(models, 0.7)
    for name in before[0]:
        stack = torch.stack([b[name].double() for b in before])
        for i, m in enumerate(models):
            got = m.state_dict()[name]
            want = stack[i] if name.endswith("num_batches_tracked") else 0.7 * stack[i] + 0.3 * stack.mean(0)
            torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=0)
    with pytest.raises(InvalidArgumentError, match=r"PAPA alpha must be in \[0, 1\], got 1.5"):
        pull_to_average(models, 1.5)


def hand_lr_factor(t: int, *, warmup: int, total: int) -> float:
    """The learning rate after ``t`` steps as a fraction of the peak: linear warmup, then cosine to 0."""
    if t < warmup:
        return (t + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (t - warmup) / (total - warmup))))


@pytest.mark.parametrize("lr_scaling", ["linear", "none"])
def test_lr_scaling_follows_a_hand_schedule_and_the_pull_uses_it(lr_scaling):
    recipe = Recipe(lr=0.1, epochs=3, batch_size=8, warmup_epochs=0.5, weight_decay=0.0)
    models = [mlp(s) for s in range(3)]
    before, after = Snapshot("step"), Snapshot("step")
    papa = PAPA(every=3, alpha=0.9, lr_scaling=lr_scaling)
    fit(models, toy_loaders(3), [recipe] * 3, num_classes=3, callbacks=[before, papa, after])
    # 10 steps per epoch; pulls after in-epoch steps 0, 3, 6, 9 (the reference's ``i % ema_every_k == 0``).
    steps = [e * 10 + i + 1 for e in range(3) for i in (0, 3, 6, 9)]
    assert [s for s, _ in papa.history] == steps and papa.pulls == 12
    for (step, a_t) in papa.history:
        factor = hand_lr_factor(step, warmup=5, total=30) if lr_scaling == "linear" else 1.0
        assert a_t == pytest.approx(1 - 0.1 * factor, abs=1e-12)
    if lr_scaling == "linear":
        assert papa.history[-1][1] == pytest.approx(1.0)  # the cosine ends at 0: the last pull does nothing
    # Each pull moved every member by exactly that a_t toward the population's mean (float64 reference).
    by_step = {s: (b, a) for (s, _, b), (_, _, a) in zip(before.seen, after.seen)}
    for step, a_t in papa.history:
        b, a = by_step[step]
        for name in b[0]:
            mean = torch.stack([m[name] for m in b]).mean(0)
            for i in range(3):
                torch.testing.assert_close(a[i][name], a_t * b[i][name] + (1 - a_t) * mean, atol=1e-6, rtol=0)
    with pytest.raises(InvalidArgumentError, match=r"PAPA lr_scaling must be one of linear, none, got 'sqrt'"):
        PAPA(lr_scaling="sqrt")


def test_alpha_one_is_independent_training_bit_for_bit(tmp_path, small_digits):
    base = Recipe(epochs=1, batch_size=32, lr=0.05)
    recipes = diverse_recipes(2, diversity="augment", base=base, seed=3)
    pop = train_population(recipes, model="small_cnn", data=small_digits, out_dir=tmp_path / "pop", method="papa",
                           callbacks=[PAPA(every=1, alpha=1.0)], progress=False)
    for i, r in enumerate(recipes):
        alone = train_member(r, model="small_cnn", data=small_digits, out=tmp_path / f"alone{i}.safetensors",
                             progress=False)
        with merge.open_checkpoint(pop[i]) as a, merge.open_checkpoint(alone) as b:
            sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert json.loads(merge.read_safetensors_metadata(pop[0])[TRAIN_KEY])["papa"]["pulls"] == len(small_digits.train) // 32


# --- PAPA-all and PAPA-2 ---------------------------------------------------------------------------------


def bn_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))


def test_papa_all_leaves_all_members_equal_after_a_mix_and_recomputes_batchnorm():
    recipe = Recipe(lr=0.05, epochs=2, batch_size=8)
    g = torch.Generator().manual_seed(1)
    fix_batches = [(torch.randn(8, 4, generator=g), torch.zeros(8, dtype=torch.long)) for _ in range(3)]
    models = [bn_net(s) for s in range(3)]
    before, after = Snapshot("epoch"), Snapshot("epoch")
    mix = PopulationMix(mode="all", every=1, batches=fix_batches)
    fit(models, toy_loaders(3), [recipe] * 3, num_classes=3, callbacks=[before, mix, after])
    assert [m["epoch"] for m in mix.mixes] == [0] and mix.mixes[0]["fix"] == "batchnorm"
    b, a = before.seen[0][2], after.seen[0][2]
    for name in a[0]:
        for i in (1, 2):
            assert torch.equal(a[i][name], a[0][name]), name  # identical members, buffers included
    # Weights: the average of the parents; BatchNorm statistics: recomputed on the fix batches, momentum-free.
    expected = bn_net(7)
    expected.load_state_dict({k: torch.stack([m[k] for m in b]).mean(0).to(v.dtype) if v.is_floating_point() else v
                              for k, v in expected.state_dict().items()})
    recompute_bn(expected, fix_batches)
    for name, v in expected.state_dict().items():
        if name.endswith("num_batches_tracked"):
            assert int(a[0][name]) == 3
        else:
            torch.testing.assert_close(a[0][name], v.double(), atol=1e-6, rtol=0)
    # The last epoch is never mixed: after epoch 1 the members have drifted apart again.
    assert not torch.equal(models[0][0].weight, models[1][0].weight)


def test_papa_2_averages_exactly_the_drawn_pairs():
    recipe = Recipe(lr=0.05, epochs=3, batch_size=8)
    models = [mlp(s) for s in range(4)]
    before, after = Snapshot("epoch"), Snapshot("epoch")
    mix = PopulationMix(mode="pairs", every=1, batches=[(torch.randn(8, 4), torch.zeros(8, dtype=torch.long))], seed=4)
    fit(models, toy_loaders(4), [recipe] * 4, num_classes=3, callbacks=[before, mix, after])
    assert [m["epoch"] for m in mix.mixes] == [0, 1] and all(m["fix"] == "none" for m in mix.mixes)
    for n, m in enumerate(mix.mixes):
        pairs = m["pairs"]
        assert pairs == draw_pairs(4, np.random.default_rng([4, 2, n]))
        assert len(set(pairs)) == 4 and all(a < b for a, b in pairs)  # distinct pairs of distinct members
        b, a = before.seen[n][2], after.seen[n][2]
        for i, (p, q) in enumerate(pairs):
            for name in a[i]:
                want = (0.5 * b[p][name].float() + 0.5 * b[q][name].float()).double()
                assert torch.equal(a[i][name], want), (i, name)


def test_pairs_are_drawn_among_all_pairs_and_mix_weights():
    seen = set()
    for s in range(200):
        seen.update(draw_pairs(5, np.random.default_rng(s)))
    assert seen == {(a, b) for a in range(5) for b in range(a + 1, 5)}  # not only the first 5 (the reference's)
    w = mix_matrix("pairs", 3, pairs=[(0, 1), (1, 2), (0, 2)])
    assert torch.equal(w, torch.tensor([[0.5, 0.5, 0], [0, 0.5, 0.5], [0.5, 0, 0.5]], dtype=torch.float64))
    assert torch.equal(mix_matrix("all", 2), torch.full((2, 2), 0.5, dtype=torch.float64))
    with pytest.raises(InvalidArgumentError, match="PAPA-2 averages pairs of members; need at least 2, got 1"):
        draw_pairs(1, np.random.default_rng(0))
    with pytest.raises(InvalidArgumentError, match=r"mix weights must be \[2, 2\] for 2 members, got \(3, 3\)"):
        mix_population([mlp(0), mlp(1)], mix_matrix("all", 3))


@pytest.mark.parametrize(("epochs", "every", "from_start", "mixed"),
                         [(5, 2, True, [0, 2]), (4, 1, False, [1, 2]), (1, 1, True, []), (3, 5, True, [0])])
def test_mixes_happen_every_e_epochs_never_in_the_last(epochs, every, from_start, mixed):
    recipe = Recipe(lr=0.05, epochs=epochs, batch_size=8)
    mix = PopulationMix(mode="all", every=every, mix_from_start=from_start)
    state = fit([mlp(0), mlp(1)], toy_loaders(2), [recipe] * 2, num_classes=3, callbacks=[mix])
    assert [m["epoch"] for m in mix.mixes] == mixed
    assert state.log["papa_mix"]["mixes"] == mix.mixes
    with pytest.raises(InvalidArgumentError, match="mix_every must be >= 1 epoch, got 0"):
        PopulationMix(mode="all", every=0)
    with pytest.raises(InvalidArgumentError, match="mix mode must be one of all, pairs, got 'three'"):
        PopulationMix(mode="three")


# --- the regularisation grid -----------------------------------------------------------------------------


def test_papa_grid_gives_distinct_combinations_up_to_81():
    combos = papa_grid(81, seed=3)
    keys = [tuple(c[n] for n in PAPA_CHOICES) for c in combos]
    assert len(set(keys)) == 81
    grid = {(m, s, c, r) for m in PAPA_CHOICES["mixup"] for s in PAPA_CHOICES["label_smoothing"]
            for c in PAPA_CHOICES["cutmix"] for r in PAPA_CHOICES["random_erasing"]}
    assert set(keys) == grid
    assert papa_grid(82, seed=3)[81] == combos[0]  # dealt again from the top, as the reference does
    assert papa_grid(10, seed=3) == combos[:10] and papa_grid(10, seed=4) != combos[:10]
    for k in (2, 5, 17, 40):
        rs = diverse_recipes(k, diversity="augment", seed=3)
        assert len({(r.mixup, r.label_smoothing, r.cutmix, r.random_erasing) for r in rs}) == k
        assert [r.seed for r in rs] == list(range(3, 3 + k))
    assert papa_grid(4, choices={"label_smoothing": [0.0, 0.1]}, seed=0)[2:] == papa_grid(2, choices={
        "label_smoothing": [0.0, 0.1]}, seed=0)
    with pytest.raises(UnknownNameError, match="unknown recipe field 'smooth'"):
        papa_grid(2, choices={"smooth": [0.0]})
    with pytest.raises(InvalidArgumentError, match="papa_grid: mixup has no values"):
        papa_grid(2, choices={"mixup": []})


# --- the registered methods and the final model ----------------------------------------------------------


def test_methods_are_registered_with_their_options():
    assert get_method("papa").options == ("every", "alpha", "lr_scaling", "final", "final_bn_batches")
    for name in ("papa-all", "papa-2"):
        assert get_method(name).options == ("mix_every", "mix_from_start", "repair_batches", "final", "final_bn_batches")
        assert "Jolicoeur-Martineau" in get_method(name).citation
    job = TrainJob(model="small_cnn", data="digits", out_dir="unused", members=1)
    with pytest.raises(InvalidArgumentError, match="papa-2 mixes a population; ask for at least 2 members"):
        run_method("papa-2", job)
    with pytest.raises(InvalidArgumentError, match="training method 'papa' does not take mix_every"):
        run_method("papa", job, mix_every=2)


@pytest.mark.slow  # the whole PAPA pipeline: population, average with BatchNorm recomputed, greedy soup, table
@pytest.mark.filterwarnings("ignore::merge.errors.WeakMemberWarning")  # 8 steps: members far apart, expected
def test_papa_run_writes_members_the_average_the_greedy_soup_and_one_table(tmp_path, small_digits):
    job = TrainJob(model="small_cnn", data=small_digits, out_dir=tmp_path, members=3, diversity="augment",
                   base=Recipe(epochs=1, batch_size=32, lr=0.05), progress=False)
    with pytest.warns(WeakPullWarning, match=r"only to x0\.9[0-9]* over this run \(4 pulls, every 2 steps, alpha 0\.99\)"):
        result = run_method("papa", job, every=2)  # 8 steps: 4 pulls of at most 1% each cannot hold them together
    assert [p.name for p in result.paths] == ["member-00.safetensors", "member-01.safetensors", "member-02.safetensors"]
    assert set(result.outputs) == {"average", "greedy"}
    assert result.outputs["average"] == tmp_path / "papa.safetensors"
    meta = merge.read_safetensors_metadata(result.outputs["average"])
    recipe = json.loads(meta[RECIPE_KEY])
    assert recipe["papa"] == {"method": "papa", "every": 2, "alpha": 0.99, "lr_scaling": "linear", "world": 1}
    # 20 batches asked for; the recipe records those the training split holds (256 rows: one batch of 256).
    assert len(small_digits.train) == 256
    assert recipe["bn_recomputed"]["batches"] == 1 and len(recipe["members"]) == 3
    # The average's weights are the members' mean; its BatchNorm statistics are its own (recomputed).
    with merge.open_checkpoint(result.outputs["average"]) as src:
        avg = src.state_dict()
    members = []
    for p in result.paths:
        with merge.open_checkpoint(p) as src:
            members.append(src.state_dict())
    torch.testing.assert_close(avg["head.weight"].double(), torch.stack([m["head.weight"].double() for m in members]).mean(0),
                               atol=1e-6, rtol=0)
    mean_var = torch.stack([m["features.1.running_var"] for m in members]).mean(0)
    assert not torch.allclose(avg["features.1.running_var"], mean_var)
    names = [r["name"] for r in result.report["rows"]]
    assert names == ["members mean (3)", "members min (3)", "members max (3)", "ensemble of 3 members",
                     "average (papa.safetensors)", f"greedy soup ({len(result.report['greedy_selected'])} of 3)"]
    table = result.report["table"].splitlines()
    assert table[0].split() == ["model", "val", "acc", "val", "nll", "val", "ece", "test", "acc", "test", "nll",
                                "test", "ece"]
    assert len(table) == 7 and table[5].startswith("average (papa.safetensors)")
    rows = {r["name"]: r["metrics"] for r in result.report["rows"]}
    accs = [m["metrics"]["test"]["acc"] for m in result.report["members"]]
    assert rows["members mean (3)"]["test"]["acc"] == pytest.approx(sum(accs) / 3)
    assert rows["members min (3)"]["test"]["acc"] == min(accs)


def test_a_pull_strong_enough_for_the_run_gives_no_warning(tmp_path, small_digits):
    job = TrainJob(model="small_cnn", data=small_digits, out_dir=tmp_path, members=2,
                   base=Recipe(epochs=1, batch_size=32, lr=0.05), progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", WeakPullWarning)
        result = run_method("papa", job, every=1, alpha=0.3, final=False)
    shrink = result.report["training"][0]["pull_shrink"]
    assert 0 < shrink < WEAK_PULL


@pytest.mark.slow  # the whole PAPA-2 pipeline through the CLI
def test_cli_trains_papa_2_and_prints_the_table(tmp_path):
    from cli.main import cli

    args = ["train", "--model", "small_cnn", "--data", "digits", "--limit", "200", "--epochs", "2", "--batch-size",
            "32", "--no-progress", "--members", "3", "--out", str(tmp_path), "--method", "papa-2", "--mix-every", "1",
            "--repair-batches", "2"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    assert "average (papa.safetensors)" in res.output and "ensemble of 3 members" in res.output
    train = json.loads(merge.read_safetensors_metadata(tmp_path / "member-00.safetensors")[TRAIN_KEY])
    assert train["method"] == "papa-2" and [m["epoch"] for m in train["papa_mix"]["mixes"]] == [0]
    assert train["papa_mix"]["repair_batches"] == 2 and train["papa_mix"]["mixes"][0]["fix"] == "batchnorm"
    bad = CliRunner().invoke(cli, args[:-4] + ["--lr-scaling", "linear"])
    assert bad.exit_code == 2 and "training method 'papa-2' does not take lr_scaling" in bad.output
    assert "--lr-scaling" in bad.output


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_pull_mix_and_repair_on_cuda_equal_cpu():
    """The GPU path (members, means, mix weights and REPAIR statistics on the device) computes what the CPU does."""
    from merge.repair import channel_stats, repair, repair_targets

    def members(device):
        out = []
        for s in range(3):
            torch.manual_seed(s)
            out.append(nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(),
                                     nn.Flatten(), nn.Linear(16, 2)).to(device))
        return out

    xs = [torch.randn(8, 1, 4, 4, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    results = {}
    for device in ("cpu", "cuda"):
        ms = members(device)
        pull_to_average(ms, 0.7)
        batches = [(x.to(device), torch.zeros(8, dtype=torch.long, device=device)) for x in xs]
        weights = mix_matrix("pairs", 3, pairs=[(0, 1), (1, 2), (0, 2)])
        assert mix_population(ms, weights, batches=batches, device=device) == "repair"
        goal = repair_targets([channel_stats(ms[0], batches, device=device)], [1.0])
        repair(ms[1], goal, batches, device=device)
        results[device] = [{k: v.cpu() for k, v in m.state_dict().items()} for m in ms]
    for a, b in zip(results["cpu"], results["cuda"]):
        for k in a:
            torch.testing.assert_close(b[k], a[k], atol=1e-4, rtol=1e-4)


def test_a_weak_pull_warning_advises_what_this_run_has_not_tried(tmp_path, small_digits):
    job = TrainJob(model="small_cnn", data=small_digits, out_dir=tmp_path, members=2, diversity="augment",
                   base=Recipe(epochs=1, batch_size=32, lr=0.05), progress=False)
    with pytest.warns(WeakPullWarning, match=r"every 1 steps, alpha 0\.95\).*: pull harder \(an alpha below 0\.95\) or "
                                             r"train for more steps$"):
        run_method("papa", job, every=1, alpha=0.95, final=False)
