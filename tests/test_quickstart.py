"""`papa-merge quickstart`, `examples/quickstart.py` and the eval command end to end, on real data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from click.testing import CliRunner

import merge
from cli.main import cli
from merge.evaluate import evaluate_checkpoints
from tests.eval_fixtures import one_thread

ROOT = Path(__file__).resolve().parent.parent


def _row(output: str, name: str) -> list[str]:
    """The six metric cells of the table row whose label starts with ``name``."""
    line = next(ln for ln in output.splitlines() if ln.startswith(name))
    return line[len(name):].split()[-6:]


@pytest.mark.slow  # the whole quickstart (start, members, soups, PAPA comparison, resume) at a reduced size
def test_quickstart_command_on_digits(tmp_path: Path) -> None:
    out = tmp_path / "qs"
    args = ["quickstart", "--data", "digits", "--members", "3", "--limit", "600", "--epochs", "2",
            "--recompute-bn", "4", "--out", str(out), "--members-table"]
    with one_thread():
        res = CliRunner().invoke(cli, args)
        assert res.exit_code == 0, res.output
        for name in ("members mean (3)", "members min (3)", "members max (3)", "ensemble of 3 members",
                     "uniform soup", "greedy soup", "member 0"):
            assert len(_row(res.output, name)) == 6, name  # acc nll ece on val and test
        # The PAPA comparison: the same recipes from scratch, independent and as a PAPA population.
        for who, avg in (("independent", "average.safetensors"), ("PAPA", "papa.safetensors")):
            for name in ("members mean (3)", "ensemble of 3 members", f"average ({avg})", "greedy soup ("):
                assert len(_row(res.output, f"{who}: {name}")) == 6, (who, name)
        indep = sorted((out / "independent").glob("member-*.safetensors"))
        papa = sorted((out / "papa").glob("member-*.safetensors"))
        assert len(indep) == len(papa) == 3
        rows = evaluate_checkpoints([*papa, out / "papa" / "papa.safetensors"])
        assert _row(res.output, "PAPA: average (papa.safetensors)")[3] == f"{100 * rows[3].metrics['test']['acc']:.2f}%"
        for a, b in zip(indep, papa):  # same recipes, trained two ways
            ra = json.loads(merge.read_safetensors_metadata(a)["papa_merge.train"])
            rb = json.loads(merge.read_safetensors_metadata(b)["papa_merge.train"])
            assert (ra["seed"], ra["mixup"], ra["cutmix"]) == (rb["seed"], rb["mixup"], rb["cutmix"])
            assert rb["method"] == "papa" and rb["papa"]["every"] == 1 and rb["papa"]["alpha"] == 0.95
        # The printed numbers are real: evaluating the written files again gives them.
        members = sorted((out / "members").glob("member-*.safetensors"))
        assert len(members) == 3
        rows = evaluate_checkpoints([*members, out / "uniform.safetensors", out / "greedy.safetensors"])
        for row, name in zip(rows, ["member 0", "member 1", "member 2", "uniform soup", "greedy soup"]):
            cells = _row(res.output, name)
            assert cells[0] == f"{100 * row.metrics['val']['acc']:.2f}%" and cells[4] == f"{row.metrics['test']['nll']:.4f}"
        recipe = json.loads(merge.read_safetensors_metadata(out / "greedy.safetensors")["papa_merge.recipe"])
        kept = recipe["greedy"]["ingredients"]
        if len(kept) > 1:
            assert recipe["bn_recomputed"]["batches"] == 4
        else:  # a member kept alone is written as stored (greedy soup scores it so), with its own statistics
            assert kept and "bn_recomputed" not in recipe and recipe["greedy"]["recompute_bn_batches"] == 0
        # Members trained from the shared start, which is recorded.
        train = json.loads(merge.read_safetensors_metadata(members[0])["papa_merge.train"])
        assert train["init"] == str(out / "start" / "member-00.safetensors")
        # Resume: a second run reuses the members instead of retraining them.
        stamps = [p.stat().st_mtime_ns for p in members]
        again = CliRunner().invoke(cli, args)
        assert again.exit_code == 0, again.output
        assert [p.stat().st_mtime_ns for p in members] == stamps


@pytest.mark.slow  # the quickstart twice at its smallest (the rerun itself takes a second)
def test_quickstart_rerun_reuses_the_recorded_evaluations_and_says_so(tmp_path: Path, monkeypatch) -> None:
    from merge.quickstart import run_quickstart
    from merge.train import report as report_mod

    kw = dict(data="digits", members=2, limit=200, epochs=0.5, recompute_bn=2, out=tmp_path / "qs")
    first_log: list[str] = []
    tables: list[str] = []
    with one_thread(), warnings.catch_warnings():
        warnings.simplefilter("error", merge.errors.DifferentStartsWarning)  # relabelled as a status line instead
        warnings.simplefilter("ignore", merge.errors.WeakPullWarning)  # a run this short pulls weakly: expected
        first = run_quickstart(**kw, log=first_log.append, on_rows=lambda part, rows: tables.append(part))
    assert tables == ["soups", "papa"]  # each table handed over as soon as it is known
    # What the run uses is said as it is: a subsample of the training images, never "the full" dataset.
    assert first_log[0] == "digits: 200 training images (a seeded subsample, limit 200); 143 val and 359 test images"
    demo = next(i for i, line in enumerate(first_log) if "independent" in line and "from scratch" in line)
    assert "the demonstration that members of different starts do not average" in first_log[demo]
    assert any(line.startswith("as expected for the demonstration: the members come from 2 different starts")
               for line in first_log[demo:])

    def no_evaluation(*_a, **_k):
        raise AssertionError("evaluated again")

    monkeypatch.setattr(report_mod, "evaluate_checkpoints", no_evaluation)
    monkeypatch.setattr(report_mod, "greedy_soup_checkpoints", no_evaluation)
    log: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing trained, nothing to warn about (a PAPA population found on disk)
        again = run_quickstart(**kw, log=log.append)
    assert again.table(with_members=True) == first.table(with_members=True)
    assert not any(line.startswith("training") for line in log), log
    assert log[1] == f"reusing the shared start {tmp_path / 'qs' / 'start' / 'member-00.safetensors'}"
    assert log[2] == f"reusing the 2 members in {tmp_path / 'qs' / 'members'}"
    assert sum(line.startswith("reusing the recorded soups and evaluation") for line in log) == 3, log


def test_quickstart_rejects_one_member(tmp_path: Path) -> None:
    res = CliRunner().invoke(cli, ["quickstart", "--members", "1", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "1 is not in the range x>=2" in res.output


@pytest.mark.slow  # the whole quickstart again, through the example script in a subprocess
def test_example_script_runs_at_a_tiny_size(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py"), "--data", "digits",
                           "--members", "3", "--limit", "400", "--out", str(tmp_path / "ex")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "greedy soup kept members [" in proc.stdout
    assert "ensemble of 3 members" in proc.stdout and "uniform.safetensors" in proc.stdout
    assert (tmp_path / "ex" / "greedy.safetensors").is_file()
    assert "average (papa.safetensors)" in proc.stdout and (tmp_path / "ex" / "papa" / "papa.safetensors").is_file()


@pytest.mark.slow
def test_quickstart_on_mnist_at_a_reduced_size(tmp_path: Path) -> None:
    """The README's command on MNIST with fewer members and images (the default size is the `full` test below)."""
    with one_thread():
        res = CliRunner().invoke(cli, ["quickstart", "--members", "2", "--limit", "6000", "--no-papa",
                                       "--out", str(tmp_path / "qs")])
    assert res.exit_code == 0, res.output
    members_min = float(_row(res.output, "members min (2)")[0].rstrip("%"))
    greedy = float(_row(res.output, "greedy soup (")[0].rstrip("%"))
    assert members_min > 85.0  # MNIST members that learned something (about 91% at this size)
    assert greedy >= members_min


@pytest.mark.slow
@pytest.mark.full  # the default size: minutes on a quiet machine, up to an hour on a loaded one (make test-quickstart)
def test_quickstart_on_mnist_defaults(tmp_path: Path) -> None:
    """The README's command at its default size on MNIST: real members, real soups."""
    res = CliRunner().invoke(cli, ["quickstart", "--out", str(tmp_path / "qs")])
    assert res.exit_code == 0, res.output
    members_min = float(_row(res.output, "members min (4)")[0].rstrip("%"))
    greedy = float(_row(res.output, "greedy soup (")[0].rstrip("%"))
    assert members_min > 90.0  # MNIST members that learned something
    assert greedy >= members_min
