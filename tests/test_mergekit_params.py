"""mergekit recipe parameters: scalars, gradients over the layers, {filter, value} lists, and the precedence
source > slice > global, against float64 references (mergekit 0.1.5: config.py evaluate_setting,
parameter_resolver.py, plan.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from merge.mergekit_recipe import evaluate_setting, load_recipe, run_recipe
from tests.mergekit_models import family


def _g(values: list) -> list[dict]:
    return [{"filter": None, "value": values}]


@pytest.mark.parametrize("values,layers", [
    ([0.0, 0.5, 0.3, 0.7, 1.0], 8),   # the LazyMergekit template: 5 anchors over 8 layers
    ([0.1, 0.9], 5),                  # shorter than the layer count
    ([0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.25], 4),  # longer than the layer count
    ([0.3], 3),                       # one anchor
    ([0.2, 0.8], 1),                  # a one-layer slice sits at t = 1 (mergekit's plan_slice)
])
def test_gradients_interpolate_over_the_layers_as_mergekit(values: list[float], layers: int) -> None:
    ref = np.interp([i / (layers - 1) * (len(values) - 1) if layers > 1 else len(values) - 1
                     for i in range(layers)], np.arange(len(values), dtype=np.float64), np.array(values, np.float64))
    from merge.slices import layer_position

    got = [evaluate_setting(_g(values), "model.layers.0.mlp.weight", layer_position(i, layers)) for i in range(layers)]
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-15)
    assert got[-1] == values[-1] and (layers == 1 or got[0] == values[0])  # first and last layer: the ends


def test_gradients_of_words_pick_and_filters_take_the_first_match() -> None:
    assert [evaluate_setting(_g(["a", "b", "c"]), "x", t) for t in (0, 0.49, 0.5, 0.99, 1)] == ["a", "a", "b", "b", "c"]
    assert evaluate_setting(_g([True, False]), "x", 0.6) is True  # booleans pick, never interpolate
    setting = [{"filter": "self_attn", "value": 0.1}, {"filter": "attn", "value": 0.2}, {"filter": None, "value": 0.3},
               {"filter": "mlp", "value": 0.4}]
    assert evaluate_setting(setting, "model.layers.0.self_attn.q_proj.weight") == 0.1
    assert evaluate_setting(setting, "model.layers.0.cross_attn.q_proj.weight") == 0.2
    assert evaluate_setting(setting, "model.layers.0.mlp.up_proj.weight") == 0.3  # the default came first
    assert evaluate_setting([{"filter": "mlp", "value": 1}], "model.norm.weight") is None
    assert evaluate_setting([{"filter": "*", "value": 5}], "") == 5


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> dict[str, Path]:
    return family(tmp_path_factory.mktemp("llama"), "llama", n=2, layers=4)


def _sd(p: Path) -> dict[str, torch.Tensor]:
    return {k: v.double() for k, v in load_file(str(p / "model.safetensors")).items()}


def test_a_gradient_weight_is_applied_per_layer_and_outside_layers_at_t0(tmp_path: Path, llama) -> None:
    text = f"""
merge_method: linear
models:
  - model: {llama['m0']}
    parameters:
      weight: [1.0, 0.0]
  - model: {llama['m1']}
    parameters:
      weight: [0.0, 1.0]
parameters:
  normalize: false
dtype: float32
"""
    recipe = load_recipe(text=text)
    assert recipe.layered
    run_recipe(recipe, out=tmp_path / "out")
    out, a, b = _sd(tmp_path / "out"), _sd(llama["m0"]), _sd(llama["m1"])
    for name, x in out.items():
        if ".layers." in name:
            t = int(name.split(".")[2]) / 3
        else:  # embeddings, final norm and head: mergekit 0.1.5 evaluates them at t = 0
            t = 0.0
        ref = (1 - t) * a[name] + t * b[name]
        torch.testing.assert_close(x, ref, rtol=0, atol=1e-6, msg=name)
    assert torch.equal(out["model.layers.0.mlp.up_proj.weight"], a["model.layers.0.mlp.up_proj.weight"].float().double())
    assert torch.equal(out["model.layers.3.mlp.up_proj.weight"], b["model.layers.3.mlp.up_proj.weight"].float().double())


def test_precedence_source_then_slice_then_global_with_fall_through(tmp_path: Path, llama) -> None:
    text = f"""
merge_method: linear
slices:
  - sources:
      - model: {llama['m0']}
        layer_range: [0, 2]
        parameters:
          weight:
            - filter: mlp
              value: 2.0
      - model: {llama['m1']}
        layer_range: [0, 2]
    parameters:
      weight: 0.5
  - sources:
      - model: {llama['m0']}
        layer_range: [2, 4]
      - model: {llama['m1']}
        layer_range: [2, 4]
parameters:
  normalize: false
  weight:
    - filter: self_attn
      value: 0.25
    - value: 1.0
dtype: float32
"""
    run_recipe(load_recipe(text=text), out=tmp_path / "out.safetensors")
    out = {k: v.double() for k, v in load_file(str(tmp_path / "out.safetensors")).items()}
    a, b = _sd(llama["m0"]), _sd(llama["m1"])
    for name, x in out.items():
        layer = int(name.split(".")[2]) if ".layers." in name else None
        first_slice = layer is None and "embed" in name or layer is not None and layer < 2
        if first_slice:  # source (mlp only, for m0) > slice (0.5)
            wa = 2.0 if "mlp" in name else 0.5
            wb = 0.5
        else:  # the global conditional list: self_attn 0.25, else 1.0
            wa = wb = 0.25 if "self_attn" in name else 1.0
        torch.testing.assert_close(x, wa * a[name] + wb * b[name], rtol=0, atol=1e-5, msg=name)


def test_a_members_filter_sees_its_own_layer_number(tmp_path: Path, llama) -> None:
    """mergekit evaluates a model's parameters on that model's tensor name (its layer before renumbering)."""
    text = f"""
merge_method: linear
slices:
  - sources:
      - model: {llama['m0']}
        layer_range: [2, 3]
        parameters:
          weight: [{{filter: layers.2., value: 1.0}}, {{value: 0.0}}]
      - model: {llama['m1']}
        layer_range: [1, 2]
        parameters:
          weight: [{{filter: layers.2., value: 1.0}}, {{value: 0.0}}]
parameters:
  normalize: false
dtype: float32
"""
    run_recipe(load_recipe(text=text), out=tmp_path / "out.safetensors")
    out = load_file(str(tmp_path / "out.safetensors"))
    a = load_file(str(llama["m0"] / "model.safetensors"))
    # output layer 0 is m0's layer 2 (weight 1) and m1's layer 1 (weight 0)
    assert torch.equal(out["model.layers.0.mlp.up_proj.weight"], a["model.layers.2.mlp.up_proj.weight"])
    assert torch.count_nonzero(out["model.norm.weight"]) == 0  # outside the layers neither filter matches


def test_a_shared_parameter_on_a_model_is_refused_and_empty_gradients_too(llama) -> None:
    with pytest.raises(Exception, match="parameter 't' of slerp is shared by all models"):
        load_recipe(text=f"merge_method: slerp\nbase_model: {llama['base']}\nmodels:\n  - model: {llama['m0']}\n"
                         f"    parameters: {{t: [0, 1]}}\n  - model: {llama['base']}\n")
    with pytest.raises(Exception, match="an empty gradient list"):
        load_recipe(text=f"merge_method: linear\nmodels:\n  - model: {llama['m0']}\n    parameters: {{weight: []}}\n")
