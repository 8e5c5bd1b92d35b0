"""The training-method registry: a method is one registered function with typed options, and the CLI
derives its flags from them, so a method defined here (one file, one registration) runs through
``papa-merge train --method NAME`` with its options and nothing else touched."""

from __future__ import annotations

import dataclasses
import json

import click
import pytest
from click.testing import CliRunner

import merge
from merge.errors import InvalidArgumentError
from merge.keys import TRAIN_KEY
from merge.params import Param
from merge.train import (
    TRAINING_METHODS,
    TrainJob,
    TrainResult,
    fit,
    get_method,
    member_path,
    methods_taking,
    prepare,
    register_method,
    run_method,
)
from merge.train.kit import build_member, evaluate_model, save_member, train_loader, train_record

NAME = "fixture-rounds"


def _train_rounds(job: TrainJob, *, rounds: int = 1, schedule: str = "flat", shuffle: bool = False) -> TrainResult:
    """Each member trained for ``rounds`` epochs with the kit, its options recorded in its metadata."""
    ready = prepare(job)
    paths = []
    for i, recipe in enumerate(ready.recipes):
        recipe = dataclasses.replace(recipe, epochs=float(rounds))
        net = build_member(ready.spec, recipe, job.pretrained, ready.device)
        state = fit([net], [train_loader(ready.splits, ready.spec, recipe)], [recipe],
                    num_classes=ready.spec["num_classes"], device=ready.device, progress=False)
        scores = evaluate_model(net, ready.splits, ready.spec, device=ready.device)
        record = train_record(recipe, state, method=NAME, pretrained=job.pretrained, device=ready.device,
                              extra={"rounds": rounds, "schedule": schedule, "shuffle": shuffle})
        paths.append(save_member(net, member_path(job.out_dir, i, arch=ready.spec["arch"]), ready.spec, ready.splits,
                                 record, scores, force=job.force))
    return TrainResult(paths, report={"rounds": rounds})


@pytest.fixture()
def fixture_method():
    register_method(NAME, citation="a test", summary="members trained for a number of rounds",
                    params=[Param("rounds", 1, int, low=1, high=3, help="epochs of each member"),
                            Param("schedule", "flat", str, choices=("flat", "steep"), help="a recorded choice"),
                            Param("shuffle", False, bool, help="a recorded switch")])(_train_rounds)
    yield NAME
    del TRAINING_METHODS[NAME]


def test_a_method_registered_in_one_place_runs_through_the_cli_with_its_options(fixture_method, tmp_path):
    from cli.main import cli

    args = ["train", "--model", "small_cnn", "--data", "digits", "--limit", "128", "--batch-size", "64",
            "--no-progress", "--members", "2", "--out", str(tmp_path / "run"), "--method", fixture_method]
    res = CliRunner().invoke(cli, [*args, "--rounds", "2", "--schedule", "steep", "--shuffle"])
    assert res.exit_code == 0, res.output
    train = json.loads(merge.read_safetensors_metadata(tmp_path / "run" / "member-01.safetensors")[TRAIN_KEY])
    assert (train["method"], train["rounds"], train["schedule"], train["shuffle"]) == (NAME, 2, "steep", True)
    assert train["epochs"] == 2.0 and train["steps"] == 2 * train["steps_per_epoch"]
    # Its declared domain is the flag's: refused by click before any work.
    bad = CliRunner().invoke(cli, [*args[:-4], "--out", str(tmp_path / "bad"), "--method", fixture_method,
                                   "--rounds", "4"])
    assert bad.exit_code == 2 and "--rounds" in bad.output and "4 is not in the range 1<=x<=3" in bad.output
    assert not (tmp_path / "bad").exists()
    # Another method's flag names the method it belongs to.
    other = CliRunner().invoke(cli, [*args[:-2], "--method", "independent", "--rounds", "2"])
    assert other.exit_code == 2
    assert f"rounds is an option of {NAME}: pass --method {NAME} with --rounds" in other.output, other.output
    # --list-methods and --method NAME --help show it with its options and defaults.
    listed = CliRunner().invoke(cli, ["train", "--list-methods"])
    assert f"{NAME}: members trained for a number of rounds" in listed.output
    assert "--rounds" in listed.output and "epochs of each member [default: 1]" in listed.output
    shown = CliRunner().invoke(cli, ["train", "--method", NAME, "--help"], terminal_width=200)
    assert shown.exit_code == 0 and "--rounds" in shown.output and "--schedule flat|steep" in shown.output
    assert "--papa-alpha" not in shown.output and "--late-phase-start" not in shown.output  # only its flags


def test_run_method_checks_options_by_their_declarations_before_any_work(fixture_method, tmp_path):
    job = TrainJob(model="small_cnn", data="no-such-dataset", out_dir=tmp_path / "x", members=1)
    with pytest.raises(InvalidArgumentError, match=r"parameter rounds must be in \[1, 3\], got 0"):
        run_method(NAME, job, rounds=0)
    with pytest.raises(InvalidArgumentError, match=r"parameter schedule must be flat or steep, got 'wild'"):
        run_method(NAME, job, schedule="wild")
    with pytest.raises(InvalidArgumentError, match=r"parameter rounds must be an integer, got 1.5"):
        run_method(NAME, job, rounds=1.5)
    with pytest.raises(InvalidArgumentError, match="does not take every; .* every is an option of papa") as e:
        run_method(NAME, job, every=3)
    assert (e.value.option, e.value.choices) == ("method", ("papa",))
    assert str(e.value).endswith("(pass method='papa')")
    assert not (tmp_path / "x").exists()  # the unknown dataset was never loaded
    assert get_method(NAME).check_options({"rounds": "2", "shuffle": "yes", "schedule": None}) == \
        {"rounds": 2, "shuffle": True}
    assert methods_taking("rounds") == [NAME] and methods_taking("branch_lr_ratio") == ["sse", "starsse"]


def test_every_registered_method_has_documented_options_that_become_flags() -> None:
    from cli.train_cmd import method_flag, method_options, train

    for name in merge.train.list_methods():
        m = get_method(name)
        assert m.citation and m.summary, name
        for p in m.params:
            assert p.help and p.kind in (bool, int, float, str), (name, p.name)
    ctx = click.Context(train)
    flags = {o.name: o.opts for o in method_options(list(TRAINING_METHODS.values()),
                                                   taken=[p.name for p in train.params])}
    # The flags users already type keep their names.
    assert flags["every"] == ["--papa-every"] and flags["copies"] == ["--late-phase"]
    assert flags["warm_start"] == ["--warm-start"] and method_flag("branch_lr_ratio") == "--branch-lr-ratio"
    assert {o.name for o in train.get_params(ctx)} >= set(flags)


def test_option_declarations_that_cannot_become_flags_are_refused() -> None:
    from cli.train_cmd import method_options

    class M:
        def __init__(self, name: str, *params: Param):
            self.name, self.params = name, params

    with pytest.raises(RuntimeError, match="declare option 'k' with different types"):
        method_options([M("a", Param("k", 1, int)), M("b", Param("k", 1.0, float))])
    with pytest.raises(RuntimeError, match="'epochs', a name `papa-merge train` already uses"):
        method_options([M("a", Param("epochs", 1, int))], taken=["epochs"])
    shared = method_options([M("a", Param("k", 1, int, help="h")), M("b", Param("k", 2, int, help="h"))])
    assert len(shared) == 1 and "--method a/b" in shared[0].help and "a 1, b 2" in shared[0].help
