"""The safetensors writer and its sink (issue 11, items 5 and 7).

Outputs whose last file receives no bytes (every tensor empty, or a last shard of empty tensors) are
valid files; a full disk is reported with the output's path; an empty ``-o`` is a bad argument.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import save_file

import merge
from cli.main import cli
from merge.io.sources import TensorInfo
from merge.io.writer import AtomicOutput, FileSink, OutputFile, OutputPlan, plan_output, write_state_dict


def _read(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_a_soup_of_only_empty_tensors_is_a_valid_file(tmp_path: Path) -> None:
    sd = {"a": torch.zeros(0), "b": torch.zeros(3, 0, dtype=torch.float16), "n": torch.zeros(0, dtype=torch.int64)}
    save_file(sd, str(tmp_path / "m.safetensors"))
    res = merge.soup([tmp_path / "m.safetensors"] * 2, out=tmp_path / "o.safetensors")
    got = _read(res.path)
    assert {k: (v.shape, v.dtype) for k, v in got.items()} == {k: (v.shape, v.dtype) for k, v in sd.items()}
    folder = merge.soup([tmp_path / "m.safetensors"], out=tmp_path / "folder").path
    assert {k: v.shape for k, v in _read(folder / "model.safetensors").items()} == {k: v.shape for k, v in sd.items()}


def test_every_file_of_a_plan_is_written_once_even_when_it_gets_no_bytes(tmp_path: Path) -> None:
    """FileSink.finish opens each file the merge did not reach, each exactly once (it used to skip every other)."""
    f32 = torch.float32
    files = [OutputFile("s1.safetensors", [TensorInfo("w", f32, (2,))]),
             OutputFile("s2.safetensors", [TensorInfo("e1", f32, (0,))]),
             OutputFile("s3.safetensors", [TensorInfo("e2", f32, (0, 4))]),
             OutputFile("s4.safetensors", [TensorInfo("e3", torch.int64, (0,)), TensorInfo("e4", f32, (0,))])]
    plan = OutputPlan(tmp_path / "out", True, files)
    with AtomicOutput(plan.path, folder=True) as atomic:
        sink = FileSink(plan, atomic, {"k": "v"})
        sink.begin(plan.tensors)
        sink.write("w", memoryview(torch.tensor([1.0, 2.0]).numpy()).cast("B"))
        sink.finish()
        atomic.commit()
    shapes = {}
    for f in files:
        with safe_open(str(plan.path / f.name), "pt") as st:
            assert st.metadata() == {"k": "v"}
            shapes.update({k: tuple(st.get_tensor(k).shape) for k in st.keys()})
    assert shapes == {"w": (2,), "e1": (0,), "e2": (0, 4), "e3": (0,), "e4": (0,)}
    assert torch.equal(_read(plan.path / "s1.safetensors")["w"], torch.tensor([1.0, 2.0]))


def test_a_sharded_soup_whose_last_shard_holds_only_empty_tensors(tmp_path: Path) -> None:
    sd = {"a": torch.ones(300), "b": torch.full((300,), 2.0), "z": torch.zeros(0, 5)}
    save_file(sd, str(tmp_path / "m.safetensors"))
    res = merge.soup([tmp_path / "m.safetensors"], out=tmp_path / "o", shard_size="1200B")
    index = json.loads((res.path / "model.safetensors.index.json").read_text())
    got: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index["weight_map"].values())):
        got.update(_read(res.path / shard))
    assert set(got) == set(sd) and all(torch.equal(got[k], sd[k]) for k in sd)


def test_write_state_dict_of_nothing_and_of_empty_tensors(tmp_path: Path) -> None:
    assert _read(write_state_dict({}, tmp_path / "none.safetensors")) == {}
    got = _read(write_state_dict({"e": torch.zeros(0, 2)}, tmp_path / "e.safetensors"))
    assert got["e"].shape == (0, 2)


@pytest.mark.parametrize("out", ["o.safetensors", "o.pt", "folder"])
def test_a_full_disk_names_the_output(tmp_path: Path, monkeypatch, out: str) -> None:
    save_file({"w": torch.ones(1000)}, str(tmp_path / "m.safetensors"))
    real = os.write

    def full(fd: int, data: object) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    import zipfile

    from merge.io import writer

    monkeypatch.setattr(writer.os, "write", full)
    real_write = zipfile._ZipWriteFile.write

    def zip_full(self, data):  # zipfile writes through a Python file object
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(zipfile._ZipWriteFile, "write", zip_full)
    res = CliRunner().invoke(cli, ["soup", str(tmp_path / "m.safetensors"), "-o", str(tmp_path / out)])
    monkeypatch.setattr(writer.os, "write", real)
    monkeypatch.setattr(zipfile._ZipWriteFile, "write", real_write)
    assert res.exit_code == 1
    target = tmp_path / out / "model.safetensors" if out == "folder" else tmp_path / out
    assert res.output == (f"error: no space left on the device ({target}); free space or write the output "
                          "elsewhere\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]  # no output, no temporary left


def test_the_os_error_of_a_failed_write_carries_the_final_path(tmp_path: Path, monkeypatch) -> None:
    from merge.io import writer

    def full(fd: int, data: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer.os, "write", full)
    with pytest.raises(OSError) as e:
        write_state_dict({"w": torch.ones(3)}, tmp_path / "x.safetensors")
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / "x.safetensors")


def test_an_empty_output_path_is_a_bad_argument(tmp_path: Path) -> None:
    save_file({"w": torch.ones(2)}, str(tmp_path / "m.safetensors"))
    res = CliRunner().invoke(cli, ["soup", str(tmp_path / "m.safetensors"), "-o", ""])
    assert res.exit_code == 2 and res.output.startswith("error: the output path is empty")
    for bad in ("", ".", "/"):
        with pytest.raises(merge.InvalidArgumentError, match="names no file or folder"):
            plan_output([TensorInfo("w", torch.float32, (2,))], bad)
        with pytest.raises(merge.InvalidArgumentError, match="names no file or folder"):
            AtomicOutput(bad, folder=True)
