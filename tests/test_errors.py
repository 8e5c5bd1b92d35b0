"""Errors carry fields; the library spells fixes as arguments, the CLI as flags, through one table."""

from __future__ import annotations

import errno
import warnings
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import merge
import merge.errors
from cli.main import cli, cli_fix, format_error
from merge.errors import (
    CheckpointNotFoundError,
    DifferentStartsWarning,
    MergeError,
    MergeWarning,
    MismatchError,
    MissingMetadataError,
    OutputExistsError,
    PapaMergeError,
    UnknownNameError,
)
from merge.io import schemes


def test_fields_and_both_spellings_of_the_fix() -> None:
    e = MismatchError("members disagree", path="a.safetensors", tensor="w", member=1, option="on_mismatch",
                      choices=("skip", "first"))
    assert (e.path, e.tensor, e.member, e.option) == ("a.safetensors", "w", 1, "on_mismatch")
    assert str(e) == "members disagree (pass on_mismatch='skip' or 'first')"
    assert e.format(cli_fix) == "members disagree (pass --on-mismatch skip|first)"
    assert isinstance(e, ValueError) and PapaMergeError is MergeError
    flag = OutputExistsError("x exists", option="force", choices=(True,))
    assert str(flag) == "x exists (pass force=True)" and flag.format(cli_fix) == "x exists (pass --force)"
    assert str(MergeError("plain")) == "plain"


def test_subclasses_keep_their_standard_behaviour() -> None:
    e = MissingMetadataError("no model metadata", path="p")
    assert str(e) == "no model metadata" and isinstance(e, KeyError)  # not quoted as KeyError would
    nf = CheckpointNotFoundError("p: no such file", path="p")
    assert isinstance(nf, FileNotFoundError) and str(nf) == "p: no such file"
    u = UnknownNameError("method", "tie", ["ties", "uniform"])
    assert u.valid == ["ties", "uniform"] and "valid methods: ties, uniform" in str(u) and u.exit_code == 2


def test_the_cli_table_tells_os_errors_with_the_path() -> None:
    full = OSError(errno.ENOSPC, "No space left on device", "/out/soup.safetensors")
    message, code = format_error(full)
    assert code == 1 and "/out/soup.safetensors" in message and "no space left" in message
    assert format_error(RuntimeError("boom")) is None  # a bug, reported as such


def test_mismatch_from_the_cli_names_the_flag_and_from_python_the_argument(tmp_path: Path) -> None:
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file({"w": torch.zeros(2)}, str(a))
    save_file({"w": torch.zeros(3)}, str(b))
    with pytest.raises(MismatchError) as info:
        merge.soup([a, b], out=tmp_path / "o.safetensors")
    assert info.value.tensor == "w" and "on_mismatch='skip'" in str(info.value) and "--" not in str(info.value)
    res = CliRunner().invoke(cli, ["soup", str(a), str(b), "-o", str(tmp_path / "o.safetensors")])
    assert res.exit_code == 1 and "pass --on-mismatch skip|first" in res.output


def test_reference_schemes_are_a_table_the_hub_registers_into(tmp_path: Path) -> None:
    assert "hf" in schemes.registered_schemes()  # import merge imports merge.hub, which registers hf://
    assert schemes.split_scheme("hf://org/name@v1") == ("hf", "org/name@v1")
    assert schemes.split_scheme(tmp_path / "a.safetensors") == (None, str(tmp_path / "a.safetensors"))
    f = tmp_path / "m.safetensors"
    save_file({"w": torch.arange(3.0)}, str(f))
    schemes.register_scheme("testfs", lambda ref: tmp_path / ref.split("://", 1)[1])
    try:
        with merge.open_checkpoint("testfs://m.safetensors") as src:
            assert torch.equal(src.read("w"), torch.arange(3.0))
    finally:
        schemes._SCHEMES.pop("testfs")
    with pytest.raises(CheckpointNotFoundError, match=r"no reader for nope:// references \(known: hf://\)"):
        merge.open_checkpoint("nope://x")


def test_every_warning_is_a_merge_warning_and_a_user_warning() -> None:
    exported = [getattr(merge.errors, n) for n in merge.errors.__all__]
    kinds = [c for c in exported if isinstance(c, type) and issubclass(c, Warning)]
    assert {c.__name__ for c in kinds} >= {"MergeWarning", "NonFiniteWarning", "DifferentStartsWarning",
                                           "WeakPullWarning", "DefaultSplitWarning"}
    assert [c for c in kinds if not (issubclass(c, MergeWarning) and issubclass(c, UserWarning))] == []
    # The modules that issue them still export them under the old paths, as the same classes.
    from merge.engine import NonFiniteWarning
    from merge.lineage import DifferentStartsWarning as from_lineage

    assert NonFiniteWarning is merge.errors.NonFiniteWarning and from_lineage is DifferentStartsWarning
    assert merge.MergeWarning is MergeWarning and merge.NonFiniteWarning is NonFiniteWarning


def test_the_cli_prints_a_merge_warning_as_one_line_and_others_as_python_does() -> None:
    @click.command("warn-twice")
    def warn_twice() -> None:
        warnings.warn("the members come from different starts", DifferentStartsWarning, stacklevel=1)
        warnings.warn("another library's warning", UserWarning, stacklevel=1)

    cli.add_command(warn_twice)
    try:
        # Python's own display of the other warning is what pytest records.
        with pytest.warns(UserWarning, match="another library's warning") as shown_by_python:
            res = CliRunner().invoke(cli, ["warn-twice"])
    finally:
        cli.commands.pop("warn-twice")
    assert res.exit_code == 0, res.output
    assert res.stderr == "warning: the members come from different starts\n"
    assert [w.category for w in shown_by_python] == [UserWarning]


@pytest.mark.parametrize("value, told", [(10 ** 400, "within float range, got an integer of 401 digits"),
                                         (10 ** 5000, "within float range, got an integer of over 4000 digits"),
                                         ("x" * 500, "must be a number, got 'xxxx")],
                         ids=["1e400", "1e5000", "long-string"])
def test_a_parameter_far_out_of_range_is_one_short_error(value, told):
    # From Python an integer past float's range raised a raw OverflowError; a long string printed whole.
    from merge.params import Param

    with pytest.raises(merge.errors.InvalidArgumentError) as e:
        Param("max_iter", 10, int, low=0).check(value, method="karcher")
    assert told in str(e.value) and len(str(e.value)) < 200
