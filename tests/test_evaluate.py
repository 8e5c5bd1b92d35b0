"""Metrics, prediction ensembles and checkpoint evaluation, against direct float64 numpy computations."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import merge
from cli.main import cli
from merge.errors import InvalidArgumentError, MismatchError, MissingMetadataError
from merge.evaluate import (
    CheckpointEvaluator,
    ensemble_probs,
    evaluate_checkpoints,
    format_table,
    load_into,
    metrics,
    metrics_from_probs,
    model_evaluator,
    predict,
    state_dict_scorer,
    summarize_members,
)
from merge.io.writer import write_state_dict
from merge.models import build_model
from tests.eval_fixtures import digits_splits, one_thread, stack, train_digit_members


# --------------------------------------------------------------------------------------------------
# Independent references: plain float64 numpy, loops where a loop is clearer.

def np_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def np_metrics(p: np.ndarray, y: np.ndarray, n_bins: int = 15) -> dict[str, float]:
    """Accuracy, NLL and ECE of probabilities, the textbook way (Guo et al., 2017)."""
    n = len(y)
    pred = p.argmax(axis=1)
    conf = p.max(axis=1)
    acc = float(np.mean(pred == y))
    nll = float(-np.mean(np.log(p[np.arange(n), y])))
    ece = 0.0
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = (conf > lo) & (conf <= hi)
        if in_bin.any():
            ece += in_bin.sum() / n * abs(np.mean(pred[in_bin] == y[in_bin]) - np.mean(conf[in_bin]))
    return {"acc": acc, "nll": nll, "ece": float(ece)}


def assert_metrics_close(got: dict[str, float], want: dict[str, float], tol: float = 1e-9) -> None:
    assert set(got) == {"acc", "nll", "ece"}
    for k in want:
        assert got[k] == pytest.approx(want[k], abs=tol, rel=tol), (k, got[k], want[k])


@pytest.fixture(scope="module")
def members(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    with one_thread():
        paths, _ = train_digit_members(tmp_path_factory.mktemp("digit-members"), 3)
    return paths


@pytest.fixture(autouse=True)
def _single_thread():
    with one_thread():
        yield


# --------------------------------------------------------------------------------------------------
# metrics

@pytest.mark.parametrize("n_bins", [1, 10, 15])
def test_metrics_equal_a_direct_numpy_computation(n_bins: int) -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(500, 7, generator=g) * 3
    labels = torch.randint(0, 7, (500,), generator=g)
    want = np_metrics(np_softmax(logits.double().numpy()), labels.numpy(), n_bins)
    assert_metrics_close(metrics(logits, labels, n_bins=n_bins), want)
    assert_metrics_close(metrics_from_probs(torch.softmax(logits.double(), 1), labels, n_bins=n_bins), want)


def test_metrics_on_a_hand_computed_case() -> None:
    # Two examples, both right; confidences 0.8808 and 0.7311 fall in different 15-bins.
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    m = metrics(logits, torch.tensor([0, 1]))
    c1, c2 = 1 / (1 + math.exp(-2)), 1 / (1 + math.exp(-1))
    assert m["acc"] == 1.0
    assert m["nll"] == pytest.approx(-(math.log(c1) + math.log(c2)) / 2, abs=1e-12)
    assert m["ece"] == pytest.approx(((1 - c1) + (1 - c2)) / 2, abs=1e-12)
    # One bin: |mean acc - mean conf| over everything.
    wrong = metrics(logits, torch.tensor([1, 1]), n_bins=1)
    assert wrong["acc"] == 0.5 and wrong["ece"] == pytest.approx(abs(0.5 - (c1 + c2) / 2), abs=1e-12)


def test_nll_stays_finite_and_exact_for_confident_mistakes() -> None:
    m = metrics(torch.tensor([[0.0, 1000.0]]), torch.tensor([0]))
    assert m["nll"] == pytest.approx(1000.0) and m["acc"] == 0.0 and m["ece"] == pytest.approx(1.0)


def test_metrics_reject_bad_shapes() -> None:
    with pytest.raises(InvalidArgumentError, match=r"expected 3 labels as a 1-D tensor, got shape \(2,\)"):
        metrics(torch.zeros(3, 2), torch.zeros(2, dtype=torch.long))
    with pytest.raises(InvalidArgumentError, match=r"expected a \(N, C\) tensor, got shape \(3,\)"):
        metrics(torch.zeros(3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(InvalidArgumentError, match="no examples"):
        metrics(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long))


def test_ensemble_probs_is_the_mean_of_softmaxes() -> None:
    g = torch.Generator().manual_seed(1)
    logits = [torch.randn(50, 4, generator=g) * 2 for _ in range(3)]
    want = np.mean([np_softmax(lg.double().numpy()) for lg in logits], axis=0)
    got = ensemble_probs(logits)
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-12)
    labels = torch.randint(0, 4, (50,), generator=g)
    assert_metrics_close(metrics_from_probs(got, labels), np_metrics(want, labels.numpy()))
    with pytest.raises(InvalidArgumentError, match=r"member 1 has logits of shape \(49, 4\)"):
        ensemble_probs([logits[0], logits[1][:49]])
    with pytest.raises(InvalidArgumentError, match="no members"):
        ensemble_probs([])


# --------------------------------------------------------------------------------------------------
# models

def test_predict_runs_in_eval_mode_and_restores_the_mode() -> None:
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 3))
    net.train()
    x = torch.randn(20, 4)
    batches = [(x[:7], torch.zeros(7)), (x[7:], torch.ones(13))]
    logits, labels = predict(net, batches)
    assert net.training  # restored
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(logits, net(x))  # eval mode: running stats, no dropout
    assert labels.tolist() == [0] * 7 + [1] * 13 and labels.dtype == torch.long
    with pytest.raises(InvalidArgumentError, match="yielded no batch"):
        predict(net, [])


def test_state_dict_scorer_loads_recalibrates_and_evaluates() -> None:
    net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    ev = model_evaluator([(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1]))])
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    sd["0.weight"] = torch.eye(2)
    sd["0.bias"] = torch.zeros(2)
    assert state_dict_scorer(net, ev)(sd) == 1.0
    sd["0.weight"] = torch.tensor([[0.0, 1.0], [1.0, 0.0]])  # swaps the classes
    assert state_dict_scorer(net, ev)(sd) == 0.0
    # With a recalibration loader, the statistics come from it (mean of the two inputs here).
    bn_batches = [(torch.tensor([[2.0, 0.0], [4.0, 2.0]]), torch.zeros(2))]
    state_dict_scorer(net, ev, bn_loader=bn_batches)(sd)
    torch.testing.assert_close(net[1].running_mean, torch.tensor([1.0, 3.0]))
    with pytest.raises(MismatchError, match=r"missing 1 tensors \(0.bias\)"):
        state_dict_scorer(net, ev)({k: v for k, v in sd.items() if k != "0.bias"})


def test_load_into_names_shape_mismatches() -> None:
    net = nn.Linear(3, 2)
    with pytest.raises(MismatchError, match=r"weight: checkpoint \(2, 4\) vs model \(2, 3\)"):
        load_into(net, {"weight": torch.zeros(2, 4), "bias": torch.zeros(2)})


# --------------------------------------------------------------------------------------------------
# checkpoints

def _direct_logits(path: Path, x: torch.Tensor) -> torch.Tensor:
    """The member's logits computed without merge.evaluate: build, load, eval, forward."""
    meta = merge.read_safetensors_metadata(path)
    spec = json.loads(meta["papa_merge.model"])
    model = build_model(spec["arch"], num_classes=spec["num_classes"], in_chans=spec["in_chans"], **spec["kwargs"])
    from safetensors.torch import load_file

    model.load_state_dict(load_file(path))
    model.eval()
    with torch.no_grad():
        return model(x).double()


def test_evaluate_checkpoints_equals_a_direct_computation(members: list[Path], tmp_path: Path) -> None:
    soup_path = merge.soup(members, out=tmp_path / "soup.safetensors").path
    rows = evaluate_checkpoints([*members, soup_path], split="both", batch_size=100)
    assert [r.kind for r in rows] == ["member"] * 3 + ["soup", "ensemble"]
    splits = digits_splits()
    for split in ("val", "test"):
        x, y = stack(getattr(splits, split))
        probs = []
        for row, path in zip(rows, [*members, soup_path]):
            p = np_softmax(_direct_logits(path, x).numpy())
            assert_metrics_close(row.metrics[split], np_metrics(p, y.numpy()), tol=1e-5)
            if path != soup_path:
                probs.append(p)
        assert_metrics_close(rows[-1].metrics[split], np_metrics(np.mean(probs, axis=0), y.numpy()), tol=1e-5)
    # The members are real: far above chance (10%).
    assert min(r.metrics["val"]["acc"] for r in rows) > 0.5


def test_summary_rows_and_table(members: list[Path]) -> None:
    rows = evaluate_checkpoints(members, split="val", ensemble=False)
    mean, lo, hi = summarize_members(rows)
    accs = [r.metrics["val"]["acc"] for r in rows]
    assert mean.metrics["val"]["acc"] == pytest.approx(np.mean(accs))
    assert lo.metrics["val"]["acc"] == min(accs) and hi.metrics["val"]["acc"] == max(accs)
    text = format_table([mean, *rows])
    assert text.splitlines()[0].split() == ["model", "val", "acc", "val", "nll", "val", "ece"]
    assert f"{100 * accs[0]:.2f}%" in text.splitlines()[2]


def test_data_name_reuses_the_members_split_seed(members: list[Path]) -> None:
    # The members were trained on digits with seed 0: naming the dataset must give the same val rows.
    ev = CheckpointEvaluator.from_checkpoints(members, data="digits")
    assert ev.splits.spec == digits_splits().spec
    assert np.array_equal(ev.splits.val.indices, digits_splits().val.indices)


@pytest.mark.filterwarnings("ignore::merge.errors.DefaultSplitWarning")  # data="digits" for a checkpoint without a split
def test_checkpoint_without_metadata_is_a_clear_error(members: list[Path], tmp_path: Path) -> None:
    bare = write_state_dict(merge.open_checkpoint(members[0]).state_dict(), tmp_path / "bare.safetensors")
    with pytest.raises(MissingMetadataError, match=r"bare.safetensors: has no 'papa_merge.model' metadata"):
        evaluate_checkpoints([members[0], bare])
    # Architecture present, data missing: the fix is to name the dataset.
    meta = {"papa_merge.model": merge.read_safetensors_metadata(members[0])["papa_merge.model"]}
    nodata = write_state_dict(merge.open_checkpoint(members[0]).state_dict(), tmp_path / "nodata.safetensors",
                              metadata=meta)
    with pytest.raises(MissingMetadataError, match=r"name the dataset \(pass data=\.\.\.\)") as info:
        evaluate_checkpoints([nodata])
    assert info.value.option == "data" and info.value.path == str(nodata) and "--" not in str(info.value)
    res = CliRunner().invoke(cli, ["eval", str(nodata)])
    assert res.exit_code == 1 and "name the dataset (pass --data)" in res.output
    rows = evaluate_checkpoints([nodata], data="digits", split="val")
    assert rows[0].metrics["val"]["acc"] > 0.5
    res = CliRunner().invoke(cli, ["eval", str(bare)])
    assert res.exit_code == 1
    assert "error: " in res.output and "has no 'papa_merge.model' metadata" in res.output


def test_eval_command_prints_the_table(members: list[Path]) -> None:
    res = CliRunner().invoke(cli, ["eval", *map(str, members), "--split", "test", "--batch-size", "64"])
    assert res.exit_code == 0, res.output
    rows = evaluate_checkpoints(members, split="test", batch_size=64)
    lines = res.output.splitlines()
    for row in rows:
        line = next(ln for ln in lines if ln.startswith(Path(row.name).name) or ln.startswith(row.name))
        assert f"{100 * row.metrics['test']['acc']:.2f}%" in line
        assert f"{row.metrics['test']['nll']:.4f}" in line
    assert any(ln.startswith("ensemble of 3 members") for ln in lines)
    bad = CliRunner().invoke(cli, ["eval", str(members[0]), "--split", "train"])
    assert bad.exit_code == 2 and "'train' is not one of" in bad.output


# --------------------------------------------------------------------------------------------------
# The split always comes from the members' metadata (issue 9: train rows leaked into val and test)

def _csv(path: Path, n: int = 200) -> Path:
    rng = np.random.default_rng(0)
    lines = ["text,label"] + [f"example number {i} word{rng.integers(50)},{['neg', 'pos', 'mid'][i % 3]}"
                              for i in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_path_spelled_differently_gets_the_members_own_split(tmp_path: Path, monkeypatch) -> None:
    from merge.data import load_dataset
    from merge.models import model_spec

    data_dir = tmp_path / "data"
    data_dir.mkdir()
    csv_file = _csv(data_dir / "d.csv")
    # The member trained on csv:<abs path> with its own split settings (seed 5, a quarter held out).
    trained = load_dataset(f"csv:{csv_file}", seed=5, val_fraction=0.25)
    assert trained.spec["dataset"] == f"csv:{csv_file.resolve()}"
    meta = {"papa_merge.model": json.dumps(model_spec("small_cnn", 3, in_chans=1, image_size=8)),
            "papa_merge.data": json.dumps(trained.spec)}
    member = write_state_dict({"w": torch.zeros(1)}, tmp_path / "m.safetensors", metadata=meta)
    monkeypatch.chdir(tmp_path)
    train_rows = set(trained.train.indices.tolist())
    for spelled in ("csv:data/d.csv", "csv:./data/../data/d.csv", f"csv:{csv_file}", None):
        ev = CheckpointEvaluator.from_checkpoints([member], data=spelled)
        # Row identity: the very val and test rows of the member's split, none of its training rows.
        assert np.array_equal(ev.splits.val.indices, trained.val.indices), spelled
        assert np.array_equal(ev.splits.test.indices, trained.test.indices), spelled
        assert not train_rows & (set(ev.splits.val.indices.tolist()) | set(ev.splits.test.indices.tolist()))
    # What the old code did (re-split with default settings) does leak: the test above would catch it.
    default = load_dataset("csv:data/d.csv")
    assert train_rows & set(default.val.indices.tolist()) and train_rows & set(default.test.indices.tolist())
    # Another dataset is refused, naming the members' own.
    with pytest.raises(InvalidArgumentError, match=r"data 'digits' is not the dataset .*m.safetensors was trained "
                                                   r"on \('csv:.*d.csv'\)") as info:
        CheckpointEvaluator.from_checkpoints([member], data="digits")
    assert info.value.option == "data" and info.value.choices == (f"csv:{csv_file.resolve()}",)
    other = _csv(data_dir / "e.csv", 90)
    with pytest.raises(InvalidArgumentError, match="is not the dataset"):
        CheckpointEvaluator.from_checkpoints([member], data=f"csv:{other}")
    res = CliRunner().invoke(cli, ["eval", str(member), "--data", "digits"])
    assert res.exit_code == 2 and f"(pass --data csv:{csv_file.resolve()})" in res.output
    # Members whose splits disagree are refused, naming the difference.
    meta2 = dict(meta, **{"papa_merge.data": json.dumps({**trained.spec, "seed": 6})})
    member2 = write_state_dict({"w": torch.zeros(1)}, tmp_path / "m2.safetensors", metadata=meta2)
    with pytest.raises(MismatchError, match=r"trained on different data splits \(seed: 5 vs 6\)"):
        CheckpointEvaluator.from_checkpoints([member, member2])


# --------------------------------------------------------------------------------------------------
# Checkpoints trained elsewhere (issue 12): a timm state dict saved with torch.save

@pytest.fixture(scope="module")
def timm_pths(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], list[dict]]:
    """Two timm models trained on digits with plain torch (same init, different orders), saved as .pth."""
    import timm

    out = tmp_path_factory.mktemp("timm-pth")
    splits = digits_splits()
    xs, ys = stack(splits.train)
    torch.manual_seed(0)
    init = timm.create_model("test_efficientnet", num_classes=10, in_chans=1).state_dict()
    paths, states = [], []
    with one_thread():
        for i in range(2):
            model = timm.create_model("test_efficientnet", num_classes=10, in_chans=1)
            model.load_state_dict(init)
            opt = torch.optim.Adam(model.parameters(), lr=3e-3)
            g = torch.Generator().manual_seed(i)
            model.train()
            for _ in range(2):
                perm = torch.randperm(len(xs), generator=g)
                for b in range(0, len(xs) - 63, 64):
                    idx = perm[b:b + 64]
                    loss = nn.functional.cross_entropy(model(xs[idx]), ys[idx])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
            states.append({k: v.clone() for k, v in model.state_dict().items()})
            torch.save(model.state_dict(), out / f"effnet-{i}.pth")
            paths.append(out / f"effnet-{i}.pth")
    return paths, states


def test_eval_of_a_timm_checkpoint_trained_elsewhere(timm_pths, tmp_path: Path) -> None:
    import timm

    paths, states = timm_pths
    splits = digits_splits()
    res = CliRunner().invoke(cli, ["eval", *map(str, paths), "--model", "timm:test_efficientnet", "--data", "digits",
                                   "--split", "test", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "the checkpoints record no data split" in res.output  # said, not silent
    x, y = stack(splits.test)
    probs = []
    for path, state in zip(paths, states):
        model = timm.create_model("test_efficientnet", num_classes=10, in_chans=1)
        model.load_state_dict(state)
        model.eval()
        with torch.no_grad():
            p = np_softmax(model(x).double().numpy())
        probs.append(p)
        want = np_metrics(p, y.numpy())
        line = next(ln for ln in res.output.splitlines() if ln.startswith(str(path)))
        assert f"{100 * want['acc']:.2f}%" in line and f"{want['nll']:.4f}" in line
        assert want["acc"] > 0.3  # trained: far above chance
    line = next(ln for ln in res.output.splitlines() if ln.startswith("ensemble of 2 members"))
    assert f"{np_metrics(np.mean(probs, axis=0), y.numpy())['nll']:.4f}" in line
    # Without --model the error names the fix.
    res = CliRunner().invoke(cli, ["eval", str(paths[0]), "--data", "digits"])
    assert res.exit_code == 1 and "has no 'papa_merge.model' metadata" in res.output and "(pass --model)" in res.output

    # Greedy soup of them: the soup records the architecture and split, so it evaluates without flags.
    out = tmp_path / "g.safetensors"
    res = CliRunner().invoke(cli, ["soup", "--greedy", *map(str, paths), "--model", "timm:test_efficientnet",
                                   "--data", "digits", "--recompute-bn", "3", "-o", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "members, val acc as stored:" in res.output
    rows = evaluate_checkpoints([out], split="val")
    kept = json.loads(merge.read_safetensors_metadata(out)["papa_merge.recipe"])["greedy"]
    assert f"{100 * rows[0].metrics['val']['acc']:.2f}%" in res.output.splitlines()[-2]
    assert kept["soup_score"] == rows[0].metrics["val"]["acc"]


def test_progress_bars_only_when_asked_and_on_stderr(members: list[Path]) -> None:
    # Off the terminal (as here) bars are off by default; --progress forces them, on stderr only.
    quiet = CliRunner().invoke(cli, ["eval", str(members[0]), "--split", "val", "--batch-size", "64"])
    assert quiet.exit_code == 0 and "evaluate on val" not in quiet.output
    shown = CliRunner().invoke(cli, ["eval", str(members[0]), "--split", "val", "--batch-size", "64", "--progress",
                                     "--recompute-bn", "2"])
    assert shown.exit_code == 0, shown.output
    assert "evaluate on val" in shown.stderr and "BatchNorm statistics" in shown.stderr
    assert "evaluate on val" not in shown.stdout
    assert "metrics after BatchNorm recomputation on 2 training batches of 64:" in shown.stdout


def test_eval_labels_the_batchnorm_batches_it_actually_used(members: list[Path]) -> None:
    # 1000 batches of 256 asked; the digits training split holds far fewer: the label says how many were used.
    import math

    n_train = len(digits_splits().train)
    res = CliRunner().invoke(cli, ["eval", str(members[0]), "--recompute-bn", "1000", "--split", "val"])
    assert res.exit_code == 0, res.output
    assert f"metrics after BatchNorm recomputation on {math.ceil(n_train / 256)} training batches of 256:" in res.output
