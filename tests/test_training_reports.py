"""How training runs report (issue 26): every method ends with its table, a weak member is named, result lines
reach a pipe as they are printed, and a rerun reuses the recorded evaluation."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import merge
from cli.main import cli
from merge.evaluate import evaluate_checkpoints
from merge.keys import METRICS_KEY
from merge.train import report as report_mod
from merge.train.report import WeakMemberWarning, final_model, warn_weak_members, weak_members
from tests.eval_fixtures import digits_splits, one_thread, train_digit_members

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--model", "small_cnn", "--data", "digits", "--limit", "200", "--batch-size", "32", "--no-progress"]


def _row(output: str, name: str) -> list[str]:
    """The six metric cells of the table row whose label starts with ``name``."""
    line = next(ln for ln in output.splitlines() if ln.startswith(name))
    return line[len(name):].split()[-6:]


def _scored(tmp_path: Path, accs: list[float]) -> list[Path]:
    """Checkpoints that record only a val and test accuracy (what the weak-member check reads)."""
    paths = []
    for i, acc in enumerate(accs):
        m = {s: {"acc": acc, "nll": 1.0, "ece": 0.1} for s in ("val", "test")}
        paths.append(merge.write_state_dict({"w": torch.zeros(2)}, tmp_path / f"member-{i:02d}.safetensors",
                                            metadata={METRICS_KEY: json.dumps(m)}))
    return paths


# --- a member far below the others is named ----------------------------------------------------------------------

def test_weak_members_are_far_below_the_median_of_the_others():
    assert weak_members([0.35, 0.80, 0.87]) == [0]  # the README's StarSSE centre among its cycles
    assert weak_members([0.80, 0.35, 0.36, 0.87, 0.85]) == [1, 2]  # two weak members do not hide each other
    assert weak_members([0.78, 0.80, 0.87]) == []  # a spread of a few points is not weakness
    assert weak_members([0.10, 0.12]) == []  # both near chance: 2 points apart
    assert weak_members([0.9]) == []


def test_the_warning_names_the_member_its_score_the_others_range_and_the_fix(tmp_path):
    paths = _scored(tmp_path, [0.35, 0.80, 0.87])
    with pytest.warns(WeakMemberWarning) as caught:
        weak = warn_weak_members(paths, names=["member-00 (centre)", "member-01", "member-02"],
                                 fixes={0: "train the centre longer"})
    assert weak == [0] and len(caught) == 1
    assert str(caught[0].message) == ("member-00 (centre) scores 35.0% val accuracy while the other 2 members score "
                                      "80.0-87.0%; the ensemble and the soups average it all the same: train the "
                                      "centre longer")
    assert issubclass(WeakMemberWarning, merge.errors.MergeWarning)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert warn_weak_members(_scored(tmp_path / "ok", [0.78, 0.80, 0.87])) == []


# --- every method ends with its table ----------------------------------------------------------------------------

@pytest.mark.slow  # five training runs through the command line
@pytest.mark.parametrize("method, rows", [
    ("starsse", ["members mean (3)", "ensemble of 3 members", "uniform soup (average.safetensors)", "greedy soup (",
                 "member-00 (centre)", "member-01 (cycle 1)", "member-02 (cycle 2)"]),
    ("sse", ["members mean (3)", "ensemble of 3 members", "uniform soup (average.safetensors)", "greedy soup (",
             "member-00 (centre)", "member-02 (cycle 2)"]),
    ("independent", ["members mean (3)", "members min (3)", "members max (3)", "ensemble of 3 members",
                     "uniform soup (average.safetensors)", "greedy soup ("]),
    ("late-phase", ["collapsed members mean (3)", "ensemble of 3 members"]),
    ("subspace", ["endpoints mean (3)", "ensemble of 3 members", "centre (centre.safetensors)"]),
])
def test_every_method_ends_with_the_table_of_its_members_ensemble_and_soups(tmp_path, method, rows):
    out = tmp_path / method
    extra = {"starsse": ["--epochs", "0.2", "--branch-epochs-ratio", "5"], "sse": ["--epochs", "0.5"],
             "late-phase": ["--epochs", "0.5", "--late-phase", "2"]}.get(method, ["--epochs", "0.5"])
    with one_thread():
        r = CliRunner().invoke(cli, ["train", *TINY, "--members", "3", "--method", method, "--out", str(out), *extra])
    assert r.exit_code == 0, r.output
    for name in rows:
        assert len(_row(r.output, name)) == 6, (method, name)  # acc nll ece on val and test
    assert "metrics: " in r.output  # how the rows were scored, above the table
    # Member lines in percentages, as the table prints accuracy.
    assert re.search(r"member-00\S*  val acc \d+\.\d\d% nll \d\.\d{4}  test acc \d+\.\d\d%", r.output), r.output
    if method == "late-phase":  # members from their own initialisations: no soup, and the table says why
        assert "no soups: the members come from different starts" in r.output and "uniform soup" not in r.output
    soup = {"subspace": "centre.safetensors", "late-phase": None}.get(method, "average.safetensors")
    if soup:  # the printed soup row is the written soup, evaluated again
        label = "centre (centre.safetensors)" if method == "subspace" else "uniform soup (average.safetensors)"
        row = evaluate_checkpoints([out / soup], split="test")[0]
        assert _row(r.output, label)[3] == f"{100 * row.metrics['test']['acc']:.2f}%"
    if method == "starsse":  # a centre trained a fifth of an epoch, its cycles one epoch each: named
        assert re.search(r"warning: member-00 \(centre\) scores \d+\.\d% val accuracy while the other 2 members "
                         r"score \d+\.\d-\d+\.\d%; .*: train the centre longer", r.output), r.output


# --- a rerun reuses the recorded evaluation -----------------------------------------------------------------------

def test_final_model_reuses_its_recorded_evaluation_until_a_member_changes(tmp_path, monkeypatch):
    paths, _ = train_digit_members(tmp_path / "m", 2, epochs=1)
    splits = digits_splits()
    lines: list[str] = []
    with one_thread():
        outputs, first = final_model(paths, out_dir=tmp_path, data=splits, recompute_bn=2, log=lines.append,
                                     average_name="average.safetensors")
    assert first["reused"] is False and (tmp_path / "average.eval.json").is_file()
    stamps = {k: p.stat().st_mtime_ns for k, p in outputs.items()}

    def no_evaluation(*_a, **_k):
        raise AssertionError("evaluated again")

    monkeypatch.setattr(report_mod, "evaluate_checkpoints", no_evaluation)
    monkeypatch.setattr(report_mod, "greedy_soup_checkpoints", no_evaluation)
    lines.clear()
    again_outputs, again = final_model(paths, out_dir=tmp_path, data=splits, recompute_bn=2, log=lines.append,
                                       average_name="average.safetensors")
    assert again["reused"] is True and again["table"] == first["table"] and again["rows"] == first["rows"]
    assert again_outputs == outputs and {k: p.stat().st_mtime_ns for k, p in outputs.items()} == stamps
    assert len(lines) == 1 and lines[0].startswith("reusing the recorded soups and evaluation")
    # Other options, or a member rewritten, are evaluated afresh.
    with pytest.raises(AssertionError, match="evaluated again"):
        final_model(paths, out_dir=tmp_path, data=splits, recompute_bn=3, average_name="average.safetensors")
    os.utime(paths[1], ns=(time.time_ns(), time.time_ns() + 10**9))
    with pytest.raises(AssertionError, match="evaluated again"):
        final_model(paths, out_dir=tmp_path, data=splits, recompute_bn=2, average_name="average.safetensors")


# --- results reach a pipe as they are printed ---------------------------------------------------------------------

def test_result_lines_are_flushed_when_stdout_is_not_a_terminal(monkeypatch):
    from cli.util import echo_result

    raw = io.BytesIO()
    stdout = io.TextIOWrapper(raw, encoding="utf-8", write_through=False)  # block-buffered, as a pipe is
    monkeypatch.setattr(sys, "stdout", stdout)
    echo_result("member-00.safetensors  val acc 95.78%")
    assert raw.getvalue() == b"member-00.safetensors  val acc 95.78%\n"


@pytest.mark.slow  # a training run in a subprocess (its imports alone take seconds)
def test_a_pipe_sees_each_member_line_while_the_run_goes_on(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # stdout to a pipe: block-buffered
    env["OMP_NUM_THREADS"] = "1"
    # Independent members, one after the other: member 0's line is due while member 1 still trains.
    cmd = [sys.executable, "-c", "from cli.main import cli; cli()", "train", *TINY, "--members", "2", "--epochs", "2",
           "--out", str(tmp_path / "run")]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        first = proc.stdout.readline()
        # The line came while the run still had member 1 and the table to make (before the fix, every member line
        # was printed once all members were written).
        alive, second_written = proc.poll() is None, (tmp_path / "run" / "member-01.safetensors").exists()
        rest = proc.stdout.read()
    finally:
        proc.wait(timeout=300)
    assert proc.returncode == 0
    assert first.startswith(str(tmp_path / "run" / "member-00.safetensors")) and "val acc" in first, first
    assert alive and not second_written, "the first member line arrived only when the members were all written"
    assert "member-01.safetensors" in rest and "members mean (2)" in rest


# --- a small-CNN folder says what it holds ------------------------------------------------------------------------

def test_a_small_cnn_folder_has_a_config_json_describing_the_architecture(tmp_path):
    from merge.keys import MODEL_KEY
    from merge.models import build_model, load_member, model_spec
    from merge.models.export import write_member

    spec = model_spec("small_cnn", 3, in_chans=1, image_size=8, width=8)
    net = build_model("small_cnn", num_classes=3, in_chans=1, width=8)
    out = write_member(net.state_dict(), tmp_path / "member-00", spec=spec,
                       metadata={MODEL_KEY: json.dumps(spec, sort_keys=True)}, classes=["a", "b", "c"])
    config = json.loads((out / "config.json").read_text())
    assert config["papa_merge_model"] == spec and config["label_names"] == ["a", "b", "c"]
    assert (config["arch"], config["num_classes"], config["in_chans"], config["image_size"], config["kwargs"]) == \
        ("small_cnn", 3, 1, 8, {"width": 8})
    assert "load_member" in config["load_with"]
    # Neither a timm nor a transformers config (model cards tell libraries apart by these keys).
    assert not {"architecture", "architectures", "model_type"} & set(config)
    model, _ = load_member(out)
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(model(x), net.eval()(x))


def test_the_table_says_the_batchnorm_batches_actually_used(tmp_path: Path) -> None:
    # 20 batches of 256 asked; the digits training split holds ceil(n / 256): the label and the record say that.
    import math

    with one_thread():
        paths, _ = train_digit_members(tmp_path / "m", 2)
        outputs, report = final_model(paths, out_dir=tmp_path / "run", greedy=False, recompute_bn=20)
    used = math.ceil(len(digits_splits().train) / 256)
    assert used < 20
    assert report["recompute_bn_batches"] == used
    assert report["scoring"] == f"members as stored; soups after BatchNorm recomputation on {used} training batches of 256"
    recipe = json.loads(merge.read_safetensors_metadata(outputs["average"])["papa_merge.recipe"])
    assert recipe["bn_recomputed"]["batches"] == used
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if p.name.startswith(".")) == []  # no temporary left
