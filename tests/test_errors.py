"""Errors carry fields; the library spells fixes as arguments, the CLI as flags, through one table."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import merge
from cli.main import cli, cli_fix, format_error
from merge.errors import (
    CheckpointNotFoundError,
    MergeError,
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
