"""Gradients over the layers through flags and Python (issue 18, part 7): ``papa-merge soup --param t=0,0.5,1``
and ``merge.soup(params={"t": [0, 0.5, 1]})`` merge exactly as a mergekit recipe's ``t: [0, 0.5, 1]`` does (one
implementation: merge.params.gradient_value, positions from merge.slices), against float64 references."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import merge
from cli.main import cli
from merge.errors import InvalidArgumentError
from merge.keys import RECIPE_KEY
from merge.mergekit_recipe import load_recipe, run_recipe
from merge.params import Gradient

LAYERS = 5
OUTSIDE = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")


def _names() -> list[str]:
    inside = [f"model.layers.{i}.{part}" for i in range(LAYERS)
              for part in ("self_attn.q_proj.weight", "mlp.up_proj.weight", "input_layernorm.weight")]
    return [OUTSIDE[0], *inside, *OUTSIDE[1:]]


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict[str, Path]:
    """A base and two fine-tunes of it (the base plus small seeded noise), five layers, Llama-style names."""
    root = tmp_path_factory.mktemp("gradients")
    g = torch.Generator().manual_seed(0)
    base = {n: torch.randn((6,) if n.endswith("norm.weight") else (6, 4), generator=g) for n in _names()}
    paths = {"base": root / "base.safetensors"}
    save_file(base, str(paths["base"]))
    for i in range(2):
        paths[f"m{i}"] = root / f"m{i}.safetensors"
        save_file({n: v + 0.05 * torch.randn(v.shape, generator=g) for n, v in base.items()}, str(paths[f"m{i}"]))
    return paths


def _read(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def _f64(path: Path) -> dict[str, np.ndarray]:
    return {k: v.double().numpy() for k, v in _read(path).items()}


def _position(name: str) -> float:
    """mergekit 0.1.5: layer i of n at i / (n - 1); every tensor outside the layers at 0."""
    return int(name.split(".")[2]) / (LAYERS - 1) if ".layers." in name else 0.0


def _interp(values: list[float], t: float) -> float:
    return float(np.interp(t * (len(values) - 1), np.arange(len(values)), np.array(values, np.float64)))


def _slerp64(t: float, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """mergekit's slerp in float64: the angle of the normalised vectors, the vectors themselves interpolated."""
    dot = float(np.clip((a.ravel() / np.linalg.norm(a)) @ (b.ravel() / np.linalg.norm(b)), -1, 1))
    if abs(dot) > 0.9995:
        return (1 - t) * a + t * b
    theta = math.acos(dot)
    return (math.sin((1 - t) * theta) * a + math.sin(t * theta) * b) / math.sin(theta)


def _recipe(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yml"
    path.write_text(text)
    return path


def _equal(a: Path, b: Path) -> None:
    x, y = _read(a), _read(b)
    assert sorted(x) == sorted(y)
    for name in x:
        assert x[name].dtype == y[name].dtype and torch.equal(x[name], y[name]), name


def test_soup_param_gradient_equals_the_recipe_list_bit_for_bit(tmp_path: Path, family) -> None:
    soup_out, run_out, py_out = tmp_path / "soup.safetensors", tmp_path / "run.safetensors", tmp_path / "py.safetensors"
    res = CliRunner().invoke(cli, ["soup", "--method", "slerp", "--base", str(family["base"]), str(family["m0"]),
                                   "--param", "t=0,0.5,1", "-o", str(soup_out), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "(t [0, 0.5, 1])" in res.output  # the gradient is reported (and recorded) whole, not its first value
    recipe = _recipe(tmp_path, f"merge_method: slerp\nbase_model: {family['base']}\nmodels:\n"
                               f"  - model: {family['base']}\n  - model: {family['m0']}\nparameters:\n"
                               "  t: [0, 0.5, 1]\n")
    res = CliRunner().invoke(cli, ["run", str(recipe), "-o", str(run_out), "--no-progress"])
    assert res.exit_code == 0, res.output
    _equal(soup_out, run_out)
    merge.soup([family["m0"]], base=family["base"], method="slerp", params={"t": [0, 0.5, 1]}, out=py_out)
    _equal(py_out, run_out)
    with safe_open(str(py_out), "pt") as f:
        recorded = json.loads(f.metadata()[RECIPE_KEY])
    assert recorded["gradients"] == {"t": [0, 0.5, 1]} and recorded["parameters"] == {"t": [0, 0.5, 1]}


def test_gradient_values_at_first_middle_and_last_layer_against_float64(tmp_path: Path, family) -> None:
    anchors = [0.0, 0.6, 1.0]  # three anchors over five layers: two layers fall between anchors
    out = tmp_path / "slerp.safetensors"
    merge.soup([family["m0"]], base=family["base"], method="slerp", params={"t": anchors}, accumulate="float64",
               out=out)
    got, a, b = _f64(out), _f64(family["base"]), _f64(family["m0"])
    for name, x in got.items():
        t = _interp(anchors, _position(name))
        np.testing.assert_allclose(x, _slerp64(t, a[name], b[name]), rtol=0, atol=1e-6, err_msg=name)
    # the ends and the middle, by hand: layer 0 at t=0 (the base), layer 4 at t=1 (the member), layer 2 at
    # position 1/2, which is anchor 1 (0.6); layer 1 at position 1/4, halfway between anchors 0 and 1 (0.3)
    q = ".self_attn.q_proj.weight"
    np.testing.assert_allclose(got[f"model.layers.0{q}"], a[f"model.layers.0{q}"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(got[f"model.layers.4{q}"], b[f"model.layers.4{q}"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(got[f"model.layers.2{q}"], _slerp64(0.6, a[f"model.layers.2{q}"],
                                                                    b[f"model.layers.2{q}"]), rtol=0, atol=1e-6)
    np.testing.assert_allclose(got[f"model.layers.1{q}"], _slerp64(0.3, a[f"model.layers.1{q}"],
                                                                    b[f"model.layers.1{q}"]), rtol=0, atol=1e-6)
    for name in OUTSIDE:  # outside the layers: t = 0, the base's tensor
        np.testing.assert_allclose(got[name], a[name], rtol=0, atol=1e-6, err_msg=name)


def test_lambda_flag_gradient_scales_task_vectors_per_layer(tmp_path: Path, family) -> None:
    out = tmp_path / "ta.safetensors"
    res = CliRunner().invoke(cli, ["soup", "--method", "task_arithmetic", "--base", str(family["base"]),
                                   str(family["m0"]), "--lambda", "1,3", "-o", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    got, base, m0 = _f64(out), _f64(family["base"]), _f64(family["m0"])
    for name, x in got.items():
        lam = 1 + 2 * _position(name)  # [1, 3] over five layers: 1, 1.5, 2, 2.5, 3; outside: 1
        np.testing.assert_allclose(x, base[name] + lam * (m0[name] - base[name]), rtol=0, atol=1e-5, err_msg=name)


def test_per_member_parameter_gradient_equals_the_recipes_global_list(tmp_path: Path, family) -> None:
    """``--param density=0.3,0.7`` is a gradient every member follows, as a recipe's global ``density`` list
    (a per-member flag's list, ``--density 0.3,0.7``, stays one value per member)."""
    soup_out, run_out = tmp_path / "soup.safetensors", tmp_path / "run.safetensors"
    res = CliRunner().invoke(cli, ["soup", "--method", "ties", "--base", str(family["base"]), str(family["m0"]),
                                   str(family["m1"]), "--param", "density=0.3,0.7", "-o", str(soup_out),
                                   "--no-progress"])
    assert res.exit_code == 0, res.output
    run_recipe(load_recipe(text=f"merge_method: ties\nbase_model: {family['base']}\nmodels:\n"
                                f"  - model: {family['base']}\n  - model: {family['m0']}\n"
                                f"  - model: {family['m1']}\nparameters:\n  density: [0.3, 0.7]\n"), out=run_out)
    _equal(soup_out, run_out)
    # the same from Python: a Gradient for every member, or each member's own list
    py, own = tmp_path / "py.safetensors", tmp_path / "own.safetensors"
    merge.soup([family["m0"], family["m1"]], base=family["base"], method="ties",
               params={"density": Gradient([0.3, 0.7])}, out=py)
    merge.soup([family["m0"], family["m1"]], base=family["base"], method="ties",
               member_params=[{"density": [0.3, 0.7]}, {"density": [0.3, 0.7]}], out=own)
    _equal(py, run_out)
    _equal(own, run_out)
    # and a list among per-member values: member 0 follows a gradient, member 1 keeps 0.5
    mixed = tmp_path / "mixed.safetensors"
    merge.soup([family["m0"], family["m1"]], method="linear", params={"weight": [[1.0, 0.0], 1.0], "normalize": False},
               out=mixed)
    got, a, b = _f64(mixed), _f64(family["m0"]), _f64(family["m1"])
    for name, x in got.items():
        np.testing.assert_allclose(x, (1 - _position(name)) * a[name] + b[name], rtol=0, atol=1e-5, err_msg=name)


def test_dry_run_plans_a_gradient(tmp_path: Path, family) -> None:
    res = CliRunner().invoke(cli, ["soup", "--method", "slerp", "--base", str(family["base"]), str(family["m0"]),
                                   "--t", "0,1", "--dry-run", "-o", str(tmp_path / "x.safetensors")])
    assert res.exit_code == 0, res.output
    assert "gradients:      t [0.0, 1.0]: over the layers, layer i of n at i/(n-1)" in res.output
    assert not (tmp_path / "x.safetensors").exists()


def test_help_says_a_list_is_a_gradient() -> None:
    res = CliRunner().invoke(cli, ["soup", "--help"])
    text = " ".join(res.output.split())
    assert "NAME=V0,V1,... (e.g. t=0,0.5,1) is a gradient over the layers" in text
    assert "--param t=0,0.5,0.3,0.7,1" in text and "T0,T1,... a gradient over the layers" in text


def test_a_gradient_needs_layers(tmp_path: Path) -> None:
    flat = tmp_path / "flat.safetensors"
    save_file({"features.0.weight": torch.ones(2, 2), "classifier.weight": torch.ones(2)}, str(flat))
    with pytest.raises(InvalidArgumentError, match=r"parameter t is a gradient over the layers, but the tensor "
                                                   r"names hold no numbered layers .*; give it one value") as e:
        merge.soup([flat], base=flat, method="slerp", params={"t": [0, 1]}, out=tmp_path / "o.safetensors")
    assert e.value.option == "t"
    res = CliRunner().invoke(cli, ["soup", "--method", "slerp", "--base", str(flat), str(flat), "--param", "t=0,1",
                                   "-o", str(tmp_path / "o.safetensors")])
    assert res.exit_code == 2 and "no numbered layers" in res.output and "Traceback" not in res.output


@pytest.mark.parametrize("params,message", [
    ({"t": []}, "parameter t: an empty gradient list; give one value or at least one per end"),
    ({"t": [0, [1]]}, r"parameter t: a gradient lists numbers \(or words\), got \[1\] in it"),
])
def test_bad_gradients_are_refused_by_name(tmp_path: Path, family, params: dict, message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        merge.soup([family["m0"]], base=family["base"], method="slerp", params=params, out=tmp_path / "o.safetensors")
    assert not (tmp_path / "o.safetensors").exists()


def test_a_gradient_with_a_missing_value_is_a_usage_error(tmp_path: Path, family) -> None:
    res = CliRunner().invoke(cli, ["soup", "--method", "slerp", "--base", str(family["base"]), str(family["m0"]),
                                   "--param", "t=0,,1", "-o", str(tmp_path / "o.safetensors")])
    assert res.exit_code == 2 and "a gradient lists one value between each comma, got 't=0,,1'" in res.output


def test_a_gradient_is_never_taken_as_one_value_per_member(family) -> None:
    """A plan without layer positions (a whole-model plan) refuses a Gradient rather than reading it per member."""
    from merge.engine import plan_merge
    from merge.io.sources import open_checkpoint
    from merge.ops import get_operator

    with open_checkpoint(family["m0"]) as a, open_checkpoint(family["m1"]) as b, \
            open_checkpoint(family["base"]) as base:
        with pytest.raises(InvalidArgumentError, match=r"parameter density is a gradient over the layers \[0.3, 0.7\]"):
            plan_merge([a, b], get_operator("ties"), base=base, params={"density": Gradient([0.3, 0.7])})


def test_two_jobs_give_the_same_bytes_with_a_gradient(tmp_path: Path, family) -> None:
    """Each worker plans the gradient itself (from the same parameters): the bits one process writes."""
    one, two = tmp_path / "j1.safetensors", tmp_path / "j2.safetensors"
    for out, jobs in ((one, 1), (two, 2)):
        merge.soup([family["m0"]], base=family["base"], method="slerp", params={"t": [0, 0.5, 1]}, out=out, jobs=jobs)
    _equal(one, two)
