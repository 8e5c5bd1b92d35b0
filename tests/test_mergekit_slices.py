"""mergekit ``slices:``: layer ranges renumbered into the output, frankenmerges that stack or repeat layers,
the output's config.json rewritten, and every bad slice refused with its reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from cli.main import cli
from merge.errors import InvalidArgumentError
from merge.mergekit_recipe import load_recipe, run_recipe
from merge.slices import layout_of, rewrite_layer_config
from tests.mergekit_models import family


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> dict[str, Path]:
    return family(tmp_path_factory.mktemp("llama"), "llama", n=2, layers=4)


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory) -> dict[str, Path]:
    return family(tmp_path_factory.mktemp("qwen2"), "qwen2", n=1, layers=4)


def _sd(p: Path) -> dict[str, torch.Tensor]:
    return load_file(str(p / "model.safetensors") if p.is_dir() else str(p))


def test_layers_are_read_from_tensor_names_of_any_architecture() -> None:
    gpt2 = layout_of(["transformer.wte.weight", "transformer.h.0.attn.c_attn.weight", "transformer.h.1.mlp.c_fc.weight",
                      "transformer.ln_f.weight"])
    assert (gpt2.prefix, gpt2.num_layers, gpt2.pre, gpt2.post) == ("transformer.h.", 2, ["transformer.wte.weight"],
                                                                   ["transformer.ln_f.weight"])
    blocks = layout_of(["blocks.0.w", "blocks.1.w", "blocks.2.w", "head.w"])
    assert blocks.layers == [["w"], ["w"], ["w"]] and blocks.post == ["head.w"] and blocks.name(7, "w") == "blocks.7.w"
    assert layout_of(["model.mlp.weight"]).num_layers == 0
    with pytest.raises(InvalidArgumentError, match=r"several layer stacks \(model.layers.N."):
        layout_of(["model.layers.0.a", "model.layers.1.a", "vision.encoder.layers.0.a"])
    with pytest.raises(InvalidArgumentError, match=r"skip numbers \(\[1\]\)"):
        layout_of(["model.layers.0.a", "model.layers.2.a"])


def test_config_layer_count_and_per_layer_lists_follow_the_stacked_layers() -> None:
    cfg = {"num_hidden_layers": 3, "layer_types": ["a", "b", "c"], "no_rope_layers": [1, 0, 1], "vocab_size": 3}
    other = {"num_hidden_layers": 3, "layer_types": ["x", "y", "z"]}
    got = rewrite_layer_config(cfg, [(0, 0), (0, 1), (1, 1), (1, 2)], [None, other])
    assert got == {"num_hidden_layers": 4, "layer_types": ["a", "b", "y", "z"], "no_rope_layers": [1, 0, 0, 1],
                   "vocab_size": 3}


def test_a_passthrough_frankenmerge_stacks_layers_and_loads_in_transformers(tmp_path: Path, llama) -> None:
    from transformers import AutoModelForCausalLM

    recipe = tmp_path / "franken.yml"
    recipe.write_text(f"""
slices:
  - sources:
      - model: {llama['m0']}
        layer_range: [0, 3]
  - sources:
      - model: {llama['m1']}
        layer_range: [1, 4]
  - sources:
      - model: {llama['m1']}
        layer_range: [1, 4]
merge_method: passthrough
dtype: float32
""")
    res = CliRunner().invoke(cli, ["run", str(recipe), "-o", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    out, a, b = _sd(tmp_path / "out"), _sd(llama["m0"]), _sd(llama["m1"])
    # output layer k is (model, source layer): 0-2 from m0's 0-2, 3-5 and 6-8 from m1's 1-3 (repeated)
    origin = [(a, 0), (a, 1), (a, 2), (b, 1), (b, 2), (b, 3), (b, 1), (b, 2), (b, 3)]
    for name, x in out.items():
        if name.startswith("model.layers."):
            k, rest = name.split(".", 3)[2], name.split(".", 3)[3]
            src, layer = origin[int(k)]
            assert torch.equal(x, src[f"model.layers.{layer}.{rest}"]), name
    assert torch.equal(out["model.embed_tokens.weight"], a["model.embed_tokens.weight"])  # the first slice's
    assert torch.equal(out["lm_head.weight"], b["lm_head.weight"]) and torch.equal(out["model.norm.weight"],
                                                                                   b["model.norm.weight"])  # the last's
    assert len(out) == 9 * 9 + 3
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 9
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.num_hidden_layers == 9 and len(model.model.layers) == 9
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, 64) and torch.isfinite(logits).all()


def test_a_qwen2_frankenmerge_gets_its_layer_types_rewritten(tmp_path: Path, qwen2) -> None:
    from transformers import AutoModelForCausalLM

    text = f"""
slices:
  - sources: [{{model: {qwen2['m0']}, layer_range: [0, 4]}}]
  - sources: [{{model: {qwen2['m0']}, layer_range: [2, 4]}}]
merge_method: passthrough
"""
    run_recipe(load_recipe(text=text), out=tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 6 and len(cfg["layer_types"]) == 6
    assert len(AutoModelForCausalLM.from_pretrained(tmp_path / "out").model.layers) == 6


def test_passthrough_scale_multiplies_one_slice(tmp_path: Path, llama) -> None:
    text = f"""
slices:
  - sources: [{{model: {llama['m0']}, layer_range: [0, 2]}}]
  - sources:
      - model: {llama['m0']}
        layer_range: [0, 2]
        parameters: {{scale: [{{filter: o_proj, value: 0.0}}, {{value: 0.5}}]}}
merge_method: passthrough
dtype: float32
"""
    run_recipe(load_recipe(text=text), out=tmp_path / "out.safetensors")
    out, a = _sd(tmp_path / "out.safetensors"), _sd(llama["m0"])
    assert torch.equal(out["model.layers.1.mlp.up_proj.weight"], a["model.layers.1.mlp.up_proj.weight"])
    assert torch.equal(out["model.layers.3.mlp.up_proj.weight"], 0.5 * a["model.layers.1.mlp.up_proj.weight"])
    assert torch.count_nonzero(out["model.layers.2.self_attn.o_proj.weight"]) == 0


def test_slices_of_a_merge_with_a_base_renumber_every_member(tmp_path: Path, llama) -> None:
    """A SLERP over layer ranges that differ per model: each output layer merges the layers its slice names."""
    text = f"""
slices:
  - sources:
      - {{model: {llama['base']}, layer_range: [2, 4]}}
      - {{model: {llama['m0']}, layer_range: [0, 2]}}
merge_method: slerp
base_model: {llama['base']}
parameters:
  t: [0, 1]
dtype: float32
"""
    run_recipe(load_recipe(text=text), out=tmp_path / "out.safetensors")
    out, base, a = _sd(tmp_path / "out.safetensors"), _sd(llama["base"]), _sd(llama["m0"])
    # t = 0 on output layer 0 (the base's layer 2), t = 1 on output layer 1 (m0's layer 1)
    torch.testing.assert_close(out["model.layers.0.mlp.up_proj.weight"], base["model.layers.2.mlp.up_proj.weight"],
                               rtol=0, atol=1e-6)
    torch.testing.assert_close(out["model.layers.1.mlp.up_proj.weight"], a["model.layers.1.mlp.up_proj.weight"],
                               rtol=0, atol=1e-6)
    assert sorted(k for k in out if ".layers." in k)[-1].startswith("model.layers.1.")


@pytest.mark.parametrize("slices,message", [
    ("  - sources: [{model: M0, layer_range: [0, 9]}]\n", r"layer_range \[0, 9\] is outside .* 4 layers"),
    ("  - sources: [{model: M0, layer_range: [0, 2]}, {model: M1, layer_range: [0, 3]}]\n",
     "span different numbers of layers"),
    ("  - sources: [{model: M0, layer_range: [0, 2]}]\n  - sources: [{model: M0, layer_range: [0, 2]}, "
     "{model: M1, layer_range: [0, 2]}]\n", "different numbers of models"),
])
def test_bad_slices_are_refused_with_the_reason(tmp_path: Path, llama, slices: str, message: str) -> None:
    text = "merge_method: linear\nslices:\n" + slices.replace("M0", str(llama["m0"])).replace("M1", str(llama["m1"]))
    with pytest.raises(InvalidArgumentError, match=message):
        run_recipe(load_recipe(text=text), out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_malformed_slices_are_refused_before_any_model_is_read(llama) -> None:
    for snippet, message in [("slices: []\n", "'slices' must list"),
                             (f"slices:\n  - sources: [{{model: {llama['m0']}}}]\n", "needs 'model' and 'layer_range'"),
                             (f"slices:\n  - sources: [{{model: {llama['m0']}, layer_range: [3, 1]}}]\n",
                              r"layer_range must be \[first, last \+ 1\]"),
                             (f"slices:\n  - sources: [{{model: {llama['m0']}, layer_range: [0, 1], x: 1}}]\n",
                              "unknown field 'x'"),
                             (f"models: [{{model: {llama['m0']}}}]\nslices:\n  - sources: []\n", "not both")]:
        with pytest.raises(InvalidArgumentError, match=message):
            load_recipe(text="merge_method: passthrough\n" + snippet)


def test_a_slerp_slice_without_its_base_and_jobs_are_refused(tmp_path: Path, llama) -> None:
    text = f"""
slices:
  - sources: [{{model: {llama['m0']}, layer_range: [0, 4]}}, {{model: {llama['m1']}, layer_range: [0, 4]}}]
merge_method: slerp
base_model: {llama['base']}
parameters: {{t: 0.5}}
"""
    with pytest.raises(InvalidArgumentError, match=r"slices\[0\]: the base model .* is not among its sources"):
        run_recipe(load_recipe(text=text), out=tmp_path / "out")
    ok = text.replace(str(llama["m1"]), str(llama["base"]))
    with pytest.raises(InvalidArgumentError, match="runs in one process") as e:
        run_recipe(load_recipe(text=ok), out=tmp_path / "out", jobs=2)
    assert e.value.option == "jobs"


def test_the_dry_run_of_a_slice_recipe_plans_the_stacked_output(tmp_path: Path, llama) -> None:
    recipe = tmp_path / "franken.yml"
    recipe.write_text(f"slices:\n  - sources: [{{model: {llama['m0']}, layer_range: [0, 4]}}]\n"
                      f"  - sources: [{{model: {llama['m1']}, layer_range: [2, 4]}}]\nmerge_method: passthrough\n")
    res = CliRunner().invoke(cli, ["run", str(recipe), "-o", str(tmp_path / "out"), "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "2 slices, 2 models" in res.output and not (tmp_path / "out").exists()
    size = sum(v.numel() * 4 for k, v in _sd(llama["m0"]).items() if not k.startswith("model.layers.")) + 6 * sum(
        v.numel() * 4 for k, v in _sd(llama["m0"]).items() if k.startswith("model.layers.0."))
    from merge.mergekit_recipe import plan_recipe

    assert plan_recipe(recipe).out_bytes == size
