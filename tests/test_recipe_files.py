"""mergekit YAML recipes: run unchanged through the same code as `soup`; unsupported fields refused by name."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import merge
from cli.main import cli
from merge.mergekit_recipe import UnsupportedRecipeError, load_recipe, run_recipe


@pytest.fixture
def models(tmp_path: Path) -> dict[str, Path]:
    g = torch.Generator().manual_seed(0)
    base = {"model.embed.weight": torch.randn(40, 16, generator=g), "model.mlp.weight": torch.randn(16, 16, generator=g),
            "model.norm.weight": torch.ones(16), "steps": torch.tensor(7)}
    paths = {"base": tmp_path / "base.safetensors"}
    save_file(base, str(paths["base"]))
    for i in range(3):
        sd = {k: (v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v) for k, v in base.items()}
        paths[f"m{i}"] = tmp_path / f"m{i}.safetensors"
        save_file(sd, str(paths[f"m{i}"]))
    return paths


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "recipe.yml"
    p.write_text(text)
    return p


def test_a_mergekit_ties_config_runs_unchanged_and_equals_soup(tmp_path: Path, models) -> None:
    text = f"""
merge_method: ties
base_model: {models['base']}
models:
  - model: {models['base']}
  - model: {models['m0']}
    parameters:
      density: 0.5
      weight: 0.5
  - model: {models['m1']}
    parameters:
      density: 0.7
      weight: 0.3
parameters:
  normalize: true
  int8_mask: true
dtype: float32
out_dtype: bfloat16
tokenizer_source: base
"""
    recipe = _write(tmp_path, text)
    res = run_recipe(recipe, out=tmp_path / "r.safetensors")
    same = merge.soup([models["m0"], models["m1"]], base=models["base"], method="ties", weights=[0.5, 0.3],
                      params={"density": [0.5, 0.7], "normalize": True, "int8_mask": True}, dtype="bfloat16",
                      out=tmp_path / "s.safetensors")
    a, b = load_file(str(res.path)), load_file(str(same.path))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert a["model.mlp.weight"].dtype == torch.bfloat16 and torch.equal(a["steps"], torch.tensor(7))
    with safe_open(str(res.path), "pt") as f:
        rec = json.loads(f.metadata()["papa_merge.recipe"])
    assert rec["method"] == "ties" and rec["recipe_file"]["text"] == text
    assert rec["recipe_file"]["sha256"] == hashlib.sha256(text.encode()).hexdigest()
    assert rec["base"]["path"] == Path(models["base"]).name and [m["path"] for m in rec["members"]] == [
        Path(models["m0"]).name, Path(models["m1"]).name]  # outside the working folder: by name, never absolute


def test_filters_pick_parameters_per_tensor(tmp_path: Path, models) -> None:
    recipe = _write(tmp_path, f"""
merge_method: linear
models:
  - model: {models['m0']}
    parameters:
      weight:
        - filter: mlp
          value: 1.0
        - value: 0.0
  - model: {models['m1']}
    parameters:
      weight: 1.0
""")
    out = load_file(str(run_recipe(recipe, out=tmp_path / "o.safetensors").path))
    m0, m1 = load_file(str(models["m0"])), load_file(str(models["m1"]))
    assert torch.equal(out["model.embed.weight"], m1["model.embed.weight"])  # weight 0 for m0 outside mlp
    assert torch.allclose(out["model.mlp.weight"], (m0["model.mlp.weight"] + m1["model.mlp.weight"]) / 2)


def test_a_base_for_a_method_without_one_is_a_member(tmp_path: Path, models) -> None:
    recipe = load_recipe(_write(tmp_path, f"merge_method: karcher\nbase_model: {models['base']}\nmodels:\n"
                                          f"  - model: {models['m0']}\n  - model: {models['m1']}\n"))
    assert recipe.base is None and recipe.members == [str(models["m0"]), str(models["m1"]), str(models["base"])]


@pytest.mark.parametrize("snippet,field,message", [
    ("modules:\n  text: {}\n", "modules", "'modules' is not supported"),
    ("random_option: 3\n", "random_option", "unknown field 'random_option'"),
])
def test_unsupported_fields_are_refused_by_name(tmp_path: Path, models, snippet: str, field: str, message: str) -> None:
    text = f"merge_method: ties\nbase_model: {models['base']}\nmodels:\n  - model: {models['m0']}\n" + snippet
    with pytest.raises(UnsupportedRecipeError, match=message) as e:
        load_recipe(_write(tmp_path, text))
    assert e.value.field == field
    res = CliRunner().invoke(cli, ["run", str(tmp_path / "recipe.yml"), "-o", str(tmp_path / "out")])
    assert res.exit_code == 2 and message.split("'")[0] in res.output and not (tmp_path / "out").exists()


def test_a_hub_lora_is_read_as_a_hub_reference(tmp_path: Path, models) -> None:  # run: tests/test_lora_hub.py
    recipe = load_recipe(_write(tmp_path, "merge_method: linear\nmodels:\n  - model: org/model+org/adapter\n"))
    assert recipe.members == ["hf://org/model+hf://org/adapter"]


def test_bad_recipes_get_one_line(tmp_path: Path, models) -> None:
    with pytest.raises(merge.UnknownNameError, match="unknown method 'frobnicate'; valid methods: "):
        load_recipe(_write(tmp_path, f"merge_method: frobnicate\nmodels:\n  - model: {models['m0']}\n"))
    with pytest.raises(merge.InvalidArgumentError, match="'models' must list the models"):
        load_recipe(_write(tmp_path, "merge_method: linear\n"))
    with pytest.raises(merge.InvalidArgumentError, match="not valid YAML"):
        load_recipe(_write(tmp_path, "merge_method: [linear\n"))
    with pytest.raises(merge.CheckpointNotFoundError, match="neither a local path nor a Hub repository"):
        load_recipe(_write(tmp_path, "merge_method: linear\nmodels:\n  - model: ./nowhere/model\n"))


def test_run_command_and_dry_run(tmp_path: Path, models) -> None:
    recipe = _write(tmp_path, f"merge_method: dare_ties\nbase_model: {models['base']}\nmodels:\n"
                              f"  - model: {models['m0']}\n    parameters: {{weight: 1.0, density: 0.5}}\n"
                              f"  - model: {models['m1']}\n    parameters: {{weight: 1.0, density: 0.5}}\n")
    res = CliRunner().invoke(cli, ["run", str(recipe), "-o", str(tmp_path / "out"), "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "members:        2, base" in res.output and "peak memory:" in res.output and not (tmp_path / "out").exists()
    res = CliRunner().invoke(cli, ["run", str(recipe), "-o", str(tmp_path / "out"), "--seed", "3"])
    assert res.exit_code == 0 and res.stdout.startswith(f"wrote {tmp_path / 'out'}") and "dare_ties of 2 models" in res.stdout
    first = (tmp_path / "out" / "model.safetensors").read_bytes()
    res = CliRunner().invoke(cli, ["run", str(recipe), "-o", str(tmp_path / "out"), "--seed", "3", "--force"])
    assert res.exit_code == 0 and (tmp_path / "out" / "model.safetensors").read_bytes() == first
