"""Hyperparameter ensembles end to end: the search, dropout, both selections, retraining, resume and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import merge
from cli.main import cli
from merge.data import load_dataset
from merge.errors import InvalidArgumentError
from merge.manifest import read_manifest
from merge.models import build_model
from merge.train import Recipe, TrainJob, run_method
from merge.train.hyper import (
    DROPOUT_RANGE,
    RETRAIN_SEED_OFFSET,
    DropoutRate,
    has_dropout,
    hyper_configs,
    set_dropout,
)
from tests.eval_fixtures import one_thread, stack
from tests.test_select import reference_greedy_selection


@pytest.fixture(autouse=True)
def _single_thread():
    with one_thread():
        yield


# --------------------------------------------------------------------------------------------------
# Step 1: the random search

def test_configs_start_from_the_default_and_draw_each_knob_on_its_scale() -> None:
    base = Recipe(lr=0.05, weight_decay=5e-4, epochs=2.0)
    cfgs = hyper_configs(40, base=base, seed=7)
    assert cfgs[0].recipe == Recipe(lr=0.05, weight_decay=5e-4, epochs=2.0, seed=7, data_seed=7)
    assert cfgs[0].dropout is None
    # Stratified: one seed per configuration, configuration i on seed 7 + i.
    assert [c.recipe.seed for c in cfgs] == list(range(7, 47)) and all(c.recipe.data_seed == c.recipe.seed for c in cfgs)
    rest = [c.recipe for c in cfgs[1:]]
    assert all(0.05 / 3 <= r.lr <= 0.15 and 5e-5 <= r.weight_decay <= 5e-3 and 1e-5 <= r.label_smoothing <= 0.2
               for r in rest)
    assert all(r.epochs == 2.0 and r.optimizer == base.optimizer for r in rest)  # untuned fields kept
    # Log-uniform: about half below the geometric midpoint of each range (a uniform draw puts ~1/4 below).
    assert 10 <= sum(r.label_smoothing < (1e-5 * 0.2) ** 0.5 for r in rest) <= 29
    assert 10 <= sum(r.weight_decay < 5e-4 for r in rest) <= 29
    assert all(c.dropout is None for c in cfgs)  # the network has no dropout
    assert hyper_configs(40, base=base, seed=7) == cfgs and hyper_configs(40, base=base, seed=8) != cfgs
    drop = hyper_configs(30, base=base, seed=7, dropout=True)
    assert drop[0].dropout is None and all(DROPOUT_RANGE[0] <= c.dropout <= DROPOUT_RANGE[1] for c in drop[1:])
    assert len({c.dropout for c in drop[1:]}) == 29
    assert hyper_configs(1, base=base, seed=3) == [cfgs[0].__class__(Recipe(**{**base.to_dict(), "seed": 3,
                                                                              "data_seed": 3}))]
    with pytest.raises(InvalidArgumentError, match="at least one configuration, got pool=0"):
        hyper_configs(0, base=base)


def test_dropout_is_set_where_the_network_has_it() -> None:
    cnn = build_model("small_cnn", num_classes=3, in_chans=1)
    assert not has_dropout(cnn) and set_dropout(cnn, 0.3) == 0
    effnet = build_model("timm:test_efficientnet", num_classes=3, in_chans=1)  # functional dropout: drop_rate
    assert has_dropout(effnet) and set_dropout(effnet, 0.4) >= 1 and effnet.drop_rate == 0.4
    vit = build_model("timm:test_vit", num_classes=3, in_chans=1, image_size=32)  # nn.Dropout layers
    layers = [m for m in vit.modules() if isinstance(m, nn.Dropout)]
    assert layers and set_dropout(vit, 0.25) >= len(layers) and all(m.p == 0.25 for m in layers)
    # It acts: in train mode a high rate changes the output between two passes; in eval mode it does not.
    x = torch.randn(2, 1, 32, 32)
    set_dropout(vit, 0.9)
    vit.train()
    assert not torch.equal(vit(x), vit(x))
    vit.eval()
    assert torch.equal(vit(x), vit(x))
    with pytest.raises(InvalidArgumentError, match=r"dropout must be in \[0, 1\), got 1.5"):
        set_dropout(vit, 1.5)

    class State:
        models = [cnn]
        log: dict = {}

    with pytest.raises(InvalidArgumentError, match="SmallCNN has no dropout layer"):
        DropoutRate(0.2).on_train_begin(State())


# --------------------------------------------------------------------------------------------------
# Steps 2 and 3 on real data (digits, a tiny budget), checked against the reference selection

def _val_test_probs(path: Path, splits) -> dict[str, np.ndarray]:
    """A member's softmax on val and test, computed without merge.evaluate: build, load, eval, forward."""
    meta = merge.read_safetensors_metadata(path)
    spec = json.loads(meta["papa_merge.model"])
    model = build_model(spec["arch"], num_classes=spec["num_classes"], in_chans=spec["in_chans"], **spec["kwargs"])
    model.load_state_dict(merge.open_checkpoint(path).state_dict())
    model.eval()
    out = {}
    with torch.no_grad():
        for split in ("val", "test"):
            x, _ = stack(getattr(splits, split))
            out[split] = torch.softmax(model(x).double(), dim=1).numpy()
    return out


def _train_record(path: Path) -> dict:
    return json.loads(merge.read_safetensors_metadata(path)["papa_merge.train"])


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("hyper")
    with one_thread():
        res = CliRunner().invoke(cli, ["train", "--model", "small_cnn", "--data", "digits", "--limit", "300",
                                       "--epochs", "2", "--pool", "4", "--select", "2", "--deep-seeds", "2",
                                       "--seed", "3", "-o", str(out), "--no-progress"])
    return out, res


@pytest.mark.slow  # the whole hyper-deep pipeline (the `run` fixture): pool, selection, retrained seeds
def test_train_pool_select_runs_the_hyper_deep_pipeline(run) -> None:
    out, res = run
    assert res.exit_code == 0, res.output
    splits = load_dataset("digits", limit=300)
    y = {s: np.asarray(getattr(splits, s).labels) for s in ("val", "test")}
    pool = [out / f"member-{i:02d}.safetensors" for i in range(4)]
    # Step 1: the pool is the default configuration then random ones, one seed each.
    recipes = [_train_record(p) for p in pool]
    assert [r["seed"] for r in recipes] == [3, 4, 5, 6]
    assert recipes[0]["lr"] == 0.05 and recipes[0]["label_smoothing"] == 0.0
    assert len({r["lr"] for r in recipes}) == 4 and all(r["hyper"]["stage"] == "pool" for r in recipes)
    probs = {p: _val_test_probs(p, splits) for p in pool}
    # Step 2: the manifest is the reference's greedy selection on the pool's val probabilities.
    first = read_manifest(out / "hyper-ensemble.json")
    want = reference_greedy_selection([probs[p]["val"] for p in pool], y["val"], 2)
    order = sorted(set(want), key=want.index)
    assert [Path(p).resolve() for p in first.paths] == [pool[i].resolve() for i in order]
    assert first.weights == [want.count(i) for i in order] and first.by == "nll" and first.size == 2
    # Step 3: each selected configuration over 2 seeds (its pool run + one retrained, the same seed for all).
    deep_dir = out / "hyper-deep"
    retrained = sorted(deep_dir.glob("member-*.safetensors"))
    assert len(retrained) == len(order)
    deep_pool = []
    for k, i in enumerate(order):
        again = _train_record(retrained[k])
        assert again["seed"] == again["data_seed"] == 3 + RETRAIN_SEED_OFFSET + 1
        for field in ("lr", "weight_decay", "label_smoothing", "epochs", "batch_size", "optimizer"):
            assert again[field] == recipes[i][field], field
        assert again["hyper"] == {"stage": "hyper-deep", "config": f"config {i}, seed {again['seed']}"}
        deep_pool += [pool[i], retrained[k]]
    for p in retrained:
        probs[p] = _val_test_probs(p, splits)
    second = read_manifest(out / "hyper-deep.json")
    assert [Path(p).resolve() for p in second.pool] == [p.resolve() for p in deep_pool]
    want2 = reference_greedy_selection([probs[p]["val"] for p in deep_pool], y["val"], 2)
    order2 = sorted(set(want2), key=want2.index)
    assert [Path(p).resolve() for p in second.paths] == [deep_pool[i].resolve() for i in order2]
    assert second.weights == [want2.count(i) for i in order2]
    # The reported test metrics of each ensemble are those of its weighted average of probabilities.
    for manifest, name in ((first, "hyper-ensemble"), (second, "hyper-deep")):
        ens = sum(w * probs[Path(p)]["test"] for p, w in zip(manifest.paths, manifest.weights)) / sum(manifest.weights)
        line = next(ln for ln in res.output.splitlines() if ln.startswith(f"{name}: ensemble of"))
        assert f"{100 * float(np.mean(ens.argmax(1) == y['test'])):.2f}%" in line
        nll = float(-np.mean(np.log(ens[np.arange(len(y["test"])), y["test"]])))
        assert f"{nll:.4f}" in line
        assert (out / f"{name}-greedy-soup.safetensors").is_file()
        assert any(ln.startswith(f"{name}: greedy soup of") for ln in res.output.splitlines())


@pytest.mark.slow  # reruns the whole hyper-deep pipeline of the `run` fixture
def test_rerun_resumes_and_options_are_checked(run, tmp_path: Path) -> None:
    out, res = run
    assert res.exit_code == 0, res.output
    files = sorted(out.glob("member-*.safetensors")) + sorted((out / "hyper-deep").glob("member-*.safetensors"))
    stamps = {p: p.stat().st_mtime_ns for p in files}
    again = CliRunner().invoke(cli, ["train", "--model", "small_cnn", "--data", "digits", "--limit", "300",
                                     "--epochs", "2", "--pool", "4", "--select", "2", "--deep-seeds", "2",
                                     "--seed", "3", "-o", str(out), "--no-progress"])
    assert again.exit_code == 0, again.output
    assert {p: p.stat().st_mtime_ns for p in files} == stamps  # nothing retrained
    table = lambda text: [ln for ln in text.splitlines() if ln.startswith("hyper-")]  # noqa: E731
    assert table(again.output) == table(res.output)
    # A pool option for a method that has none is refused by name, before any work.
    bad = CliRunner().invoke(cli, ["train", "--model", "small_cnn", "--data", "digits", "--method", "independent",
                                   "--pool", "4", "-o", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "training method 'independent' does not take pool" in bad.output
    job = TrainJob(model="small_cnn", data="digits", out_dir=tmp_path / "y", members=2, diversity="augment")
    with pytest.raises(InvalidArgumentError, match="hyperparameter ensembles draw their own diversity"):
        run_method("hyper-ensemble", job)
    with pytest.raises(InvalidArgumentError, match="does not take seeds"):
        run_method("hyper-ensemble", job, seeds=2)
    ok = TrainJob(model="small_cnn", data="digits", out_dir=tmp_path / "z", members=2)
    with pytest.raises(InvalidArgumentError, match="at least one seed; got seeds=0"):
        run_method("hyper-deep", ok, seeds=0)
    with pytest.raises(InvalidArgumentError, match="selection objective must be nll or acc, got 'ece'"):
        run_method("hyper-deep", ok, by="ece")
    assert not (tmp_path / "x").exists() and not (tmp_path / "z").exists()


@pytest.mark.filterwarnings("ignore::merge.errors.DifferentStartsWarning")  # a pool is one seed per configuration
def test_a_pool_of_a_network_with_dropout_draws_it(tmp_path: Path) -> None:
    # timm's EfficientNet applies dropout from drop_rate: the search draws it, the member records it.
    job = TrainJob(model="timm:test_efficientnet", data="digits", out_dir=tmp_path, members=3, limit=128,
                   base=Recipe(epochs=1.0, lr=0.01, optimizer="adamw", weight_decay=1e-4), progress=False, seed=1)
    res = run_method("hyper-ensemble", job, select=2)
    records = [json.loads(merge.read_safetensors_metadata(p)["papa_merge.train"]) for p in res.paths]
    assert records[0]["dropout"] is None  # the default configuration keeps the network's own
    drawn = [r["dropout"] for r in records[1:]]
    assert all(DROPOUT_RANGE[0] <= d <= DROPOUT_RANGE[1] for d in drawn) and len(set(drawn)) == 2
    want = hyper_configs(3, base=job.base, seed=1, dropout=True)
    assert drawn == [c.dropout for c in want[1:]]
    assert [r["lr"] for r in records] == [c.recipe.lr for c in want]
    sel = read_manifest(res.outputs["hyper-ensemble"])
    assert 1 <= len(sel.paths) <= 2 and set(sel.paths) <= {str(p) for p in res.paths}
    assert res.outputs["hyper-ensemble greedy soup"].is_file() and "hyper-ensemble: ensemble of" in res.report["table"]
