"""merge.interpolate and `papa-merge midpoint` / `interpolate` (issue 8): points of a line, BatchNorm recomputed."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import merge
from merge.bn import recompute_bn
from merge.data import load_dataset
from merge.errors import InvalidArgumentError
from merge.evaluate import CheckpointEvaluator, ensemble_probs, metrics_from_probs, predict
from merge.interpolate import interpolate, line_weights, midpoint, write_curve
from merge.keys import METRICS_KEY
from merge.keys import RECIPE_KEY as RECIPE
from merge.train import Recipe, train_subspace

BN = 2
BS = 64


@pytest.fixture(scope="module")
def ends(tmp_path_factory):
    data = load_dataset("digits", seed=0, limit=256)
    out = tmp_path_factory.mktemp("ends")
    return train_subspace(Recipe(epochs=2, batch_size=32, lr=0.1, seed=7), model="small_cnn", data=data, out_dir=out,
                          bn_batches=BN, eval_batch_size=BS, progress=False)


def _sd(path):
    with merge.open_checkpoint(path) as src:
        return src.state_dict()


def test_interpolation_at_0_and_1_reproduces_the_endpoints_and_the_ensemble(ends):
    a, b = ends
    curve = interpolate(a, b, points=3, bn_batches=BN, batch_size=BS)
    assert [p.alpha for p in curve.points] == [0.0, 0.5, 1.0] and curve.bn_batches == BN
    for alpha, path in ((0.0, a), (1.0, b)):
        recorded = json.loads(merge.read_safetensors_metadata(path)[METRICS_KEY])
        for split in ("val", "test"):
            got = curve.at(alpha).metrics[split]
            assert got["acc"] == recorded[split]["acc"]
            assert got["nll"] == pytest.approx(recorded[split]["nll"], rel=1e-6)
    # Independently: each endpoint with its statistics recomputed on the same batches, probabilities averaged.
    ev = CheckpointEvaluator.from_checkpoints([a, b], batch_size=BS)
    logits = []
    for p in (a, b):
        model = ev.model_with(_sd(p), recompute_bn=BN)
        logits.append(predict(model, ev.loader("test")))
    want = metrics_from_probs(ensemble_probs([logits[0][0], logits[1][0]]), logits[0][1])
    assert curve.ensemble["test"] == pytest.approx(want)
    # The midpoint is not the endpoints' ensemble, and its statistics are its own (recomputed).
    assert curve.at(0.5).metrics["test"] != curve.at(0.0).metrics["test"]


def test_midpoint_weights_are_the_mean_of_the_endpoints_and_its_statistics_are_recomputed(ends, tmp_path):
    a, b = ends
    sa, sb = _sd(a), _sd(b)
    out = midpoint([a, b], out=tmp_path / "mid.safetensors", bn_batches=BN, batch_size=BS, device="cpu")
    mid = _sd(out)
    for name, t in mid.items():
        if "running" in name or "num_batches" in name:
            continue
        torch.testing.assert_close(t.double(), (sa[name].double() + sb[name].double()) / 2, rtol=0, atol=1e-6)
    naive = (sa["features.5.running_mean"] + sb["features.5.running_mean"]) / 2
    assert not torch.allclose(mid["features.5.running_mean"], naive, atol=1e-4)
    # Recomputed at the midpoint: the statistics of the averaged weights on the fixed training batches.
    ev = CheckpointEvaluator.from_checkpoints([a], batch_size=BS)
    model = ev.model_with({**mid})
    recompute_bn(model, ev.bn_loader(BN), num_batches=BN)
    torch.testing.assert_close(mid["features.5.running_mean"], model.state_dict()["features.5.running_mean"])
    recipe = json.loads(merge.read_safetensors_metadata(out)[RECIPE])
    assert recipe["subspace_point"]["coefficients"] == [0.5, 0.5] and recipe["bn_recomputed"]["batches"] == BN
    quarter = _sd(midpoint([a, b], out=tmp_path / "q.safetensors", alpha=0.25, bn_batches=BN, batch_size=BS))
    torch.testing.assert_close(quarter["head.weight"].double(),
                               0.75 * sa["head.weight"].double() + 0.25 * sb["head.weight"].double(), rtol=0,
                               atol=1e-6)


def test_bad_points_are_refused(ends, tmp_path):
    a, b = ends
    with pytest.raises(InvalidArgumentError, match=r"alpha must be in \[0, 1\]"):
        line_weights(1.5)
    with pytest.raises(InvalidArgumentError, match="alpha picks a point of a line between 2 checkpoints, got 3"):
        midpoint([a, b, a], out=tmp_path / "x.safetensors", alpha=0.5)
    with pytest.raises(InvalidArgumentError, match="at least 2 of them"):
        midpoint([a], out=tmp_path / "x.safetensors")
    with pytest.raises(InvalidArgumentError, match="points must be at least 2"):
        interpolate(a, b, points=1)
    with pytest.raises(InvalidArgumentError, match="end the path in .png"):
        write_curve(interpolate(a, b, alphas=[0.5], bn_batches=1, ensemble=False, splits=["val"]), tmp_path / "c.jpg")


def test_cli_midpoint_and_interpolate_write_the_point_the_table_and_the_plot(ends, tmp_path):
    from cli.main import cli

    a, b = ends
    r = CliRunner().invoke(cli, ["midpoint", str(a), str(b), "-o", str(tmp_path / "m.safetensors"), "--bn-batches",
                                 str(BN), "--batch-size", str(BS)])
    assert r.exit_code == 0, r.output
    assert "wrote" in r.output and "test acc" in r.output
    png = tmp_path / "curve.png"
    r = CliRunner().invoke(cli, ["interpolate", str(a), str(b), "-o", str(png), "--alphas", "0,0.5,1", "--bn-batches",
                                 str(BN), "--batch-size", str(BS), "--split", "test", "--json"])
    assert r.exit_code == 0, r.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = png.with_suffix(".md").read_text().splitlines()
    # First line: the mark by which a later --force knows papa-merge wrote it (an HTML comment, not rendered).
    assert table[0] == "<!-- written by papa-merge interpolate: member-00.safetensors -> member-01.safetensors -->"
    assert table[1] == "| alpha | test acc | test NLL |" and len(table) == 1 + 2 + 3 + 1
    assert table[3].startswith("| 0.00 | ") and table[-1].startswith("| ensemble of the endpoints | ")
    curve = json.loads(r.output.strip().splitlines()[-1])
    assert [p["alpha"] for p in curve["points"]] == [0.0, 0.5, 1.0] and curve["bn_batches"] == BN
    bad = CliRunner().invoke(cli, ["midpoint", str(a), str(b), str(a), "--alpha", "0.5", "-o",
                                   str(tmp_path / "z.safetensors")])
    assert bad.exit_code == 2 and "alpha picks a point of a line between 2 checkpoints, got 3" in bad.output
    bad = CliRunner().invoke(cli, ["interpolate", str(a), str(b), "-o", str(png), "--alphas", "0,x"])
    assert bad.exit_code == 2 and "comma-separated numbers" in bad.output


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_interpolation_on_the_gpu_matches_the_cpu(ends):
    a, b = ends
    cpu = interpolate(a, b, alphas=[0.5], bn_batches=BN, batch_size=BS, ensemble=False, splits=["test"])
    gpu = interpolate(a, b, alphas=[0.5], bn_batches=BN, batch_size=BS, ensemble=False, splits=["test"],
                      device="cuda")
    assert gpu.at(0.5).metrics["test"]["acc"] == pytest.approx(cpu.at(0.5).metrics["test"]["acc"], abs=0.01)
    assert gpu.at(0.5).metrics["test"]["nll"] == pytest.approx(cpu.at(0.5).metrics["test"]["nll"], rel=1e-3)
