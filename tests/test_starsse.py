"""StarSSE and SSE (issue 8): the centre is member 0; cycles start from it (star) or from the last one (chain),
each with a fresh optimizer and a cosine from a peak learning rate that is a ratio of the centre's."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner

import merge
from merge.data import load_dataset
from merge.errors import InvalidArgumentError, MismatchError
from merge.models import TRAIN_KEY
from merge.train import Callback, Recipe, TrainJob, run_method
from merge.train.starsse import branch_recipes

CENTRE = Recipe(epochs=1, batch_size=64, lr=0.08, warmup_epochs=0.5, seed=0)


@pytest.fixture(scope="module")
def small_digits():
    return load_dataset("digits", seed=0, limit=256)


class Recorder(Callback):
    """What each run starts from and the learning rate of every step it takes."""

    def __init__(self):
        self.runs = []

    def on_train_begin(self, state):
        self.runs.append({"start": {k: v.detach().clone() for k, v in state.model.state_dict().items()},
                          "fresh": len(state.optimizer.state) == 0, "lrs": [], "total": state.total_steps,
                          "steps_per_epoch": state.steps_per_epoch})

    def on_step_begin(self, state):
        self.runs[-1]["lrs"].append(state.optimizer.param_groups[0]["lr"])


def _tensors(path):
    with merge.open_checkpoint(path) as src:
        return src.state_dict()


def _same(a, b):
    return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_branch_recipes_follow_the_ratios():
    rs = branch_recipes(CENTRE, 4, lr_ratio=4.0, epochs_ratio=2.0, seed=10)
    assert rs[0] == CENTRE
    for i, r in enumerate(rs[1:], 1):
        assert (r.lr, r.epochs, r.warmup_epochs, r.schedule) == (0.32, 2.0, 0.0, "cosine")
        assert (r.seed, r.data_seed, r.batch_size, r.weight_decay) == (10 + i, 10 + i, 64, CENTRE.weight_decay)
    augmented = branch_recipes(CENTRE, 3, diversity="augment")
    assert all(r.lr == CENTRE.lr for r in augmented[1:]) and len({(r.mixup, r.cutmix, r.crop) for r in augmented}) > 1
    with pytest.raises(InvalidArgumentError, match="random hyperparameter search does not apply"):
        branch_recipes(CENTRE, 3, diversity="hparams")
    with pytest.raises(InvalidArgumentError, match="branch_lr_ratio must be positive"):
        branch_recipes(CENTRE, 3, lr_ratio=0)
    with pytest.raises(InvalidArgumentError, match="2 or more members"):
        branch_recipes(CENTRE, 1)


# Tiny runs: a member far below the others is expected here (tests/test_training_reports.py checks the warning).
@pytest.mark.filterwarnings("ignore::merge.errors.WeakMemberWarning")
@pytest.mark.parametrize("method", ["starsse", "sse"])
def test_cycles_start_from_the_centre_or_the_last_cycle_with_a_fresh_optimizer_and_the_ratio_schedule(
        method, tmp_path, small_digits):
    rec = Recorder()
    job = TrainJob(model="small_cnn", data=small_digits, out_dir=tmp_path, members=3, recipes=[CENTRE], seed=0,
                   progress=False, callbacks=(rec,))
    result = run_method(method, job, branch_lr_ratio=2.0, branch_epochs_ratio=2.0)
    paths = result.paths
    assert [p.name for p in paths] == [f"member-0{i}.safetensors" for i in range(3)]
    assert len(rec.runs) == 3
    centre, cycles = rec.runs[0], rec.runs[1:]
    spe = centre["steps_per_epoch"]
    # The centre: its own recipe, warmup then cosine over its epochs.
    assert centre["total"] == spe and centre["lrs"][0] == pytest.approx(CENTRE.lr / round(0.5 * spe))
    for i, run in enumerate(cycles, 1):
        start = paths[0] if method == "starsse" else paths[i - 1]
        assert _same(run["start"], _tensors(start))  # every tensor, BatchNorm statistics included
        assert run["fresh"]  # a new optimizer: no momentum carried over
        assert run["total"] == 2 * spe  # epochs ratio 2
        peak = 2.0 * CENTRE.lr  # lr ratio 2, no warmup: the first step is at the peak
        want = [peak * 0.5 * (1 + math.cos(math.pi * t / run["total"])) for t in range(run["total"])]
        assert run["lrs"] == pytest.approx(want, rel=1e-12)
        train = json.loads(merge.read_safetensors_metadata(paths[i])[TRAIN_KEY])
        assert train["method"] == method and train["init"] == str(start)
        assert train[method] == {"role": "cycle", "cycle": i, "branch_lr_ratio": 2.0, "branch_epochs_ratio": 2.0,
                                 "members": 3}
        assert train["lr"] == peak and train["warmup_epochs"] == 0.0 and train["data_seed"] == i
    assert not _same(_tensors(paths[1]), _tensors(paths[2]))
    train0 = json.loads(merge.read_safetensors_metadata(paths[0])[TRAIN_KEY])
    assert train0[method]["role"] == "centre" and train0["init"] is None and train0["lr"] == CENTRE.lr
    # Rerunning resumes: nothing is trained again.
    again = Recorder()
    run_method(method, TrainJob(model="small_cnn", data=small_digits, out_dir=tmp_path, members=3, recipes=[CENTRE],
                                progress=False, callbacks=(again,)), branch_lr_ratio=2.0, branch_epochs_ratio=2.0)
    assert again.runs == []
    with pytest.raises(MismatchError, match="another recipe"):
        run_method(method, job, branch_lr_ratio=0.5, branch_epochs_ratio=2.0)


def test_a_given_centre_is_member_0_and_its_recipe_sets_the_cycles(tmp_path, small_digits):
    first = run_method("independent", TrainJob(model="small_cnn", data=small_digits, out_dir=tmp_path / "ft",
                                               members=1, recipes=[Recipe(epochs=1, batch_size=64, lr=0.03)],
                                               progress=False)).paths[0]
    rec = Recorder()
    job = TrainJob(model="small_cnn", data=small_digits, out_dir=tmp_path / "star", members=2, init=first,
                   progress=False, callbacks=(rec,))
    paths = run_method("starsse", job, branch_lr_ratio=0.5).paths
    assert paths[0].read_bytes() == first.read_bytes()
    assert len(rec.runs) == 1 and rec.runs[0]["lrs"][0] == pytest.approx(0.015)  # 0.5 x the centre's recorded lr
    assert _same(rec.runs[0]["start"], _tensors(first))
    other = run_method("independent", TrainJob(model="small_cnn", data=small_digits, out_dir=tmp_path / "o",
                                               members=1, recipes=[Recipe(epochs=1, batch_size=64, seed=5)],
                                               progress=False)).paths[0]
    with pytest.raises(MismatchError, match="is not the given centre"):
        run_method("starsse", TrainJob(model="small_cnn", data=small_digits, out_dir=tmp_path / "star", members=2,
                                       init=other, progress=False), branch_lr_ratio=0.5)
    with pytest.raises(InvalidArgumentError, match="give one recipe"):
        run_method("sse", TrainJob(model="small_cnn", data=small_digits, out_dir=tmp_path / "x", members=2,
                                   recipes=[CENTRE, CENTRE]))


def test_starsse_and_sse_on_the_command_line(tmp_path):
    from cli.main import cli

    common = ["train", "--model", "small_cnn", "--data", "digits", "--limit", "200", "--epochs", "1", "--batch-size",
              "64", "--no-progress", "--members", "2"]
    r = CliRunner().invoke(cli, [*common, "--out", str(tmp_path / "s"), "--method", "sse", "--branch-lr-ratio", "0.5",
                                 "--branch-epochs-ratio", "0.5"])
    assert r.exit_code == 0, r.output
    train = json.loads(merge.read_safetensors_metadata(tmp_path / "s" / "member-01.safetensors")[TRAIN_KEY])
    assert train["sse"]["branch_epochs_ratio"] == 0.5 and train["epochs"] == 0.5
    bad = CliRunner().invoke(cli, [*common, "--out", str(tmp_path / "x"), "--branch-lr-ratio", "2"])
    assert bad.exit_code == 2 and "'independent' does not take branch_lr_ratio" in bad.output
    listed = CliRunner().invoke(cli, ["train", "--list-methods"]).output
    assert "starsse" in listed and "sse" in listed and "late-phase" in listed and "Sadrtdinov" in listed
