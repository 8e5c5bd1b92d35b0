"""Merges that use data (RegMean, Fisher, AdaMerging) against float64 references written from the papers, and
the command line end to end on small CNNs trained on digits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from torch import nn

from cli.main import cli
from merge.datamerge import (Task, fisher_diagonal, input_grams, learn_coefficients, merge_with_data,
                             regmean_layers, softmax_entropy)
from merge.errors import InvalidArgumentError, MissingMetadataError
from merge.io.sources import open_checkpoint, read_safetensors_metadata
from merge.io.writer import write_state_dict
from merge.keys import DATA_KEY, MODEL_KEY, RECIPE_KEY
from merge.models import build_model
from merge.ops import get_operator
from tests.eval_fixtures import WIDTH, one_thread, train_digit_members


@pytest.fixture(autouse=True)
def _single_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], Path]:
    """Three small-CNN members trained on digits from one start, and that start saved as their base."""
    out = tmp_path_factory.mktemp("datamerge-digits")
    with one_thread():
        paths, _spec = train_digit_members(out, 3)
    torch.manual_seed(0)  # the start train_digit_members draws (init_seed 0)
    init = build_model("small_cnn", num_classes=10, in_chans=1, width=WIDTH).state_dict()
    meta = read_safetensors_metadata(paths[0])
    base = write_state_dict(init, out / "base.safetensors",
                            metadata={k: meta[k] for k in (MODEL_KEY, DATA_KEY)})
    return paths, base


# --------------------------------------------------------------------------------------------------------
# RegMean


def _one_layer_members(rng: np.random.Generator, n: int, d_in: int, d_out: int, rows: int):
    weights = [rng.standard_normal((d_out, d_in)) for _ in range(n)]
    inputs = [rng.standard_normal((rows, d_in)) * rng.uniform(0.5, 2.0, d_in) for _ in range(n)]
    return weights, inputs


def _grams_through_hooks(weights, inputs, batch: int = 7) -> list[torch.Tensor]:
    """Each member's Gram matrix as merge.datamerge computes it: its one-layer model run on its own batches."""
    grams = []
    for w, x in zip(weights, inputs):
        model = nn.Sequential(nn.Linear(w.shape[1], w.shape[0], bias=False)).double()
        model[0].weight.data = torch.from_numpy(w)
        xs = torch.from_numpy(x)
        g, rows = input_grams(model, [xs[i:i + batch] for i in range(0, len(xs), batch)])
        assert set(g) == {"0.weight"} and rows["0.weight"] == len(x)
        grams.append(g["0.weight"])
    return grams


@pytest.mark.parametrize("n", [1, 2, 4])
def test_regmean_is_the_least_squares_solution_over_the_members_concatenated_inputs(n: int) -> None:
    rng = np.random.default_rng(n)
    weights, inputs = _one_layer_members(rng, n, d_in=6, d_out=4, rows=40)
    grams = _grams_through_hooks(weights, inputs)
    got = get_operator("regmean")([torch.from_numpy(w) for w in weights], aux=[{"gram": g} for g in grams])
    # min_W sum_i |X_i W^T - X_i W_i^T|^2 over the stacked inputs (each member's rows as many: equal weight).
    x = np.concatenate(inputs)
    y = np.concatenate([xi @ wi.T for xi, wi in zip(inputs, weights)])
    want = np.linalg.lstsq(x, y, rcond=None)[0].T
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-9, atol=1e-10)
    if n == 1:
        np.testing.assert_allclose(got.numpy(), weights[0], rtol=1e-9, atol=1e-10)


def test_regmean_alpha_scales_the_off_diagonal_gram_entries() -> None:
    rng = np.random.default_rng(7)
    weights, inputs = _one_layer_members(rng, 3, d_in=5, d_out=3, rows=30)
    grams = [xi.T @ xi / len(xi) for xi in inputs]
    alpha = 0.3
    reduced = [g * alpha + np.diag(np.diag(g)) * (1 - alpha) for g in grams]
    want = np.linalg.solve(sum(reduced), sum(g @ w.T for g, w in zip(reduced, weights))).T
    got = get_operator("regmean")([torch.from_numpy(w) for w in weights],
                                  aux=[{"gram": torch.from_numpy(g)} for g in grams], alpha=alpha)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-9, atol=1e-10)
    # alpha = 0 keeps the diagonal alone: each output element is a Gram-diagonal-weighted mean of the members'.
    diag = [np.diag(g) for g in grams]
    want0 = sum(d * w for d, w in zip(diag, weights)) / sum(diag)
    got0 = get_operator("regmean")([torch.from_numpy(w) for w in weights],
                                   aux=[{"gram": torch.from_numpy(g)} for g in grams], alpha=0.0)
    np.testing.assert_allclose(got0.numpy(), want0, rtol=1e-9)


def test_regmean_on_conv1d_weights_stored_in_out_is_the_transpose() -> None:
    rng = np.random.default_rng(3)
    weights, inputs = _one_layer_members(rng, 2, d_in=4, d_out=4, rows=20)  # square: orientation matters
    grams = [torch.from_numpy(xi.T @ xi / len(xi)) for xi in inputs]
    linear = get_operator("regmean")([torch.from_numpy(w) for w in weights], aux=[{"gram": g} for g in grams])
    conv1d = get_operator("regmean")([torch.from_numpy(w.T.copy()) for w in weights],
                                     aux=[{"gram_in_out": g} for g in grams])
    np.testing.assert_allclose(conv1d.numpy(), linear.numpy().T, rtol=1e-12)


def test_regmean_takes_the_average_along_inputs_no_member_excites() -> None:
    rng = np.random.default_rng(5)
    weights, inputs = _one_layer_members(rng, 3, d_in=5, d_out=2, rows=25)
    for x in inputs:
        x[:, 2] = 0.0  # a dead input feature: the summed Gram matrix is singular
    grams = [torch.from_numpy(xi.T @ xi / len(xi)) for xi in inputs]
    got = get_operator("regmean")([torch.from_numpy(w) for w in weights], aux=[{"gram": g} for g in grams]).numpy()
    np.testing.assert_allclose(got[:, 2], np.mean([w[:, 2] for w in weights], axis=0), rtol=1e-9)
    live = [0, 1, 3, 4]
    x = np.concatenate([xi[:, live] for xi in inputs])
    y = np.concatenate([xi @ wi.T for xi, wi in zip(inputs, weights)])
    np.testing.assert_allclose(got[:, live], np.linalg.lstsq(x, y, rcond=None)[0].T, rtol=1e-8, atol=1e-10)


def test_regmean_averages_tensors_without_gram_matrices() -> None:
    a, b = torch.tensor([1.0, 2.0], dtype=torch.float64), torch.tensor([3.0, 6.0], dtype=torch.float64)
    got = get_operator("regmean")([a, b], aux=[{}, {}], weight=[3, 1])
    np.testing.assert_allclose(got.numpy(), [1.5, 3.0])


def test_regmean_layers_are_the_linear_layers_convolutions_averaged() -> None:
    model = build_model("small_cnn", num_classes=10, in_chans=1, width=WIDTH)
    layers = regmean_layers(model)
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert list(layers) == linear and not any(layers.values())
    assert not any(isinstance(m, nn.Conv2d) for n, m in model.named_modules() if n in layers)


# --------------------------------------------------------------------------------------------------------
# Fisher


def _np_softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _hand_fisher(w: np.ndarray, b: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Expected Fisher of softmax(W x + b) by hand: d log p_c / dW = (e_c - p) x^T, d log p_c / db = e_c - p."""
    fw, fb = np.zeros_like(w), np.zeros_like(b)
    for xi in x:
        p = _np_softmax(w @ xi + b)
        for c in range(len(p)):
            r = np.eye(len(p))[c] - p
            fw += p[c] * np.outer(r, xi) ** 2
            fb += p[c] * r ** 2
    return fw / len(x), fb / len(x)


def test_fisher_diagonal_and_merge_equal_a_hand_computation() -> None:
    rng = np.random.default_rng(0)
    members, fishers = [], []
    x = rng.standard_normal((9, 3))
    for _ in range(2):
        w, b = rng.standard_normal((4, 3)), rng.standard_normal(4)
        model = nn.Sequential(nn.Linear(3, 4)).double()
        model[0].weight.data, model[0].bias.data = torch.from_numpy(w), torch.from_numpy(b)
        f, n = fisher_diagonal(model, [torch.from_numpy(x[:5]), torch.from_numpy(x[5:])])
        fw, fb = _hand_fisher(w, b, x)
        assert n == 9
        np.testing.assert_allclose(f["0.weight"].numpy(), fw, rtol=1e-5, atol=1e-8)
        np.testing.assert_allclose(f["0.bias"].numpy(), fb, rtol=1e-5, atol=1e-8)
        members.append(w)
        fishers.append(fw)
    floor = 1e-3
    got = get_operator("fisher")([torch.from_numpy(w) for w in members],
                                 aux=[{"fisher": torch.from_numpy(f)} for f in fishers], fisher_floor=floor)
    fl = [np.maximum(f, floor) for f in fishers]
    np.testing.assert_allclose(got.numpy(), (fl[0] * members[0] + fl[1] * members[1]) / (fl[0] + fl[1]), rtol=1e-12)


def test_fisher_is_the_same_vectorised_and_one_example_at_a_time() -> None:
    torch.manual_seed(0)
    model = build_model("small_cnn", num_classes=10, in_chans=1, width=4).eval()
    x = torch.randn(6, 1, 8, 8)
    fast, _ = fisher_diagonal(model, [x])

    def no_vmap(m, inputs):  # a forward torch.func cannot vectorise (a Python branch on a tensor's value)
        if float(inputs.sum()) == float("inf"):
            raise AssertionError
        return m(inputs)

    slow, _ = fisher_diagonal(model, [x], forward=no_vmap)
    for k in fast:
        torch.testing.assert_close(fast[k], slow[k], rtol=1e-4, atol=1e-9)


# --------------------------------------------------------------------------------------------------------
# AdaMerging


def test_adamerging_entropy_decreases_on_its_own_batches() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5))
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    members = [{k: v + 0.5 * torch.randn_like(v) for k, v in base.items()} for _ in range(3)]
    batches = [torch.randn(32, 6)]
    coeffs = learn_coefficients(base, members, [Task(model, batches)], steps=25)
    assert coeffs.losses[-1] < coeffs.losses[0]
    assert all(0.0 <= c <= 1.0 for v in coeffs.values.values() for c in v)
    assert set(coeffs.values) == set(base) and all(len(v) == 3 for v in coeffs.values.values())
    # the loss recorded is the merged model's mean entropy: recompute it at the learned coefficients
    merged = {k: base[k] + sum(c * (m[k] - base[k]) for c, m in zip(coeffs.values[k], members)) for k in base}
    model.load_state_dict(merged)
    with torch.no_grad():
        assert float(softmax_entropy(model(batches[0])).mean()) == pytest.approx(coeffs.losses[-1], rel=1e-5)
    task_wise = learn_coefficients(base, members, [Task(model, batches)], steps=5, layer_wise=False)
    assert len({tuple(v) for v in task_wise.values.values()}) == 1


# --------------------------------------------------------------------------------------------------------
# merge_with_data and the command line on digits members


def test_regmean_merge_of_digit_members_is_written_with_its_recipe(digits, tmp_path: Path) -> None:
    paths, _base = digits
    res = merge_with_data(paths, out=tmp_path / "rm.safetensors", method="regmean", batches=2, batch_size=64,
                          accumulate="float64")
    recipe = json.loads(read_safetensors_metadata(res.path)[RECIPE_KEY])
    assert recipe["method"] == "regmean"
    assert recipe["data"] == {"split": "train", "batches": 2, "batch_size": 64, "datasets": ["digits"], "seed": 0}
    out = load_file(str(res.path))
    sds = [load_file(str(p)) for p in paths]
    # convolutions and BatchNorm averaged; the head is RegMean's solution from the members' own Gram matrices
    conv = next(k for k, v in out.items() if v.dim() == 4)
    torch.testing.assert_close(out[conv], sum(sd[conv] for sd in sds) / 3)
    head = next(k for k, v in out.items() if v.dim() == 2)
    assert not torch.allclose(out[head], sum(sd[head] for sd in sds) / 3, atol=1e-4)


def test_members_without_data_are_refused_naming_the_flag(digits, tmp_path: Path) -> None:
    paths, _ = digits
    bare = []
    for i, p in enumerate(paths[:2]):
        meta = read_safetensors_metadata(p)
        bare.append(write_state_dict(load_file(str(p)), tmp_path / f"bare-{i}.safetensors",
                                     metadata={MODEL_KEY: meta[MODEL_KEY]}))
    with pytest.raises(MissingMetadataError) as e:
        merge_with_data(bare, out=tmp_path / "x.safetensors", method="fisher")
    assert e.value.option == "data"
    res = CliRunner().invoke(cli, ["soup", "--method", "regmean", *map(str, bare), "-o", str(tmp_path / "x.safetensors")])
    assert res.exit_code == 1
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and "which method 'regmean' needs" in lines[0] and "(pass --data)" in lines[0], res.output
    assert not (tmp_path / "x.safetensors").exists()


def test_members_whose_model_cannot_be_built_are_refused_in_one_line(digits, tmp_path: Path) -> None:
    paths, _ = digits
    bare = [write_state_dict(load_file(str(p)), tmp_path / f"nomodel-{i}.safetensors") for i, p in enumerate(paths[:2])]
    res = CliRunner().invoke(cli, ["soup", "--method", "fisher", *map(str, bare), "--data", "digits",
                                   "-o", str(tmp_path / "x.safetensors")])
    assert res.exit_code == 1
    lines = [line for line in res.output.strip().splitlines() if not line.startswith("warning:")]
    assert len(lines) == 1 and "architecture" in lines[0] and "(pass --model)" in lines[0], res.output
    res = CliRunner().invoke(cli, ["soup", "--method", "fisher", *map(str, bare), "--data", "digits",
                                   "--model", "no_such_net", "-o", str(tmp_path / "x.safetensors")])
    errors = [line for line in res.output.strip().splitlines() if not line.startswith("warning:")]
    assert res.exit_code == 2 and len(errors) == 1 and "no_such_net" in errors[0], res.output


def test_data_methods_check_their_arguments_before_running_anything(digits, tmp_path: Path) -> None:
    paths, base = digits
    with pytest.raises(InvalidArgumentError) as e:
        merge_with_data(paths, out=tmp_path / "a.safetensors", method="adamerging")
    assert e.value.option == "base"
    with pytest.raises(InvalidArgumentError) as e:
        merge_with_data(paths, out=tmp_path / "a.safetensors", method="regmean", params={"alpha": 2})
    assert e.value.option == "alpha"
    with pytest.raises(InvalidArgumentError) as e:
        merge_with_data(paths, out=tmp_path / "a.safetensors", method="ties", base=base)
    assert e.value.option == "method"


@pytest.mark.parametrize("method", ["regmean", "fisher", "adamerging"])
def test_cli_soup_runs_each_data_method_end_to_end(digits, tmp_path: Path, method: str) -> None:
    paths, base = digits
    out = tmp_path / f"{method}.safetensors"
    args = ["soup", "--method", method, *map(str, paths), "-o", str(out), "--batches", "2", "--batch-size", "64"]
    if method == "adamerging":
        args += ["--base", str(base), "--param", "steps=3"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    assert f"wrote {out}" in res.output
    recipe = json.loads(read_safetensors_metadata(out)[RECIPE_KEY])
    assert recipe["method"] == method and recipe["data"]["batches"] == 2
    with open_checkpoint(out) as src, open_checkpoint(paths[0]) as first:
        assert {n: i.shape for n, i in src.infos.items()} == {n: i.shape for n, i in first.infos.items()}
    if method == "adamerging":
        rec = recipe["adamerging"]
        assert rec["granularity"] == "layer-wise" and rec["steps"] == 3
        sds, b, out_sd = [load_file(str(p)) for p in paths], load_file(str(base)), load_file(str(out))
        for name, cs in rec["coefficients"].items():
            want = b[name].double() + sum(c * (sd[name].double() - b[name].double()) for c, sd in zip(cs, sds))
            torch.testing.assert_close(out_sd[name].double(), want, rtol=1e-5, atol=1e-6)


def _block(listing: str, name: str) -> list[str]:
    """The lines of ``--list-methods`` about one method: its row and the indented lines under it."""
    lines = listing.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split(" ", 1)[0] == name)
    end = next((i for i in range(start + 1, len(lines)) if not lines[i].startswith(" ")), len(lines))
    return lines[start:end]


def test_list_methods_marks_the_methods_that_need_data() -> None:
    res = CliRunner().invoke(cli, ["soup", "--list-methods"])
    assert res.exit_code == 0
    for name, what in (("regmean", "input Gram"), ("fisher", "Fisher"), ("adamerging", "unlabeled held-out")):
        marked = [line for line in _block(res.output, name) if "needs data:" in line]
        assert len(marked) == 1 and what in marked[0], _block(res.output, name)
    assert not any("needs data:" in line for line in _block(res.output, "ties"))


@pytest.mark.filterwarnings("ignore::merge.errors.DifferentStartsWarning")  # random one-layer members
def test_regmean_through_the_engine_equals_least_squares_on_files(tmp_path: Path) -> None:
    """The streamed merge (the tensor path, each member's Gram matrix read from its own file) is the closed form."""
    import merge

    rng = np.random.default_rng(11)
    weights, inputs = _one_layer_members(rng, 3, d_in=6, d_out=5, rows=30)
    grams = _grams_through_hooks(weights, inputs)
    paths = [write_state_dict({"fc.weight": torch.from_numpy(w), "fc.bias": torch.full((5,), float(i))},
                              tmp_path / f"m{i}.safetensors") for i, w in enumerate(weights)]
    aux = [write_state_dict({"fc.weight:gram": g}, tmp_path / f"aux{i}.safetensors") for i, g in enumerate(grams)]
    with open_checkpoint(aux[0]) as a0, open_checkpoint(aux[1]) as a1, open_checkpoint(aux[2]) as a2:
        res = merge.soup(paths, out=tmp_path / "rm.safetensors", method="regmean", aux=[a0, a1, a2],
                         accumulate="float64", chunk_bytes=4096)
    out = load_file(str(res.path))
    x = np.concatenate(inputs)
    y = np.concatenate([xi @ wi.T for xi, wi in zip(inputs, weights)])
    np.testing.assert_allclose(out["fc.weight"].numpy(), np.linalg.lstsq(x, y, rcond=None)[0].T, rtol=1e-9,
                               atol=1e-10)
    np.testing.assert_allclose(out["fc.bias"].numpy(), np.ones(5))  # biases averaged, as the reference
    with pytest.raises(InvalidArgumentError, match=r"merge_with_data"):
        merge.soup(paths, out=tmp_path / "no-data.safetensors", method="regmean")


@pytest.mark.filterwarnings("ignore::merge.errors.DifferentStartsWarning")  # a backbone file records no start
def test_a_multitask_pool_runs_each_member_with_its_own_head_on_its_own_data(digits, tmp_path: Path) -> None:
    """Members whose heads differ in shape (one per task): each runs with its own model; the heads are skipped."""
    paths, base = digits
    meta = read_safetensors_metadata(paths[1])
    spec = json.loads(meta[MODEL_KEY])
    spec["num_classes"] = 12  # another task's head
    torch.manual_seed(1)
    wide = build_model("small_cnn", num_classes=12, in_chans=1, width=WIDTH).state_dict()
    sd = load_file(str(paths[1]))
    wide.update({k: v for k, v in sd.items() if not k.startswith("head.")})
    other = write_state_dict(wide, tmp_path / "task-b.safetensors",
                             metadata={MODEL_KEY: json.dumps(spec), DATA_KEY: meta[DATA_KEY]})
    backbone = write_state_dict({k: v for k, v in load_file(str(base)).items() if not k.startswith("head.")},
                                tmp_path / "backbone.safetensors")
    for method in ("fisher", "adamerging"):
        res = merge_with_data([paths[0], other], out=tmp_path / f"{method}.safetensors", method=method,
                              base=backbone if method == "adamerging" else None, batches=1, batch_size=32,
                              on_mismatch="skip", params={"steps": 2} if method == "adamerging" else None)
        out = load_file(str(res.path))
        assert "head.weight" not in out and "features.0.weight" in out, method
        assert sorted(res.skipped) == ["head.bias", "head.weight"]
