"""Numerics at the edges (issue 11, item 2): weights normalised in float64, no overflow, float64 kept,
NaN and infinity reported by member and tensor."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import merge
from cli.main import cli
from merge.engine import NonFiniteError, NonFiniteWarning
from tests.ckpt_factory import accumulation_bound, reference, save_members, ulp

# The factory's random members share no start: averaging them warns, as it should; no test here checks that.
pytestmark = pytest.mark.filterwarnings("ignore::merge.errors.DifferentStartsWarning")


@pytest.mark.parametrize("w", [[1e-46, 1e-46], [3e38, 3e38], [1e39, 1e39], [1e308, 1e308], [1e-320, 1e-320]])
def test_extreme_equal_weights_give_the_uniform_soup(tmp_path: Path, w: list[float]) -> None:
    paths, _ = save_members(tmp_path, 2)
    uniform = load_file(str(merge.soup(paths, out=tmp_path / "u.safetensors").path))
    got = load_file(str(merge.soup(paths, weights=w, out=tmp_path / "w.safetensors").path))
    for k in uniform:
        assert torch.equal(got[k], uniform[k]), k


def test_extreme_unequal_weights_are_exact_ratios(tmp_path: Path) -> None:
    paths, sds = save_members(tmp_path, 2)
    got = load_file(str(merge.soup(paths, weights=[3e38, 1e38], out=tmp_path / "w.safetensors").path))
    ref = reference(sds, [3, 1])["classifier.weight"]
    err = np.abs(got["classifier.weight"].double().numpy() - ref)
    assert (err <= accumulation_bound(sds, "classifier.weight", [3, 1], 2.0**-24) + ulp(ref, torch.float32) / 2).all()
    with pytest.raises(merge.InvalidArgumentError, match="weights must be finite"):
        merge.soup(paths, weights=[float("inf"), 1.0], out=tmp_path / "x.safetensors")
    with pytest.raises(merge.InvalidArgumentError, match="positive sum"):
        merge.soup(paths, weights=[0.0, 0.0], out=tmp_path / "x.safetensors")


@pytest.mark.parametrize("method,weights", [("uniform", None), ("weighted", [1.0, 3.0])])
def test_values_near_the_top_of_float32_do_not_overflow(tmp_path: Path, method: str, weights) -> None:
    top = torch.finfo(torch.float32).max
    a = torch.tensor([top, -top, 3e38, 1.0])
    b = torch.tensor([top, -top, 3.2e38, 3.0])
    save_file({"w": a}, str(tmp_path / "a.safetensors"))
    save_file({"w": b}, str(tmp_path / "b.safetensors"))
    out = merge.soup([tmp_path / "a.safetensors", tmp_path / "b.safetensors"], method=method, weights=weights,
                     out=tmp_path / "s.safetensors")
    got = load_file(str(out.path))["w"].double()
    w = np.array(weights or [1.0, 1.0]) / sum(weights or [1.0, 1.0])
    ref = w[0] * a.double() + w[1] * b.double()
    assert torch.isfinite(got).all()
    assert torch.allclose(got, ref, rtol=3e-7, atol=0)


def test_float64_members_accumulate_in_float64(tmp_path: Path) -> None:
    a = torch.tensor([1e-300, 3e-300, 1.0 + 2**-50], dtype=torch.float64)
    b = torch.tensor([3e-300, 1e-300, 1.0], dtype=torch.float64)
    save_file({"w": a}, str(tmp_path / "a.safetensors"))
    save_file({"w": b}, str(tmp_path / "b.safetensors"))
    res = merge.soup([tmp_path / "a.safetensors", tmp_path / "b.safetensors"], out=tmp_path / "s.safetensors")
    got = load_file(str(res.path))["w"]
    assert got.dtype == torch.float64
    assert got.tolist() == [2e-300, 2e-300, 1.0 + 2**-51]  # float32 accumulation gives 0, 0, 1.0


def _nan_members(tmp_path: Path) -> list[Path]:
    paths, sds = save_members(tmp_path, 3)
    sd = dict(sds[1])
    sd["classifier.bias"] = sd["classifier.bias"].clone()
    sd["classifier.bias"][3] = float("nan")
    save_file(sd, str(paths[1]))
    return paths


def test_nan_in_a_member_is_a_warning_naming_member_and_tensor(tmp_path: Path) -> None:
    paths = _nan_members(tmp_path)
    with pytest.warns(NonFiniteWarning, match=r"member 1 \(.*m1.safetensors\) holds NaN or infinite values in tensor "
                                              r"'classifier.bias'") as record:
        merge.soup(paths, out=tmp_path / "s.safetensors")
    assert len([r for r in record if r.category is NonFiniteWarning]) == 1
    assert torch.isnan(load_file(str(tmp_path / "s.safetensors"))["classifier.bias"][3])
    with pytest.raises(NonFiniteError) as e:
        merge.soup(paths, out=tmp_path / "strict.safetensors", strict=True)
    assert (e.value.member, e.value.tensor) == (1, "classifier.bias") and not (tmp_path / "strict.safetensors").exists()


def test_nan_through_a_task_method_and_the_cli(tmp_path: Path) -> None:
    paths = _nan_members(tmp_path)
    base = tmp_path / "m0.safetensors"
    with pytest.warns(NonFiniteWarning, match="member 0 .*classifier.bias"):
        merge.soup(paths[1:], base=base, method="ties", params={"density": 0.5}, out=tmp_path / "t.safetensors")
    res = CliRunner().invoke(cli, ["soup", *map(str, paths), "-o", str(tmp_path / "c.safetensors")])
    assert res.exit_code == 0 and "warning: member 1 (" in res.output and "'classifier.bias'" in res.output
    res = CliRunner().invoke(cli, ["soup", *map(str, paths), "-o", str(tmp_path / "d.safetensors"), "--strict"])
    assert res.exit_code == 1 and "\nerror: member 1 (" in "\n" + res.output and "'classifier.bias'" in res.output
    assert not (tmp_path / "d.safetensors").exists()


def test_overflow_from_finite_members_is_an_error(tmp_path: Path) -> None:
    save_file({"w": torch.full((4,), 10.0)}, str(tmp_path / "a.safetensors"))
    save_file({"w": torch.full((4,), 20.0)}, str(tmp_path / "b.safetensors"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no member holds a NaN: no warning, an error
        with pytest.raises(NonFiniteError, match="overflowed float32 although every member is finite") as e:
            merge.soup([tmp_path / "a.safetensors", tmp_path / "b.safetensors"], method="weighted",
                       weights=[1e38, 1e38], params={"normalize": False}, out=tmp_path / "s.safetensors")
    assert e.value.tensor == "w" and not (tmp_path / "s.safetensors").exists()
