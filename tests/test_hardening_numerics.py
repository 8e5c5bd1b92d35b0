"""Hardening, round two (issue 25 items 1, 4, 6, 11, 13, 14; issue 26 item 7): numerics at the output dtype,
non-finite members on the Gram path, coefficients beyond float32, outputs that cannot be written as asked."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import merge
from cli.main import cli
from merge.engine import NonFiniteError, NonFiniteWarning

pytestmark = pytest.mark.filterwarnings("ignore::merge.errors.DifferentStartsWarning")


def _save(path: Path, **tensors: torch.Tensor) -> Path:
    save_file(tensors, str(path))
    return path


def _run(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args])


# ---- item 1: an overflow at the cast to the output dtype is an error ------------------------------------------

def test_float16_output_of_values_beyond_its_range_is_an_error(tmp_path: Path) -> None:
    big = _save(tmp_path / "big.safetensors", x=torch.full((4,), 1e6))
    out = tmp_path / "o.safetensors"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # finite members: no NaN warning, an error
        with pytest.raises(NonFiniteError, match=r"tensor 'x': the result reaches 1e\+06, beyond the largest float16 "
                                                 r"\(65504\)") as e:
            merge.soup([big, big], dtype="float16", out=out)
    assert (e.value.tensor, e.value.option, e.value.choices) == ("x", "dtype", ("float32",))
    assert not out.exists()
    res = _run("soup", big, big, "--dtype", "float16", "-o", out)
    assert res.exit_code == 1 and "pass --dtype float32" in res.output and "Traceback" not in res.output
    assert not out.exists()
    # the same values written as float32 are exact
    assert load_file(str(merge.soup([big, big], out=tmp_path / "f32.safetensors").path))["x"].tolist() == [1e6] * 4


def test_float16_task_arithmetic_past_65504_is_an_error(tmp_path: Path) -> None:
    half = torch.float16
    base = _save(tmp_path / "base.safetensors", x=torch.zeros(4, dtype=half))
    a = _save(tmp_path / "a.safetensors", x=torch.full((4,), 1e4, dtype=half))
    b = _save(tmp_path / "b.safetensors", x=torch.full((4,), 3e4, dtype=half))
    out = tmp_path / "o.safetensors"
    res = _run("soup", a, b, "--base", base, "--method", "task_arithmetic", "--lambda", "3", "-o", out)
    assert res.exit_code == 1, res.output
    assert "the result reaches 120000, beyond the largest float16" in res.output and not out.exists()
    # lambda 1 stays in range: 4e4, written exactly
    merge.soup([a, b], base=base, method="task_arithmetic", out=out)
    assert load_file(str(out))["x"].tolist() == [4e4] * 4


def test_bfloat16_and_float32_outputs_of_float64_members_check_the_cast(tmp_path: Path) -> None:
    a = _save(tmp_path / "a.safetensors", x=torch.tensor([1e300, 1.0], dtype=torch.float64))
    with pytest.raises(NonFiniteError, match="beyond the largest float32") as e:
        merge.soup([a, a], dtype="float32", out=tmp_path / "o.safetensors")
    assert e.value.choices == ("float64",)
    with pytest.raises(NonFiniteError, match="beyond the largest bfloat16"):
        merge.soup([a, a], dtype="bfloat16", out=tmp_path / "o.safetensors")


def test_a_nan_member_in_a_float16_output_stays_a_warning(tmp_path: Path) -> None:
    x = torch.ones(4)
    x[1] = float("nan")
    a = _save(tmp_path / "a.safetensors", x=x)
    b = _save(tmp_path / "b.safetensors", x=torch.ones(4))
    with pytest.warns(NonFiniteWarning, match="member 0"):
        got = merge.average([load_file(str(a)), load_file(str(b))], dtype="float16")["x"]
    assert torch.isnan(got[1]) and got[[0, 2, 3]].tolist() == [1.0, 1.0, 1.0]


# ---- item 4: a non-finite member on the Gram path makes the whole tensor NaN -----------------------------------

def _nan_set(tmp_path: Path) -> tuple[Path, Path, Path]:
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(16, 16, generator=g), "b": torch.randn(16, generator=g)}
    f1 = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    fn = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    fn["w"][3, 3] = float("nan")
    return (_save(tmp_path / "base.safetensors", **base), _save(tmp_path / "f1.safetensors", **f1),
            _save(tmp_path / "f_nan.safetensors", **fn))


@pytest.mark.parametrize("method,with_base,members", [("karcher", False, 2), ("multislerp", False, 2),
                                                      ("multislerp", True, 2), ("model_stock", True, 2),
                                                      ("slerp", True, 1)])
def test_a_nan_element_on_the_gram_path_makes_the_whole_tensor_nan(tmp_path: Path, method: str, with_base: bool,
                                                                   members: int) -> None:
    base, f1, fn = _nan_set(tmp_path)
    paths = [f1, fn][-members:]
    params = {"t": 0.3} if method == "slerp" else None
    who = f"member {members - 1}"
    with pytest.warns(NonFiniteWarning, match=rf"{who} \(.*f_nan.safetensors\) holds NaN or infinite values in "
                                              rf"tensor 'w'; {method} takes norms and angles of whole tensors, so the "
                                              r"whole output tensor 'w' is NaN") as rec:
        res = merge.soup(paths, base=base if with_base else None, method=method, params=params,
                         out=tmp_path / "o.safetensors")
    assert len([r for r in rec if r.category is NonFiniteWarning]) == 1
    got = load_file(str(res.path))
    assert torch.isnan(got["w"]).all()
    assert torch.isfinite(got["b"]).all()  # the other tensor is untouched
    # the whole-tensor definition agrees
    op = merge.ops.get_operator(method)
    tensors = [load_file(str(p))["w"] for p in paths]
    whole = op(tensors, base=load_file(str(base))["w"] if with_base else None, **(params or {}))
    assert torch.isnan(whole).all()
    with pytest.raises(NonFiniteError, match="member .* holds NaN"):
        merge.soup(paths, base=base if with_base else None, method=method, params=params, strict=True,
                   out=tmp_path / "strict.safetensors")


def test_a_nan_in_the_base_of_slerp_makes_the_tensor_nan_and_says_so(tmp_path: Path) -> None:
    base, f1, fn = _nan_set(tmp_path)
    res = _run("soup", f1, "--base", fn, "--method", "slerp", "--t", "0.5", "-o", tmp_path / "o.safetensors")
    assert res.exit_code == 0, res.output
    assert "the base (" in res.output and "the whole output tensor 'w' is NaN" in res.output
    assert torch.isnan(load_file(str(tmp_path / "o.safetensors"))["w"]).all()


# ---- item 6: coefficients beyond the accumulator --------------------------------------------------------------

def test_weights_beyond_float32_without_normalising_are_refused(tmp_path: Path) -> None:
    base, f1, _ = _nan_set(tmp_path)
    f2 = tmp_path / "f2.safetensors"
    _save(f2, **{k: v * 1.01 for k, v in load_file(str(f1)).items()})
    with pytest.raises(merge.InvalidArgumentError, match=r"method 'weighted': coefficient 1e\+39 is beyond the range "
                                                         r"of the float32 accumulator") as e:
        merge.soup([f1, f2], weights=[1e39, 1e39], params={"normalize": False}, out=tmp_path / "o.safetensors")
    assert e.value.option == "weights"
    res = _run("soup", f1, f2, "--weights", "1e39,1e39", "--no-normalize", "-o", tmp_path / "o.safetensors")
    assert res.exit_code == 2 and "pass --weights" in res.output and "bug" not in res.output
    assert len(res.output.strip().splitlines()) == 1
    res = _run("soup", f1, "--base", base, "--method", "slerp", "--t", "1e308", "-o", tmp_path / "o.safetensors")
    assert res.exit_code == 2 and "method 'slerp': coefficient" in res.output and "pass --t" in res.output
    for method in ("ties", "della", "task_arithmetic"):
        for extra in ([], ["--no-normalize"]):
            res = _run("soup", f1, f2, "--base", base, "--method", method, "--weights", "1e308,1e308", *extra,
                       "-o", tmp_path / "o.safetensors")
            assert res.exit_code == 2, (method, res.output)
            assert f"method '{method}': the weights (1e+308, 1e+308) add up beyond the range of the float32" in res.output
            assert "pass --weights" in res.output
    res = _run("soup", f1, f2, "--base", base, "--method", "ties", "--lambda", "1e300", "-o", tmp_path / "o.safetensors")
    assert res.exit_code == 2 and "lambda 1e+300 is beyond" in res.output and "pass --lambda" in res.output
    assert not (tmp_path / "o.safetensors").exists()


def test_coefficients_that_fit_float64_accumulators_meet_the_cast_check(tmp_path: Path) -> None:
    _, f1, _ = _nan_set(tmp_path)
    a = load_file(str(f1))
    with pytest.raises(NonFiniteError, match="beyond the largest float32"):
        merge.average([a, a], weights=[3e38, 3e38], params={"normalize": False}, accumulate="float64")


# ---- item 6: torch-file outputs of every dtype safetensors holds ------------------------------------------------

_NEWER = ["float8_e4m3fn", "float8_e5m2", "float8_e8m0fnu", "uint16", "uint32", "uint64", "complex64"]


@pytest.mark.parametrize("name", [n for n in _NEWER if hasattr(torch, n)])
def test_torch_file_outputs_hold_newer_dtypes_as_torch_save_does(tmp_path: Path, name: str) -> None:
    dtype = getattr(torch, name)
    v = torch.tensor([1.0, 2.0, 4.0, 8.0])
    x = torch.complex(v, -v).to(dtype) if dtype.is_complex else v.to(dtype)
    a = _save(tmp_path / "a.safetensors", x=x, w=torch.ones(3))
    b = _save(tmp_path / "b.safetensors", x=x, w=torch.zeros(3))
    res = _run("soup", a, b, "-o", tmp_path / "o.pth")
    assert res.exit_code == 0, res.output
    got = torch.load(tmp_path / "o.pth", weights_only=True)
    assert got["x"].dtype == dtype and got["x"].shape == (4,)
    # identical members: the merge returns them bit for bit, copied or averaged
    assert got["x"].view(torch.uint8).tolist() == x.view(torch.uint8).tolist()
    assert got["w"].tolist() == [0.5] * 3
    mapped = torch.load(tmp_path / "o.pth", weights_only=True, mmap=True)
    assert mapped["x"].view(torch.uint8).tolist() == x.view(torch.uint8).tolist()
    merge.soup([a, b], out=tmp_path / "o.safetensors")
    assert load_file(str(tmp_path / "o.safetensors"))["x"].view(torch.uint8).tolist() == x.view(torch.uint8).tolist()


@pytest.mark.parametrize("name,top,ok,over", [("float8_e4m3fn", 448, 0.02, 0.04), ("float8_e5m2", 57344, 0.05, 0.08)])
def test_float8_results_past_their_range_are_an_error(tmp_path: Path, name: str, top: float, ok: float,
                                                      over: float) -> None:
    # past the last rounding boundary (max + half a step: 464, 61440) a float8 has no value: torch writes inf
    # (e5m2) or saturates at 448 (e4m3fn); below it the result rounds to the largest finite value, as casts round
    dtype = getattr(torch, name)
    a = _save(tmp_path / "a.safetensors", x=torch.tensor([top, 1.0]).to(dtype))
    got = merge.soup([a, a], weights=[1, ok], params={"normalize": False}, out=tmp_path / "ok.safetensors")
    assert load_file(str(got.path))["x"].float().tolist() == [top, 1.0]
    with pytest.raises(NonFiniteError, match=rf"beyond the largest {name} \({top}\), so writing it as {name} "):
        merge.soup([a, a], weights=[1, over], params={"normalize": False}, out=tmp_path / "o.safetensors")


# ---- item 11 and 14: outputs that are, hold or lie inside an input; '/' -------------------------------------------

def _folder_member(tmp_path: Path) -> tuple[Path, Path]:
    fold = tmp_path / "fold"
    fold.mkdir()
    save_file({"w": torch.ones(3)}, str(fold / "model.safetensors"))
    return fold, _save(tmp_path / "f2.safetensors", w=torch.zeros(3))


def test_an_output_inside_an_input_folder_is_refused(tmp_path: Path) -> None:
    fold, f2 = _folder_member(tmp_path)
    for out in (fold / "sub", fold / "sub" / "deeper.safetensors", fold / "o.safetensors"):
        with pytest.raises(merge.SameInputOutputError, match=rf"output {out} lies inside the folder of member 0 "
                                                             rf"\({fold}\); write the soup outside it") as e:
            merge.soup([fold, f2], out=out)
        assert e.value.member == 0
    with pytest.raises(merge.SameInputOutputError, match="inside the folder of the base"):
        merge.soup([f2], base=fold, method="task_arithmetic", out=fold / "sub")
    res = _run("soup", fold, f2, "-o", fold / "sub")
    assert res.exit_code == 1 and res.output == (f"error: output {fold / 'sub'} lies inside the folder of member 0 "
                                                 f"({fold}); write the soup outside it\n")
    assert sorted(p.name for p in fold.iterdir()) == ["model.safetensors"]
    # beside the folder is fine, and so is a file member's own folder
    merge.soup([fold, f2], out=tmp_path / "beside")
    merge.soup([f2, f2], out=tmp_path / "o.safetensors")


def test_the_root_is_no_output(tmp_path: Path) -> None:
    _, f2 = _folder_member(tmp_path)
    res = _run("soup", f2, f2, "-o", "/")
    assert res.exit_code == 2 and res.output == ("error: output '/' names no file or folder; give a name such as "
                                                 "soup.safetensors or soup/ (pass -o/--out)\n")
    with pytest.raises(merge.InvalidArgumentError, match="names no file or folder"):
        merge.soup([f2], out="/")


def test_slerp_without_a_base_says_it_needs_one(tmp_path: Path) -> None:
    _, f1, f2 = _nan_set(tmp_path)
    res = _run("soup", f1, f2, "--method", "slerp", "--t", "0.5", "-o", tmp_path / "o.safetensors")
    assert res.exit_code == 2 and res.output.startswith("error: method 'slerp' needs a base model") and "at most" not in res.output
    assert "pass --base" in res.output
    with pytest.raises(merge.InvalidArgumentError, match="at most 1 member") as e:
        merge.soup([f1, f2], base=f1, method="slerp", params={"t": 0.5}, out=tmp_path / "o.safetensors")
    assert e.value.option == "members"


def test_weights_of_1e308_are_shown_as_halves(tmp_path: Path) -> None:
    _, f1, _ = _nan_set(tmp_path)
    f2 = _save(tmp_path / "f2.safetensors", **{k: v * 1.01 for k, v in load_file(str(f1)).items()})
    res = _run("soup", f1, f2, "--weights", "1e308,1e308", "-o", tmp_path / "w.safetensors")
    assert res.exit_code == 0 and "f1.safetensors x0.5, " in res.output and "f2.safetensors x0.5\n" in res.output
    res = _run("inspect", tmp_path / "w.safetensors")
    assert "f1.safetensors x0.5, f2.safetensors x0.5" in res.output
    merge.soup([f1, f2], weights=[1e308, 1e308], out=tmp_path / "folder")
    card = (tmp_path / "folder" / "README.md").read_text()
    assert "| `f1.safetensors` | local file | 0.5 |" in card and "| `f2.safetensors` | local file | 0.5 |" in card
    from merge.card import recipe_members

    shares = [w for _, w in recipe_members({"members": ["a", "b", "c"], "weights": [1e308, 1e308, 2e307]})]
    assert shares == pytest.approx([1 / 2.2, 1 / 2.2, 0.2 / 2.2], rel=1e-15)


# ---- item 13: output names up to the file system's limit ---------------------------------------------------------

@pytest.mark.parametrize("name", ["a" * 243 + ".safetensors", "é" * 121 + ".safetensors", "b" * 251 + ".pth",
                                  "c" * 255])
def test_output_names_up_to_255_bytes_are_written(tmp_path: Path, name: str) -> None:
    assert len(name.encode()) <= 255
    _, f1, _ = _nan_set(tmp_path)
    res = merge.soup([f1, f1], out=tmp_path / name)
    assert res.path == tmp_path / name and (tmp_path / name).exists()
    merge.soup([f1, f1], out=tmp_path / name, force=True)  # the replaced one moves aside under a hidden name too
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_a_long_named_temporary_of_a_dead_process_is_cleaned_up(tmp_path: Path, monkeypatch) -> None:
    from merge.io import atomic

    name = "d" * 250 + ".safetensors"
    monkeypatch.setattr(atomic.os, "getpid", lambda: 4_194_303)  # pid_max: no process runs under this id here
    stale = tmp_path / atomic._hidden_name(name, "tmp")
    monkeypatch.undo()
    assert len(stale.name.encode()) <= 255 and stale.name.endswith(".tmp-" + atomic._HOST + "-4194303-" + stale.name[-8:])
    stale.write_bytes(b"half a soup")
    assert atomic.remove_stale_temporaries(tmp_path) == [stale] and not stale.exists()


# ---- issue 26 item 7: a non-float buffer only some members hold ------------------------------------------------

def _mixed_origin(tmp_path: Path) -> tuple[Path, Path, Path]:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(4, 4, generator=g)
    ids = torch.arange(8).reshape(1, 8)
    hub = _save(tmp_path / "hub.safetensors", w=w, **{"embeddings.position_ids": ids})
    resaved = _save(tmp_path / "resaved.safetensors", w=w + 0.5)  # saved without the buffer
    other = _save(tmp_path / "other.safetensors", w=w - 0.5, **{"embeddings.position_ids": ids})
    return hub, resaved, other


def test_a_missing_integer_buffer_is_copied_from_a_member_that_has_it(tmp_path: Path) -> None:
    hub, resaved, other = _mixed_origin(tmp_path)
    ids = load_file(str(hub))["embeddings.position_ids"]
    for order, source in (([hub, resaved], "member 0"), ([resaved, hub, other], "member 1")):
        with pytest.warns(merge.errors.PartialBufferWarning) as rec:
            res = merge.soup(order, out=tmp_path / f"o{len(order)}.safetensors")
        msgs = [str(r.message) for r in rec if r.category is merge.errors.PartialBufferWarning]
        assert msgs == [f"tensor 'embeddings.position_ids' (int64 [1, 8]) is missing from member "
                        f"{order.index(resaved)} ({resaved}); it is not a float tensor, so it is copied, not merged: "
                        f"taken from {source} ({order[int(source[-1])]})"]
        got = load_file(str(res.path))
        assert torch.equal(got["embeddings.position_ids"], ids)
        want = sum(load_file(str(p))["w"].double() for p in order) / len(order)
        assert torch.allclose(got["w"].double(), want, atol=1e-6)
    # with a base that lacks it, from the first member that has it; the CLI prints the note once, exit 0
    res = _run("soup", hub, other, "--base", resaved, "--method", "task_arithmetic", "-o", tmp_path / "t.safetensors")
    assert res.exit_code == 0, res.output
    assert res.output.count("warning: tensor 'embeddings.position_ids'") == 1 and "taken from member 0" in res.output
    assert torch.equal(load_file(str(tmp_path / "t.safetensors"))["embeddings.position_ids"], ids)


def test_a_missing_float_tensor_or_disagreeing_buffers_stay_an_error(tmp_path: Path) -> None:
    hub, resaved, _ = _mixed_origin(tmp_path)
    no_w = _save(tmp_path / "no_w.safetensors", **{"embeddings.position_ids": torch.arange(8).reshape(1, 8)})
    with pytest.raises(merge.MismatchError, match="members disagree on 1 tensor"):
        merge.soup([hub, no_w], out=tmp_path / "o.safetensors")
    longer = _save(tmp_path / "longer.safetensors", w=torch.zeros(4, 4),
                   **{"embeddings.position_ids": torch.arange(9).reshape(1, 9)})
    with pytest.raises(merge.MismatchError, match="embeddings.position_ids"):
        merge.soup([hub, resaved, longer], out=tmp_path / "o.safetensors")


def test_on_mismatch_first_takes_member_0s_copy_not_the_bases(tmp_path: Path) -> None:
    base = _save(tmp_path / "base.safetensors", w=torch.zeros(2), head=torch.full((3,), 7.0))
    a = _save(tmp_path / "a.safetensors", w=torch.ones(2), head=torch.full((5,), 1.0))
    b = _save(tmp_path / "b.safetensors", w=torch.ones(2), head=torch.full((5,), 2.0))
    res = merge.soup([a, b], base=base, method="task_arithmetic", on_mismatch="first", out=tmp_path / "o.safetensors")
    assert load_file(str(res.path))["head"].tolist() == [1.0] * 5 and res.recipe["copied_from_first"] == ["head"]
