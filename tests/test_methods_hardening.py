"""Hardening of midpoint, interpolate, soup --recompute-bn and collapse (issue 25 items 2, 3, 5, 6, 14; issue 26 item 9).

Tiny untrained small CNNs on 200 training rows of sklearn digits: BatchNorm recomputation and evaluation
run in a fraction of a second, and the defects are about what is written, refused and printed.
"""

from __future__ import annotations

import errno
import json
import math
import signal
import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import merge
from cli.main import cli
from merge.collapse import collapse_checkpoint, copy_name
from merge.data import load_dataset
from merge.engine import NonFiniteError
from merge.errors import (
    CheckpointFormatError,
    InvalidArgumentError,
    MissingMetadataError,
    NonFiniteWarning,
    OutputExistsError,
)
from merge.evaluate import CheckpointEvaluator
from merge.interpolate import interpolate, midpoint, write_curve
from merge.io.atomic import Terminated
from merge.io.writer import write_state_dict
from merge.keys import DATA_KEY, MODEL_KEY, RECIPE_KEY, TRAIN_KEY
from merge.models import build_model, model_spec

WIDTH = 4
TRAIN_ROWS = 200  # one batch of 256, four of 64


@pytest.fixture(scope="module")
def members(tmp_path_factory) -> list[Path]:
    """Two small CNNs of one start (a little noise apart), recording architecture and data like papa-merge's."""
    out = tmp_path_factory.mktemp("members")
    splits = load_dataset("digits", seed=0, limit=TRAIN_ROWS)
    spec = model_spec("small_cnn", 10, in_chans=1, image_size=8, width=WIDTH)
    torch.manual_seed(0)
    init = build_model("small_cnn", num_classes=10, in_chans=1, width=WIDTH).state_dict()
    meta = {MODEL_KEY: json.dumps(spec), DATA_KEY: json.dumps(splits.spec)}
    paths = []
    for i in range(2):
        g = torch.Generator().manual_seed(i)
        sd = {k: v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in init.items()}
        paths.append(write_state_dict(sd, out / f"m{i}.safetensors", metadata=meta))
    return paths


@pytest.fixture(scope="module")
def bare(members, tmp_path_factory) -> Path:
    """members[1]'s weights with no papa-merge metadata (a checkpoint trained elsewhere)."""
    with merge.open_checkpoint(members[1]) as src:
        sd = src.state_dict()
    return write_state_dict(sd, tmp_path_factory.mktemp("bare") / "bare.safetensors")


def run(args: list[str]):
    return CliRunner().invoke(cli, args)


def hidden(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


# --- item 2: interpolate refuses existing outputs, --force replaces only its own, atomically ---------------------


def test_interpolate_refuses_an_existing_table_beside_the_plot_before_any_work(members, tmp_path, monkeypatch):
    docs = tmp_path / "docs"
    docs.mkdir()
    readme = docs / "README.md"
    readme.write_text("# my project\n")
    called = []
    import merge.interpolate as mi

    monkeypatch.setattr(mi, "interpolate", lambda *a, **k: called.append(1))
    for force in ([], ["--force"]):
        r = run(["interpolate", str(members[0]), str(members[1]), "-o", str(docs / "README.png"), *force])
        assert r.exit_code == 1, r.output
        assert f"error: {readme}" in r.output and "Traceback" not in r.output
        assert ("already exists" in r.output) and (("papa-merge did not write it" in r.output) == bool(force))
    assert readme.read_text() == "# my project\n" and not (docs / "README.png").exists()
    assert called == []  # refused before the evaluation
    # The library refuses the same, naming both files when both exist.
    (docs / "README.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(OutputExistsError, match=r"README.png and .*README.md: already exist"):
        mi.check_curve_outputs(docs / "README.png")
    with pytest.raises(OutputExistsError, match="papa-merge did not write it"):
        mi.check_curve_outputs(docs / "README.png", force=True)


def test_interpolate_force_replaces_only_its_own_earlier_curve(members, tmp_path):
    png = tmp_path / "line.png"
    args = ["interpolate", str(members[0]), str(members[1]), "-o", str(png), "--alphas", "0,1", "--bn-batches", "1",
            "--split", "val", "--batch-size", "64"]
    first = run(args)
    assert first.exit_code == 0, first.output
    table = png.with_suffix(".md").read_text().splitlines()
    assert table[0].startswith("<!-- written by papa-merge interpolate") and table[1] == "| alpha | val acc | val NLL |"
    again = run(args)
    assert again.exit_code == 1 and "line.png and" in again.output and "line.md: already exist" in again.output
    assert "(pass --force)" in again.output
    png.write_bytes(png.read_bytes())  # unchanged content, still recognised
    forced = run([*args, "--force"])
    assert forced.exit_code == 0, forced.output
    assert hidden(tmp_path) == []
    # A PNG papa-merge did not write is never replaced, even with --force.
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    r = run([*args, "--force"])
    assert r.exit_code == 1 and f"{png}: already exists and papa-merge did not write it" in r.output


def test_interpolate_full_disk_names_the_output(members, tmp_path, monkeypatch):
    import matplotlib.figure

    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", full)
    png = tmp_path / "full.png"
    r = run(["interpolate", str(members[0]), str(members[1]), "-o", str(png), "--alphas", "0", "--bn-batches", "1",
             "--split", "val", "--batch-size", "64"])
    assert r.exit_code == 1
    assert f"error: no space left on the device ({png})" in r.output
    assert list(tmp_path.iterdir()) == []


def test_the_curve_table_is_written_atomically_and_a_full_disk_names_it(members, tmp_path, monkeypatch):
    curve = interpolate(members[0], members[1], alphas=[0.0], bn_batches=1, batch_size=64, splits=["val"],
                        ensemble=False)
    real = Path.write_text

    def full(self, *a, **k):
        if self.name.startswith(".t.md"):
            real(self, "| alpha |")  # half a table, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(OSError) as e:
        write_curve(curve, tmp_path / "t.png")
    assert e.value.filename == str(tmp_path / "t.md")
    assert not (tmp_path / "t.md").exists() and hidden(tmp_path) == []


# --- item 3: nothing under the final name unless complete; checks before writing; hints of the command's own --------


def test_soup_recompute_bn_without_architecture_writes_nothing_and_names_its_own_fix(members, bare, tmp_path):
    out = tmp_path / "s.safetensors"
    r = run(["soup", str(bare), str(members[0]), "--recompute-bn", "2", "-o", str(out), "--no-progress"])
    assert r.exit_code == 1, r.output
    assert "bare.safetensors: has no 'papa_merge.model' metadata" in r.output
    assert "(pass --recompute-bn 0)" in r.output and "--model" not in r.output
    assert not out.exists() and hidden(tmp_path) == []
    # Fixed, the next run is not refused with "already exists".
    ok = run(["soup", *map(str, members), "--recompute-bn", "2", "--batch-size", "64", "-o", str(out), "--no-progress"])
    assert ok.exit_code == 0, ok.output


def test_soup_recompute_bn_with_another_dataset_writes_nothing(members, tmp_path):
    out = tmp_path / "s.safetensors"
    r = run(["soup", *map(str, members), "--recompute-bn", "2", "--data", "mnist", "-o", str(out), "--no-progress"])
    assert r.exit_code == 2 and "not the dataset" in r.output and "(pass --data digits)" in r.output
    assert not out.exists() and hidden(tmp_path) == []


def test_sigterm_during_the_batchnorm_pass_leaves_nothing_under_the_final_name(members, tmp_path, monkeypatch):
    import merge.bn

    def stopped(*a, **k):
        raise Terminated(signal.SIGTERM)  # what the atomic output's handler raises when SIGTERM arrives

    monkeypatch.setattr(merge.bn, "recompute_bn", stopped)
    out = tmp_path / "s.safetensors"
    r = run(["soup", *map(str, members), "--recompute-bn", "2", "-o", str(out), "--no-progress"])
    assert r.exit_code == 128 + signal.SIGTERM
    assert not out.exists() and hidden(tmp_path) == []
    with pytest.raises(Terminated):
        midpoint(members, out=tmp_path / "mid.safetensors", bn_batches=1, batch_size=64)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    again = run(["soup", *map(str, members), "--recompute-bn", "2", "-o", str(out), "--no-progress"])
    assert again.exit_code == 0, again.output


def test_soup_recompute_bn_output_is_the_average_with_recomputed_statistics(members, tmp_path):
    from merge.evaluate.checkpoints import soup_recompute_bn

    res = soup_recompute_bn(members, out=tmp_path / "s.safetensors", recompute_bn=2, batch_size=64)
    assert res.path == tmp_path / "s.safetensors" and res.files == [res.path]
    assert res.recipe["bn_recomputed"]["batches"] == 2
    ev = CheckpointEvaluator.from_checkpoints(members, batch_size=64)
    want = ev.model_with(merge.average(members), recompute_bn=2).state_dict()
    got = merge.open_checkpoint(res.path).state_dict()
    assert all(torch.equal(got[k], want[k]) for k in got)
    with pytest.raises(OutputExistsError):
        soup_recompute_bn(members, out=res.path, recompute_bn=2, batch_size=64)
    # force replaces its own earlier soup, once the new one is complete.
    again = soup_recompute_bn(members[::-1], out=res.path, recompute_bn=2, batch_size=64, force=True)
    assert json.loads(merge.read_safetensors_metadata(again.path)[RECIPE_KEY])["members"][0]["path"] == members[1].name
    assert hidden(res.path.parent) == []
    # --force may not replace a member, even one papa-merge wrote.
    from merge.errors import SameInputOutputError

    with pytest.raises(SameInputOutputError, match="would overwrite member 0"):
        soup_recompute_bn([res.path, members[0]], out=res.path, recompute_bn=2, batch_size=64, force=True)


def test_midpoint_and_interpolate_without_architecture_say_what_to_do_instead(members, bare, tmp_path):
    out = tmp_path / "mid.safetensors"
    r = run(["midpoint", str(members[0]), str(bare), "-o", str(out)])
    assert r.exit_code == 1 and "has no 'papa_merge.model' metadata" in r.output
    assert "--model" not in r.output and "merge.soup (papa-merge soup)" in r.output
    assert not out.exists()
    r = run(["interpolate", str(bare), str(members[0]), "-o", str(tmp_path / "c.png")])
    assert r.exit_code == 1 and "has no 'papa_merge.model' metadata" in r.output
    assert "--model" not in r.output and "papa-merge eval" in r.output
    with pytest.raises(MissingMetadataError) as e:
        midpoint([bare, members[0]], out=out)
    assert e.value.option is None and "model=" not in str(e.value)
    r = run(["midpoint", *map(str, members), "--data", "mnist", "-o", str(out)])
    assert r.exit_code == 2 and "(pass --data digits)" in r.output and not out.exists()
    assert list(tmp_path.iterdir()) == []


# --- issue 26 item 9: the number of BatchNorm batches actually used --------------------------------------------------


def test_batchnorm_labels_say_the_batches_actually_used(members, tmp_path):
    # 200 training rows are one batch of 256, whatever was asked for.
    out = tmp_path / "s.safetensors"
    r = run(["soup", *map(str, members), "--recompute-bn", "20", "-o", str(out), "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "recomputed BatchNorm statistics on 1 training batch of 256" in r.output
    assert json.loads(merge.read_safetensors_metadata(out)[RECIPE_KEY])["bn_recomputed"]["batches"] == 1
    mid = midpoint(members, out=tmp_path / "m.safetensors", bn_batches=20, batch_size=64)
    assert json.loads(merge.read_safetensors_metadata(mid)[RECIPE_KEY])["bn_recomputed"]["batches"] == math.ceil(
        TRAIN_ROWS / 64)
    curve = interpolate(members[0], members[1], alphas=[0.5], bn_batches=20, splits=["val"], ensemble=False)
    assert curve.bn_batches == 1
    from merge.greedy import greedy_soup_checkpoints

    res, _ = greedy_soup_checkpoints(members, out=tmp_path / "g.safetensors", recompute_bn=20)
    assert res.soup_label == "val acc, after BatchNorm recomputation on 1 training batches of 256"


# --- items 5, 6, 14: collapse of non-finite copies and impossible metadata ------------------------------------------

C, K = 3, 2


def late_phase(tmp_path: Path, *, copies=K, eps=1e-5, edit=None, dtype=torch.float32, name="lp") -> Path:
    """A tiny late-phase checkpoint: a shared weight, K copies of one BatchNorm layer and of a linear head."""
    g = torch.Generator().manual_seed(0)
    t: dict[str, torch.Tensor] = {"conv.weight": torch.randn(C, 1, generator=g)}
    for k in range(K):
        t[copy_name(k, "bn", "weight")] = 1 + 0.1 * torch.randn(C, generator=g)
        t[copy_name(k, "bn", "bias")] = 0.1 * torch.randn(C, generator=g)
        t[copy_name(k, "bn", "running_mean")] = torch.randn(C, generator=g)
        t[copy_name(k, "bn", "running_var")] = 0.5 + torch.rand(C, generator=g)
        t[copy_name(k, "head", "weight")] = torch.randn(2, C, generator=g)
        t[copy_name(k, "head", "bias")] = torch.randn(2, generator=g)
    t = {n: v.to(dtype) for n, v in t.items()}
    if edit is not None:
        edit(t)
    info = {"copies": copies, "modules": {"bn": {"kind": "batchnorm", "eps": eps}, "head": {"kind": "linear"}}}
    text = json.dumps({"late_phase": info}).replace('"copies": "INF"', '"copies": 1e400')
    return write_state_dict(t, tmp_path / f"{name}.safetensors", metadata={TRAIN_KEY: text})


def reference_bn(t: dict[str, torch.Tensor], eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """gamma and beta of the collapse, computed independently in float64 numpy-style arithmetic."""
    s = [t[copy_name(k, "bn", "weight")].double() / (t[copy_name(k, "bn", "running_var")].double() + eps).sqrt()
         for k in range(K)]
    b = [t[copy_name(k, "bn", "bias")].double() - s[k] * t[copy_name(k, "bn", "running_mean")].double()
         for k in range(K)]
    return sum(s) / K, sum(b) / K


def test_collapse_warns_about_a_nan_copy_and_carries_it_only_where_it_is(tmp_path):
    def nan(t):
        t[copy_name(1, "bn", "weight")][1] = float("nan")

    src = late_phase(tmp_path, edit=nan)
    with merge.open_checkpoint(src) as s:
        tensors = s.state_dict()
    with pytest.warns(NonFiniteWarning, match=r"copy 1 of bn.weight holds NaN or infinite values"):
        out = collapse_checkpoint(src, out=tmp_path / "out.safetensors")
    got = merge.open_checkpoint(out).state_dict()
    gamma, _ = reference_bn(tensors, 1e-5)
    assert torch.isnan(got["bn.weight"][1]) and torch.allclose(got["bn.weight"][[0, 2]].double(), gamma[[0, 2]])
    r = run(["collapse", str(src), "-o", str(tmp_path / "cli.safetensors")])
    assert r.exit_code == 0 and "warning: " in r.output and "copy 1 of bn.weight holds NaN" in r.output
    strict = run(["collapse", str(src), "-o", str(tmp_path / "strict.safetensors"), "--strict"])
    assert strict.exit_code == 1 and strict.output.startswith("error: ") and "copy 1 of bn.weight" in strict.output
    assert not (tmp_path / "strict.safetensors").exists()
    with pytest.raises(NonFiniteError, match="copy 1 of bn.weight"):
        collapse_checkpoint(src, out=tmp_path / "x.safetensors", strict=True)


def test_collapse_warns_about_a_negative_running_variance(tmp_path):
    def negative(t):
        t[copy_name(0, "bn", "running_var")][2] = -1.0

    src = late_phase(tmp_path, edit=negative)
    with pytest.warns(NonFiniteWarning, match=r"copy 0 of bn.running_var holds 1 negative variance"):
        out = collapse_checkpoint(src, out=tmp_path / "out.safetensors")
    got = merge.open_checkpoint(out).state_dict()
    assert torch.isnan(got["bn.weight"][2]) and torch.isfinite(got["bn.weight"][:2]).all()
    r = run(["collapse", str(src), "-o", str(tmp_path / "s.safetensors"), "--strict"])
    assert r.exit_code == 1 and "holds 1 negative variance" in r.output and not (tmp_path / "s.safetensors").exists()


def test_collapse_overflow_of_finite_copies_is_an_error(tmp_path):
    def huge(t):
        for k in range(K):
            t[copy_name(k, "bn", "weight")][0] = 60000.0
            t[copy_name(k, "bn", "running_var")][0] = 0.0

    src = late_phase(tmp_path, edit=huge, dtype=torch.float16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning: the copies are finite
        with pytest.raises(NonFiniteError, match="bn.weight: the collapse overflowed float16"):
            collapse_checkpoint(src, out=tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize(("copies", "eps", "field"), [
    (0, 1e-5, "'copies' is 0"),
    (-2, 1e-5, "'copies' is -2"),
    ("INF", 1e-5, "'copies' is inf"),
    (2.5, 1e-5, "'copies' is 2.5"),
    (True, 1e-5, "'copies' is True"),
    (K, -1, "'modules.bn.eps' is -1"),
    (K, 0, "'modules.bn.eps' is 0"),
    (K, None, "'modules.bn.eps' is None"),
])
def test_collapse_refuses_impossible_metadata_naming_the_field(tmp_path, copies, eps, field):
    src = late_phase(tmp_path, copies=copies, eps=eps)
    with pytest.raises(CheckpointFormatError, match=f"late-phase metadata field {field}"):
        collapse_checkpoint(src, out=tmp_path / "out.safetensors")
    r = run(["collapse", str(src), "-o", str(tmp_path / "out.safetensors")])
    assert r.exit_code == 1 and r.output.startswith("error: ") and len(r.output.strip().splitlines()) == 1
    assert field in r.output and "collapse_batchnorm" not in r.output and "bug" not in r.output
    assert not (tmp_path / "out.safetensors").exists()


def test_collapse_refuses_more_copies_than_the_checkpoint_holds_without_listing_them(tmp_path):
    from merge.errors import MismatchError

    src = late_phase(tmp_path, copies=10**6)
    with pytest.raises(MismatchError, match=f"records {10**6} copies of 2 module"):
        collapse_checkpoint(src, out=tmp_path / "out.safetensors")


def test_collapse_batchnorm_refuses_a_non_positive_eps():
    from merge.collapse import collapse_batchnorm

    one = [torch.ones(1)]
    with pytest.raises(InvalidArgumentError, match="eps must be a positive number, got -1"):
        collapse_batchnorm(one, one, one, one, eps=-1)
