"""Every bad input gets one clear line, a non-zero exit, and no output file (through the CLI and the API)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import merge
from cli.main import cli
from tests.ckpt_factory import member_state, save_members


class Payload:
    """Any object beyond tensors and containers needs code to unpickle."""


def run(args: list[str]) -> tuple[int, str]:
    res = CliRunner().invoke(cli, args)
    return res.exit_code, res.output


def _no_output(folder: Path, name: str) -> None:
    assert not (folder / name).exists()
    assert not [p.name for p in folder.iterdir() if p.name.startswith(f".{name}")], "temporary output left behind"


@pytest.fixture
def members(tmp_path: Path) -> list[Path]:
    return save_members(tmp_path, 2)[0]


def test_mismatched_shape_lists_each_members_shape(tmp_path: Path, members: list[Path]) -> None:
    sd = member_state(5)
    sd["classifier.bias"] = torch.zeros(11)
    save_file(sd, str(tmp_path / "bad.safetensors"))
    code, out = run(["soup", *map(str, members), str(tmp_path / "bad.safetensors"), "-o", str(tmp_path / "o.safetensors")])
    assert code == 1
    assert "classifier.bias: [0] [10] float32; [1] [10] float32; [2] [11] float32" in out
    assert "--on-mismatch" in out and "Traceback" not in out
    _no_output(tmp_path, "o.safetensors")


def test_missing_key_and_dtype_mismatch(tmp_path: Path, members: list[Path]) -> None:
    sd = member_state(5)
    del sd["classifier.weight"]
    sd["scale"] = sd["scale"].double()
    save_file(sd, str(tmp_path / "bad.safetensors"))
    with pytest.raises(merge.MismatchError) as e:
        merge.soup([*members, tmp_path / "bad.safetensors"], out=tmp_path / "o.safetensors")
    msg = str(e.value)
    assert "2 tensor(s)" in msg
    assert "classifier.weight: [0] [10, 30] float32; [1] [10, 30] float32; [2] missing" in msg
    assert "scale: [0] [] float32; [1] [] float32; [2] [] float64" in msg
    _no_output(tmp_path, "o.safetensors")


@pytest.mark.filterwarnings("ignore::merge.errors.DifferentStartsWarning")  # the factory's members share no start
def test_on_mismatch_skip_and_first(tmp_path: Path, members: list[Path]) -> None:
    sd = member_state(5)
    sd["classifier.bias"] = torch.zeros(11)
    del sd["scale"]
    save_file(sd, str(tmp_path / "bad.safetensors"))
    inputs = [*members, tmp_path / "bad.safetensors"]
    skip = merge.soup(inputs, out=tmp_path / "skip.safetensors", on_mismatch="skip")
    assert sorted(skip.skipped) == ["classifier.bias", "scale"]
    with merge.open_checkpoint(skip.path) as src:
        assert "classifier.bias" not in src.infos and "classifier.weight" in src.infos
    first = merge.soup(inputs, out=tmp_path / "first.safetensors", on_mismatch="first")
    with merge.open_checkpoint(first.path) as src:
        assert torch.equal(src.read("classifier.bias"), member_state(0)["classifier.bias"])
    assert sorted(first.recipe["copied_from_first"]) == ["classifier.bias", "scale"]


@pytest.mark.parametrize("kind", ["truncated", "garbage", "empty", "lying-header"])
def test_corrupt_files(tmp_path: Path, members: list[Path], kind: str) -> None:
    bad = tmp_path / "bad.safetensors"
    raw = members[0].read_bytes()
    if kind == "truncated":
        bad.write_bytes(raw[: len(raw) - 100])
    elif kind == "garbage":
        bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" + bytes(64))
    elif kind == "empty":
        bad.write_bytes(b"")
    else:  # header length larger than the file
        bad.write_bytes((10**9).to_bytes(8, "little") + raw[8:])
    code, out = run(["soup", str(members[0]), str(bad), "-o", str(tmp_path / "o.safetensors")])
    assert code == 1 and out.startswith(f"error: {bad}")
    expected = {"truncated": "truncated", "garbage": "corrupt safetensors header", "empty": "only 0 bytes",
                "lying-header": "header claims 1000000000 bytes"}[kind]
    assert expected in out and "Traceback" not in out
    _no_output(tmp_path, "o.safetensors")


def test_garbage_pickle_and_unsafe_pickle(tmp_path: Path, members: list[Path]) -> None:
    (tmp_path / "junk.bin").write_bytes(b"PK\x03\x04 this is not a zip" * 10)
    code, out = run(["soup", str(members[0]), str(tmp_path / "junk.bin"), "-o", str(tmp_path / "o.safetensors")])
    assert code == 1 and "cannot be read as a PyTorch checkpoint" in out
    torch.save({"w": torch.zeros(2), "obj": Payload()}, tmp_path / "unsafe.pt")
    with pytest.raises(merge.CheckpointFormatError, match="weights_only"):
        merge.soup([tmp_path / "unsafe.pt"], out=tmp_path / "o.safetensors")
    _no_output(tmp_path, "o.safetensors")


def test_nonexistent_path(tmp_path: Path, members: list[Path]) -> None:
    code, out = run(["soup", str(members[0]), str(tmp_path / "nope.safetensors"), "-o", str(tmp_path / "o.safetensors")])
    assert code == 1 and out == f"error: {tmp_path / 'nope.safetensors'}: no such file or folder\n"
    with pytest.raises(FileNotFoundError):  # typed errors are also the standard ones
        merge.soup([tmp_path / "nope.safetensors"], out=tmp_path / "o.safetensors")
    _no_output(tmp_path, "o.safetensors")


def test_output_equal_to_an_input_is_refused(tmp_path: Path, members: list[Path]) -> None:
    before = members[0].read_bytes()
    for force in ([], ["--force"]):
        code, out = run(["soup", *map(str, members), "-o", str(members[0]), *force])
        assert code == 1 and "would overwrite member 0" in out
    assert members[0].read_bytes() == before
    # a folder output that would replace the folder holding the members is refused too
    code, out = run(["soup", *map(str, members), "-o", str(tmp_path), "--force"])
    assert code == 1 and out == (f"error: output {tmp_path} is a folder that holds member 0 ({members[0]}): replacing "
                                 "it would delete it; write the soup to a new path\n") and members[1].exists()


def test_existing_output_needs_force(tmp_path: Path, members: list[Path]) -> None:
    (tmp_path / "o.safetensors").write_bytes(b"keep me")
    code, out = run(["soup", *map(str, members), "-o", str(tmp_path / "o.safetensors")])
    assert code == 1 and "already exists" in out and "--force" in out
    assert (tmp_path / "o.safetensors").read_bytes() == b"keep me"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_on_a_cpu_machine_fails_before_reading(tmp_path: Path, members: list[Path], monkeypatch) -> None:
    from merge.io import sources

    def boom(*a, **k):
        raise AssertionError("a member was opened before the device was checked")

    monkeypatch.setattr(sources, "open_checkpoint", boom)
    monkeypatch.setattr("merge.soups.open_member", boom)  # members (and base+adapter LoRA members) open here
    code, out = run(["soup", *map(str, members), "-o", str(tmp_path / "o.safetensors"), "--device", "cuda:1"])
    assert code == 1 and "CUDA is not available" in out and "--device cpu" in out
    _no_output(tmp_path, "o.safetensors")


def test_bad_arguments_exit_2(tmp_path: Path, members: list[Path]) -> None:
    out = str(tmp_path / "o.safetensors")
    code, text = run(["soup", *map(str, members), "-o", out, "--weights", "1,2,3"])
    assert code == 2 and "got 3 weights for 2 members" in text
    code, text = run(["soup", *map(str, members), "-o", out, "--weights", "a,b"])
    assert code == 2 and "comma-separated numbers" in text
    code, text = run(["soup", *map(str, members), "-o", out, "--weights", "1,-1"])
    assert code == 2 and "non-negative" in text
    code, text = run(["soup", *map(str, members), "-o", out, "--method", "tie"])
    assert code == 2 and "unknown method 'tie'; valid methods: adamerging, arcee_fusion, breadcrumbs, breadcrumbs_ties, dare_linear" in text
    assert "slerp, task_arithmetic, ties, tsv, uniform, weighted" in text
    code, text = run(["soup", *map(str, members), "-o", out, "--method", "ties"])
    assert code == 2 and "method 'ties' needs a base model" in text and "(pass --base)" in text
    code, text = run(["soup", *map(str, members), "-o", out, "--dtype", "int8"])
    assert code == 2 and "unknown dtype 'int8'" in text
    code, text = run(["soup", *map(str, members), "-o", str(tmp_path / "dir"), "--shard-size", "lots"])
    assert code == 2 and "cannot read size 'lots'" in text
    code, text = run(["soup", *map(str, members), "-o", str(tmp_path / "dir"), "--recompute-bn", "5"])
    assert code == 2 and "-o NAME.safetensors" in text and not (tmp_path / "dir").exists()
    code, text = run(["soup", *map(str, members), "-o", out, "--device", "tpu"])
    assert code == 2 and "use cpu, cuda or cuda:N" in text
    _no_output(tmp_path, "o.safetensors")


def test_debug_variable_shows_the_traceback(tmp_path: Path, members: list[Path], monkeypatch) -> None:
    monkeypatch.setenv("PAPA_MERGE_DEBUG", "1")
    res = CliRunner().invoke(cli, ["soup", str(tmp_path / "nope.safetensors"), "-o", str(tmp_path / "o.safetensors")])
    assert isinstance(res.exception, merge.CheckpointNotFoundError)
