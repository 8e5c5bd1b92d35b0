"""The engine's ``tensor`` path: whole tensors per name, auxiliary tensors, memory stated, errors."""

from __future__ import annotations

import warnings

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import merge
from cli.main import cli
from merge.engine import MemorySink, plan_merge, run_merge
from merge.io.sources import StateDictSource, open_checkpoint
from merge.ops import OPERATORS, Operator, Param, get_operator, register


def _weighted_by_aux(tensors, base, resolved, *, name, aux):
    """A toy tensor operator: sum_i a_i x_i / sum_i a_i, a_i = the member's ``scale`` auxiliary tensor summed
    (1 where the member has none), then the ``shift`` auxiliary tensor of member 0 added where it matches."""
    weights = [float(a["scale"].sum()) if aux is not None and "scale" in a else 1.0 for a in aux or [{}] * len(tensors)]
    out = sum(w * x for w, x in zip(weights, tensors)) / sum(weights)
    if aux is not None and "shift" in aux[0]:
        out = out + aux[0]["shift"].reshape(out.shape)
    return out * resolved.shared["gain"]


@pytest.fixture()
def toy():
    op = register(Operator("toy_aux", "test only", "aux-weighted mean", "tensor", params=(Param("gain", 1.0),),
                           tensor_fn=_weighted_by_aux, aux="optional", scratch=1))
    yield op
    del OPERATORS["toy_aux"]


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(40, 30, generator=g), "b": torch.randn(30, generator=g), "steps": torch.tensor(seed)}


def _run(op, members, *, base=None, aux=None, params=None, chunk_bytes=256, **kw):
    plan = plan_merge([StateDictSource(m) for m in members], op, base=StateDictSource(base) if base else None,
                      aux=aux, params=params, chunk_bytes=chunk_bytes, **kw)
    sink = MemorySink()
    run_merge(plan, sink)
    return sink.tensors, plan


def test_whole_tensors_and_auxiliary_tensors_reach_the_operator_as_in_the_whole_tensor_call(toy, tmp_path) -> None:
    members = [_state(i) for i in range(3)]
    aux_file = tmp_path / "aux1.safetensors"
    save_file({"w:scale": torch.full((2, 2), 0.75), "b:scale": torch.tensor([3.0])}, str(aux_file))
    aux = [{"w:scale": torch.tensor([2.0, 2.0]), "w:shift": torch.arange(1200.0)}, open_checkpoint(aux_file), None]
    out, plan = _run(toy, members, aux=aux, params={"gain": 0.5}, chunk_bytes=256)  # many chunks per tensor
    # by hand: w weights 4, 3, 1 and member 0's shift; b weights 1 (member 0 has no b:scale), 3, 1
    w = (4 * members[0]["w"] + 3 * members[1]["w"] + members[2]["w"]) / 8 + torch.arange(1200.0).reshape(40, 30)
    torch.testing.assert_close(out["w"], 0.5 * w, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(out["b"], 0.5 * (members[0]["b"] + 3 * members[1]["b"] + members[2]["b"]) / 5)
    assert torch.equal(out["steps"], members[0]["steps"])  # integers copied, never merged
    whole = toy([m["w"] for m in members], aux=[{"scale": torch.tensor([2.0, 2.0]), "shift": torch.arange(1200.0)},
                                                {"scale": torch.full((2, 2), 0.75)}, {}], gain=0.5, name="w")
    assert torch.equal(out["w"], whole)
    # without auxiliary sources the operator sees aux=None
    plain, _ = _run(toy, members)
    torch.testing.assert_close(plain["w"], sum(m["w"] for m in members) / 3)


def test_memory_stated_grows_by_one_tensor_per_member_and_dry_run_says_so(tmp_path) -> None:
    op = get_operator("tsv")
    base = _state(100)
    plans = [plan_merge([StateDictSource(_state(i)) for i in range(n)], op, base=StateDictSource(base))
             for n in (2, 8)]
    assert plans[1].buffer_bytes - plans[0].buffer_bytes == 6 * 40 * 30 * 4  # six more float32 copies of "w"
    assert plans[0].memory_note.startswith("grows with the member count: 8 whole copies of the largest tensor, 'w'")
    for i, sd in enumerate([base, _state(0), _state(1)]):
        save_file(sd, str(tmp_path / f"m{i}.safetensors"))
    res = CliRunner().invoke(cli, ["soup", "--method", "tsv", "--base", str(tmp_path / "m0.safetensors"),
                                   str(tmp_path / "m1.safetensors"), str(tmp_path / "m2.safetensors"),
                                   "-o", str(tmp_path / "out.safetensors"), "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "method:         tsv (tensor path)" in res.output
    assert ("for tsv (grows with the member count: 8 whole copies of the largest tensor, 'w' [40, 30], in float32: "
            "members + base + 5 for tsv's working space)") in res.output
    ties = CliRunner().invoke(cli, ["soup", "--method", "ties", "--base", str(tmp_path / "m0.safetensors"),
                                    str(tmp_path / "m1.safetensors"), "-o", str(tmp_path / "t.safetensors"),
                                    "--dry-run"])
    assert "(independent of member count)" in ties.output


def test_a_member_with_nan_makes_the_whole_tensor_nan_with_a_warning_naming_it(toy) -> None:
    members = [_state(i) for i in range(2)]
    members[1]["w"][3, 4] = float("nan")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, _ = _run(toy, members)
    assert torch.isnan(out["w"]).all() and torch.isfinite(out["b"]).all()
    msg = [str(w.message) for w in caught if isinstance(w.message, merge.NonFiniteWarning)]
    assert len(msg) == 1 and "member 1" in msg[0] and "decomposes whole tensors" in msg[0] and "'w'" in msg[0]
    assert torch.isnan(toy([m["w"] for m in members])).all()  # the whole-tensor definition agrees


def test_bad_auxiliary_input_is_refused_before_any_work(toy) -> None:
    members = [_state(i) for i in range(2)]
    with pytest.raises(merge.InvalidArgumentError, match=r"^method 'uniform' takes no auxiliary tensors") as e:
        _run(get_operator("uniform"), members, aux=[{}, {}])
    assert e.value.option == "aux"
    with pytest.raises(merge.InvalidArgumentError, match=r"got 1 auxiliary sources for 2 members; give one per member"):
        _run(toy, members, aux=[{}])
    with pytest.raises(merge.InvalidArgumentError, match=r"key 'w' is not NAME:KIND") as e:
        _run(toy, members, aux=[{"w": torch.ones(1)}, None])
    assert e.value.member == 0
    bad = [{"w:scale": torch.tensor([float("inf")])}, None]
    with pytest.raises(merge.NonFiniteError, match=r"auxiliary tensor 'w:scale' of member 0 \(<aux 0>\) holds NaN"):
        _run(toy, members, aux=bad)
    with pytest.raises(merge.InvalidArgumentError, match=r"takes no auxiliary tensors"):
        get_operator("tsv")([members[0]["w"]], base=members[1]["w"], aux=[{}])


def test_required_auxiliary_tensors_are_asked_for() -> None:
    op = register(Operator("toy_needs_aux", "test only", "needs aux", "tensor", tensor_fn=_weighted_by_aux,
                           aux="required"))
    try:
        with pytest.raises(merge.InvalidArgumentError, match=r"method 'toy_needs_aux' needs auxiliary tensors") as e:
            _run(op, [_state(0)])
        assert e.value.option == "aux"
    finally:
        del OPERATORS["toy_needs_aux"]
