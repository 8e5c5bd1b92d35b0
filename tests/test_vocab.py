"""Tokenizer merging in mergekit recipes (merge.vocab): the output vocabulary, and each model's embedding and head
rows on it by mergekit 0.1.5's rules, checked against rows computed by hand in float64 from the models' files;
the written tokenizer and chat template; what is refused."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from cli.main import cli
from merge.errors import InvalidArgumentError
from merge.mergekit_recipe import UnsupportedRecipeError, load_recipe, run_recipe
from merge.vocab import MERGEKIT_TEMPLATE_NAMES, TokenizerWarning
from tests.mergekit_models import family

SPECIALS = ["<unk>", "<s>", "</s>"]
WORDS = SPECIALS + [chr(c) for c in range(ord("a"), ord("z") + 1)] + [chr(c) for c in range(ord("A"), ord("Z") + 1)] \
    + [str(d) for d in range(9)]  # 64 tokens, one per embedding row of the tiny models
# Each model's vocabulary, in id order: m1 lacks the last two of the base's and has two new ones, m2 lacks the last
# three and has those two and one more. So, in a union with the base: WORDS[61] is missing from m2 only, WORDS[62:]
# from m1 and m2 (both take the base's row); alpha and beta are in m1 and m2 only (their mean); gamma in m2 only.
VOCABS = {"base": WORDS, "m0": WORDS, "m1": WORDS[:62] + ["α", "β"], "m2": WORDS[:61] + ["α", "β", "γ"]}
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"
MERGEKIT_VENV = Path(__file__).resolve().parents[1] / "benchmarks" / "out" / "mergekit-venv"


def save_tiny_tokenizer(folder: Path, words: list[str]) -> Path:
    """A BPE tokenizer (no merges) whose ids are ``words``' positions, saved with ``save_pretrained``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(vocab={w: i for i, w in enumerate(words)}, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(str(folder))
    return folder


def add_tokenizers(models: dict[str, Path]) -> dict[str, Path]:
    """Give the family's base and fine-tunes the tokenizers of :data:`VOCABS`."""
    for name, words in VOCABS.items():
        if name in models:
            save_tiny_tokenizer(models[name], words)
    return models


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    return add_tokenizers(family(tmp_path_factory.mktemp("vocab"), "llama", n=3, layers=2))


def _tensors(models: dict[str, Path], name: str) -> dict[str, np.ndarray]:
    return {k: load_file(str(p / "model.safetensors"))[name].double().numpy() for k, p in models.items()}


def _row(models_t: dict[str, np.ndarray], model: str, token: str) -> np.ndarray:
    return models_t[model][VOCABS[model].index(token)]


def _expected_rows(tensors: dict[str, np.ndarray], vocab: dict[str, int], inputs: list[str], base: str | None,
                   own_only: dict[str, str] | None = None) -> dict[str, np.ndarray]:
    """Each input's rows on ``vocab`` by mergekit's defaults, by hand: its own row; else the only model with the
    token; else the base's; else the mean of those that have it."""
    out = {}
    for m in inputs:
        rows = np.zeros((len(vocab), tensors[m].shape[1]))
        for tok, i in vocab.items():
            if tok in VOCABS[m]:
                rows[i] = _row(tensors, m, tok)
                continue
            has = [x for x in inputs if tok in VOCABS[x]]
            if len(has) == 1:
                rows[i] = _row(tensors, has[0], tok)
            elif base in has:
                rows[i] = _row(tensors, base, tok)
            else:
                rows[i] = np.mean([_row(tensors, x, tok) for x in has], axis=0)
        out[m] = rows
    return out


def _recipe(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "recipe.yml"
    p.write_text(text)
    return p


def _out_vocab(out: Path) -> dict[str, int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(out)).get_vocab()


def test_union_vocabulary_and_rows_of_tokens_some_models_lack(tmp_path: Path, models) -> None:
    recipe = _recipe(tmp_path, f"merge_method: linear\nbase_model: {models['base']}\nmodels:\n"
                               f"  - model: {models['m0']}\n  - model: {models['m1']}\n  - model: {models['m2']}\n"
                               "tokenizer_source: union\ndtype: float32\n")
    out = run_recipe(recipe, out=tmp_path / "out").path
    vocab = _out_vocab(out)
    # The base's tokens at their ids, then the others' new tokens in the order met (m1's, then m2's).
    assert vocab == {**{w: i for i, w in enumerate(WORDS)}, "α": 64, "β": 65, "γ": 66}
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 67
    got = load_file(str(out / "model.safetensors"))
    inputs = ["m0", "m1", "m2", "base"]  # linear: the base is one more member (mergekit adds it)
    for name in (EMBED, HEAD):
        rows = _expected_rows(_tensors(models, name), vocab, inputs, "base")
        want = np.mean([rows[m] for m in inputs], axis=0)  # linear, equal weights
        assert got[name].shape == (67, 16)
        np.testing.assert_allclose(got[name].double().numpy(), want, rtol=0, atol=2e-7)
    # the rules, one token each: gamma is m2's row in every model, alpha the m1/m2 mean, "9" the base's
    t = _tensors(models, EMBED)
    np.testing.assert_allclose(got[EMBED][vocab["γ"]].double().numpy(), _row(t, "m2", "γ"), atol=1e-7)
    alpha = (_row(t, "m1", "α") + _row(t, "m2", "α")) / 2
    np.testing.assert_allclose(got[EMBED][vocab["α"]].double().numpy(), (2 * alpha + _row(t, "m1", "α")
                                                                         + _row(t, "m2", "α")) / 4, atol=1e-7)
    last = WORDS[63]
    np.testing.assert_allclose(got[EMBED][vocab[last]].double().numpy(),
                               (3 * _row(t, "base", last) + _row(t, "m0", last)) / 4, atol=1e-7)


def test_tokenizer_source_a_model(tmp_path: Path, models) -> None:
    recipe = _recipe(tmp_path, f"merge_method: linear\nbase_model: {models['base']}\nmodels:\n"
                               f"  - model: {models['m0']}\n  - model: {models['m2']}\n"
                               f"tokenizer_source: {models['m1']}\n")
    out = run_recipe(recipe, out=tmp_path / "out").path
    vocab = _out_vocab(out)
    assert vocab == {w: i for i, w in enumerate(VOCABS["m1"])}  # m1's tokenizer as it is, though m1 is no input
    got = load_file(str(out / "model.safetensors"))
    inputs = ["m0", "m2", "base"]
    rows = _expected_rows(_tensors(models, EMBED), vocab, inputs, "base")
    np.testing.assert_allclose(got[EMBED].double().numpy(), np.mean([rows[m] for m in inputs], axis=0), atol=2e-7)
    # beta: only m2 has it among the inputs, so it is m2's row in all three
    t = _tensors(models, EMBED)
    np.testing.assert_allclose(got[EMBED][vocab["β"]].double().numpy(), _row(t, "m2", "β"), atol=1e-7)


def test_tokenizer_source_base_maps_every_model_onto_the_base_vocabulary(tmp_path: Path, models) -> None:
    recipe = _recipe(tmp_path, f"merge_method: task_arithmetic\nbase_model: {models['base']}\nmodels:\n"
                               f"  - model: {models['m1']}\n    parameters: {{weight: 1.0}}\n"
                               "tokenizer_source: base\n")
    out = run_recipe(recipe, out=tmp_path / "out").path
    assert _out_vocab(out) == {w: i for i, w in enumerate(WORDS)}
    got = load_file(str(out / "model.safetensors"))[EMBED].double().numpy()
    t = _tensors(models, EMBED)
    # weight 1 task arithmetic returns m1's presented rows: its own, and the base's where m1 lacks the token
    want = np.stack([_row(t, "m1", w) if w in VOCABS["m1"] else _row(t, "base", w) for w in WORDS])
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_tokenizer_block_pads_and_takes_per_token_sources(tmp_path: Path, models) -> None:
    recipe = _recipe(tmp_path, f"""merge_method: linear
models:
  - model: {models['m0']}
  - model: {models['m1']}
tokenizer:
  source: union
  pad_to_multiple_of: 32
  tokens:
    "<|im_start|>":
      source: {{kind: model_token, model: {models['m0']}, token: "<s>"}}
    "<|im_end|>":
      source: {{kind: model_token, model: {models['m1']}, token_id: 5}}
    "α":
      source: {models['m1']}
      force: true
    "k":
      source: {{kind: zero}}
      force: true
""")
    out = run_recipe(recipe, out=tmp_path / "out").path
    vocab = _out_vocab(out)
    assert vocab["<|im_start|>"] == 66 and vocab["<|im_end|>"] == 67 and len(vocab) == 68
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 96  # 68 rounded up to 32
    got = load_file(str(out / "model.safetensors"))[EMBED].double().numpy()
    assert got.shape == (96, 16)
    t = _tensors(models, EMBED)
    present = {}
    for m in ("m0", "m1"):
        rows = np.zeros((96, 16))
        for tok, i in vocab.items():
            if tok == "<|im_start|>":
                rows[i] = _row(t, "m0", "<s>")
            elif tok == "<|im_end|>":
                rows[i] = t["m1"][5]
            elif tok == "α":
                rows[i] = _row(t, "m1", "α")  # forced: m1's row in m0 too
            elif tok == "k":
                rows[i] = 0.0  # forced zero, in both
            elif tok in VOCABS[m]:
                rows[i] = _row(t, m, tok)
            else:  # no base: the only model that has it
                rows[i] = _row(t, next(x for x in ("m0", "m1") if tok in VOCABS[x]), tok)
        rows[68:] = rows[:68].mean(axis=0)  # padding rows: the mean of the model's rows
        present[m] = rows
    np.testing.assert_allclose(got, (present["m0"] + present["m1"]) / 2, atol=2e-7)
    assert not got[vocab["k"]].any()


def test_a_token_entry_without_a_source_for_a_missing_token_is_refused_before_writing(tmp_path: Path, models) -> None:
    recipe = _recipe(tmp_path, f"merge_method: linear\nmodels:\n  - model: {models['m0']}\n  - model: {models['m1']}\n"
                               "tokenizer:\n  source: base\n  tokens:\n    '<new>': {}\n")
    with pytest.raises(InvalidArgumentError, match=r"tokenizer.tokens\['<new>'\]: .* has no source"):
        run_recipe(recipe, out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_chat_template_is_written_with_the_tokenizer(tmp_path: Path, models) -> None:
    from transformers import AutoTokenizer

    text = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    recipe = _recipe(tmp_path, f"merge_method: linear\nbase_model: {models['base']}\nmodels:\n"
                               f"  - model: {models['m0']}\nchat_template: {json.dumps(text)}\n")
    out = run_recipe(recipe, out=tmp_path / "out").path
    assert (out / "chat_template.jinja").read_text() == text  # where transformers 5's save_pretrained puts it
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.chat_template == text and tok.get_vocab() == {w: i for i, w in enumerate(WORDS)}
    assert tok.apply_chat_template([{"role": "user", "content": "a b"}], tokenize=False) == "[a b]"


@pytest.mark.parametrize("name", MERGEKIT_TEMPLATE_NAMES)
def test_mergekit_template_names_are_refused_before_anything_is_read(tmp_path: Path, models, name: str) -> None:
    recipe = _recipe(tmp_path, f"merge_method: linear\nmodels:\n  - model: {models['m1']}\n"
                               f"  - model: {models['m0']}\nchat_template: {name}\n")
    with pytest.raises(InvalidArgumentError, match=rf"chat_template '{name}' names one of mergekit's bundled templates"
                                                   r".*put the template's Jinja text in the recipe, or use auto"):
        run_recipe(recipe, out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_chat_template_auto_takes_the_template_most_models_carry(tmp_path: Path, models) -> None:
    import shutil

    copies = {}
    for name, template in (("base", "{{ 'B' }}"), ("m0", "{{ 'A' }}\n"), ("m1", "{{ 'A' }}")):
        copies[name] = Path(shutil.copytree(models[name], tmp_path / name))
        (copies[name] / "chat_template.jinja").write_text(template)
    recipe = _recipe(tmp_path, f"merge_method: linear\nbase_model: {copies['base']}\nmodels:\n"
                               f"  - model: {copies['m0']}\n  - model: {copies['m1']}\nchat_template: auto\n")
    out = run_recipe(recipe, out=tmp_path / "out").path
    assert (out / "chat_template.jinja").read_text() == "{{ 'A' }}"  # stripped, as mergekit compares them


def test_the_refused_template_names_are_mergekits() -> None:
    folder = next(MERGEKIT_VENV.glob("lib/python*/site-packages/mergekit/_data/chat_templates"), None)
    if folder is None:
        pytest.skip("mergekit 0.1.5 is not installed in benchmarks/out/mergekit-venv")
    assert sorted(p.stem for p in folder.glob("*.jinja")) == sorted(MERGEKIT_TEMPLATE_NAMES)


def test_bad_tokenizer_settings_are_refused_before_any_model_is_read(tmp_path: Path, models) -> None:
    head = f"merge_method: linear\nmodels:\n  - model: {models['m0']}\n"
    with pytest.raises(InvalidArgumentError, match="is neither auto nor a Jinja template; put the template.s text in the recipe") as e:
        load_recipe(_recipe(tmp_path, head + "chat_template: vicuna\n"))
    assert e.value.option == "chat_template"
    with pytest.raises(InvalidArgumentError, match="not both"):
        load_recipe(_recipe(tmp_path, head + "tokenizer_source: base\ntokenizer: {source: union}\n"))
    with pytest.raises(InvalidArgumentError, match="pad_to_multiple_of must be a positive whole number"):
        load_recipe(_recipe(tmp_path, head + "tokenizer: {pad_to_multiple_of: 0}\n"))
    with pytest.raises(InvalidArgumentError, match="give one of 'token_id' or 'token'"):
        load_recipe(_recipe(tmp_path, head + f"tokenizer:\n  tokens:\n    x: {{source: {{kind: model_token, "
                                             f"model: {models['m0']}}}}}\n"))
    with pytest.raises(InvalidArgumentError, match="not one of the recipe's models"):
        load_recipe(_recipe(tmp_path, head + f"tokenizer:\n  tokens:\n    x: {{source: {models['m1']}}}\n"))
    with pytest.raises(UnsupportedRecipeError, match="a tokenizer source on the Hub") as e:
        load_recipe(_recipe(tmp_path, head + "tokenizer_source: org/other-model\n"))
    assert e.value.field == "tokenizer_source"
    # a merged tokenizer is written into a folder: a single-file output is refused before anything is read
    res = CliRunner().invoke(cli, ["run", str(_recipe(tmp_path, head + "tokenizer_source: union\n")), "-o",
                                   str(tmp_path / "o.safetensors")])
    assert res.exit_code == 2 and "written into a model folder" in res.output and "\n" == res.output[-1]
    assert not (tmp_path / "o.safetensors").exists()


def test_dry_run_plans_the_merged_rows_and_jobs_are_refused(tmp_path: Path, models) -> None:
    recipe = _recipe(tmp_path, f"merge_method: linear\nbase_model: {models['base']}\nmodels:\n"
                               f"  - model: {models['m1']}\n  - model: {models['m2']}\ntokenizer_source: union\n")
    res = CliRunner().invoke(cli, ["run", str(recipe), "-o", str(tmp_path / "out"), "--dry-run"])
    assert res.exit_code == 0, res.output
    assert not (tmp_path / "out").exists()
    assert "note:           tokenizer (source union): 67 tokens, 67 embedding rows" in res.output
    res = CliRunner().invoke(cli, ["run", str(recipe), "-o", str(tmp_path / "out"), "--jobs", "2"])
    assert res.exit_code == 2 and "a tokenizer runs in one process" in res.output and "--jobs" in res.output
    assert not (tmp_path / "out").exists()


def test_a_later_stage_reads_an_earlier_stages_merged_tokenizer(tmp_path: Path, models) -> None:
    recipe = _recipe(tmp_path, f"""name: widened
merge_method: linear
base_model: {models['base']}
models:
  - model: {models['m1']}
  - model: {models['m2']}
tokenizer_source: union
---
merge_method: linear
models:
  - model: widened
  - model: {models['m0']}
tokenizer_source: widened
chat_template: {json.dumps(CHATML)}
""")
    out = run_recipe(recipe, out=tmp_path / "out").path
    vocab = _out_vocab(out)
    assert len(vocab) == 67 and vocab["γ"] == 66 and (out / "chat_template.jinja").read_text() == CHATML
    stage = load_file(str(out / "model.safetensors"))[EMBED].double().numpy()
    t = _tensors(models, EMBED)
    rows1 = _expected_rows(t, vocab, ["m1", "m2", "base"], "base")
    widened = np.mean([rows1[m] for m in ("m1", "m2", "base")], axis=0)
    # stage 2: m0 lacks alpha, beta, gamma: the only other input (the first stage's output) gives them
    m0 = np.stack([_row(t, "m0", w) if w in VOCABS["m0"] else widened[i] for w, i in sorted(vocab.items(),
                                                                                           key=lambda kv: kv[1])])
    np.testing.assert_allclose(stage, (widened + m0) / 2, atol=3e-7)
    assert not list(tmp_path.glob(".out.stages-*"))


def test_a_model_without_a_tokenizer_is_taken_to_have_the_bases(tmp_path: Path, models) -> None:
    import shutil

    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copyfile(models["m0"] / f, bare / f)
    recipe = _recipe(tmp_path, f"merge_method: linear\nbase_model: {models['base']}\nmodels:\n  - model: {bare}\n"
                               "tokenizer_source: union\n")
    with pytest.warns(TokenizerWarning, match="its tokens are taken to be the base's"):
        out = run_recipe(recipe, out=tmp_path / "out").path
    assert len(_out_vocab(out)) == 64


def test_the_merged_output_loads_in_transformers(tmp_path: Path, models) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe = _recipe(tmp_path, f"merge_method: ties\nbase_model: {models['base']}\nmodels:\n"
                               f"  - model: {models['m1']}\n    parameters: {{weight: 0.5, density: 0.5}}\n"
                               f"  - model: {models['m2']}\n    parameters: {{weight: 0.5, density: 0.5}}\n"
                               f"tokenizer: {{source: union, pad_to_multiple_of: 8}}\nchat_template: {json.dumps(CHATML)}\n")
    out = run_recipe(recipe, out=tmp_path / "out").path
    tok = AutoTokenizer.from_pretrained(str(out))
    model = AutoModelForCausalLM.from_pretrained(str(out))
    ids = tok("a γ b", return_tensors="pt")["input_ids"]
    assert ids.tolist() == [[WORDS.index("a"), 66, WORDS.index("b")]]
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, 3, 72) and torch.isfinite(logits).all()
    assert tok.apply_chat_template([{"role": "user", "content": "a"}], tokenize=False) == "<|im_start|>user\na<|im_end|>\n"


def test_slices_take_the_embeddings_from_the_first_slice_and_the_head_from_the_last(tmp_path: Path, models) -> None:
    recipe = _recipe(tmp_path, f"""merge_method: passthrough
slices:
  - sources: [{{model: {models['m0']}, layer_range: [0, 1]}}]
  - sources: [{{model: {models['m2']}, layer_range: [1, 2]}}]
tokenizer_source: union
""")
    with pytest.warns(TokenizerWarning) as caught:
        out = run_recipe(recipe, out=tmp_path / "out").path
    said = sorted(str(w.message).split(" (/")[0] for w in caught)
    assert said == ["3 tokens of the output vocabulary ('6', '7', '8') in none of the inputs of lm_head.weight",
                    "3 tokens of the output vocabulary ('α', 'β', 'γ') in none of the inputs of model.embed_tokens.weight"]
    vocab = _out_vocab(out)
    assert len(vocab) == 67 and vocab["γ"] == 66  # the union of every model the recipe names
    got = load_file(str(out / "model.safetensors"))
    t_embed, t_head = _tensors(models, EMBED), _tensors(models, HEAD)
    # the embeddings are m0's alone: a token m0 lacks takes no other model's row (no other input), so it is zeros
    want = np.stack([_row(t_embed, "m0", w) if w in VOCABS["m0"] else np.zeros(16) for w, _ in
                     sorted(vocab.items(), key=lambda kv: kv[1])])
    np.testing.assert_allclose(got[EMBED].double().numpy(), want, atol=0)
    want = np.stack([_row(t_head, "m2", w) if w in VOCABS["m2"] else np.zeros(16) for w, _ in
                     sorted(vocab.items(), key=lambda kv: kv[1])])
    np.testing.assert_allclose(got[HEAD].double().numpy(), want, atol=0)


def test_reads_at_any_offset_equal_the_whole_tensor_and_unchanged_models_are_not_wrapped(models) -> None:
    from merge.io.sources import open_checkpoint
    from merge.vocab import TokenizerSpec, VocabGroup, build_vocab

    refs = [str(models[k]) for k in ("m0", "m1", "m2", "base")]
    for source, pad in (("union", 8), ("base", None)):
        spec = TokenizerSpec(source, pad_to_multiple_of=pad, base=refs[-1])
        plan = build_vocab(spec, refs, {r: Path(r) for r in refs})
        srcs = {r: open_checkpoint(r) for r in refs}
        group = VocabGroup(plan, srcs, lambda tensor: (refs, refs[-1]))
        if source == "base":  # m0 has the base's tokenizer and rows: its source is used as it is
            assert group.wrap(refs[0]) is srcs[refs[0]] and group.wrap(refs[1]) is not srcs[refs[1]]
            continue
        src = group.wrap(refs[1])
        whole = src.read(EMBED)
        assert whole.shape == (72, 16)
        rows = _expected_rows(_tensors(models, EMBED), plan.vocab, ["m0", "m1", "m2", "base"], "base")["m1"]
        np.testing.assert_allclose(whole[:67].double().numpy(), rows, atol=1e-7)
        np.testing.assert_allclose(whole[67:].double().numpy(), np.tile(rows.mean(axis=0), (5, 1)), atol=1e-7)
        flat = whole.reshape(-1).view(torch.uint8)
        for off, n in ((0, 3), (5, 61), (62 * 64 - 3, 300), (flat.numel() - 7, 7), (0, flat.numel())):
            buf = torch.empty(n, dtype=torch.uint8)
            src.read_into(EMBED, off, memoryview(buf.numpy()))
            assert torch.equal(buf, flat[off:off + n]), (off, n)


@pytest.mark.slow
def test_union_equals_mergekit_0_1_5(tmp_path: Path, models) -> None:
    """mergekit 0.1.5's own output on the same models, compared token by token (its new tokens' ids vary per run)."""
    exe = MERGEKIT_VENV / "bin" / "mergekit-yaml"
    if not exe.exists():
        pytest.skip("mergekit 0.1.5 is not installed in benchmarks/out/mergekit-venv (bench_recipes --install-mergekit)")
    text = f"""merge_method: linear
base_model: {models['base']}
models:
  - model: {models['m0']}
  - model: {models['m1']}
  - model: {models['m2']}
tokenizer:
  source: union
  pad_to_multiple_of: 16
  tokens:
    "<|im_start|>": {{source: {{kind: model_token, model: {models['m0']}, token: "<s>"}}}}
    "k": {{source: {{kind: zero}}, force: true}}
    "α": {{source: {models['m2']}, force: true}}
    "<|im_end|>": {{source: {{kind: model_token, model: {models['m1']}, token_id: 5}}}}
chat_template: {json.dumps(CHATML)}
parameters: {{weight: 1.0}}
dtype: float32
"""
    recipe = _recipe(tmp_path, text)
    ours = run_recipe(recipe, out=tmp_path / "papa").path
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHON"))}
    res = subprocess.run([str(exe), str(recipe), str(tmp_path / "mk"), "--quiet"], capture_output=True, text=True,
                         env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    mk = tmp_path / "mk"
    v_ours, v_mk = _out_vocab(ours), _out_vocab(mk)
    assert v_ours.keys() == v_mk.keys()
    assert (ours / "chat_template.jinja").read_text() == (mk / "chat_template.jinja").read_text()
    assert json.loads((ours / "config.json").read_text())["vocab_size"] == json.loads(
        (mk / "config.json").read_text())["vocab_size"] == 80
    a, b = load_file(str(ours / "model.safetensors")), load_file(str(mk / "model.safetensors"))
    assert a.keys() == b.keys()
    order = [v_mk[tok] for tok, _ in sorted(v_ours.items(), key=lambda kv: kv[1])]
    for name in a:
        x, y = a[name].double(), b[name].double()
        if name in (EMBED, HEAD):
            y = torch.cat([y[order], y[len(order):]])  # mergekit's rows in our token order; padding rows after
        assert torch.allclose(x, y, rtol=0, atol=1e-6), (name, float((x - y).abs().max()))


# VmHWM after clear_refs: the peak over the baseline taken once transformers is imported, glibc's mmap threshold
# fixed so that it is the live memory's (as tests/test_lora.py's memory test).
_RUN_RSS = """
import json, sys
import torch
import transformers, tokenizers
from transformers import AutoTokenizer
from merge.mergekit_recipe import run_recipe
def status(field):
    return next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith(field + ":"))
recipe, out = sys.argv[1], sys.argv[2]
torch.randn(1000).sum()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = status("VmRSS")
run_recipe(recipe, out=out, force=True)
print(json.dumps({"before": before, "peak": status("VmHWM")}))
"""


@pytest.mark.slow
def test_peak_memory_of_a_union_of_8_models_equals_2_within_20_percent(tmp_path: Path) -> None:
    """8 MB embeddings and heads (4096 tokens x 512), each model with 16 tokens of its own: a model's presented rows
    held whole would add 16 MB per member."""
    import sys

    from safetensors.torch import save_file

    root = Path(__file__).resolve().parents[1]
    words = SPECIALS + [f"t{i}" for i in range(4093)]
    paths = []
    g = torch.Generator().manual_seed(0)
    for i in range(8):
        folder = tmp_path / f"m{i}"
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 4096}))
        save_file({EMBED: torch.randn(4096, 512, generator=g), HEAD: torch.randn(4096, 512, generator=g),
                   "model.norm.weight": torch.ones(512)}, str(folder / "model.safetensors"))
        save_tiny_tokenizer(folder, words if i == 0 else words[:-16] + [f"n{i}_{k}" for k in range(16)])
        paths.append(folder)
    grown = {}
    for n in (2, 8):
        recipe = _recipe(tmp_path, "merge_method: linear\nmodels:\n" + "".join(f"  - model: {p}\n" for p in paths[:n])
                         + f"base_model: {paths[0]}\nparameters: {{weight: 1.0}}\ntokenizer_source: union\n")
        peaks = []
        for _ in range(2):
            res = subprocess.run([sys.executable, "-c", _RUN_RSS, str(recipe), str(tmp_path / f"o{n}")],
                                 capture_output=True, text=True, cwd=root, check=True,
                                 env={**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)})
            rss = json.loads(res.stdout.strip().splitlines()[-1])
            peaks.append(rss["peak"] - rss["before"])
        grown[n] = min(peaks)
        assert load_file(str(tmp_path / f"o{n}" / "model.safetensors"))[EMBED].shape[0] == 4096 + 16 * (n - 1)
    assert grown[8] <= 1.2 * grown[2] + 2048, grown  # kB; 2 MB of slack for allocator noise


@pytest.mark.parametrize("fails", ["tokenizer", "config"])
def test_a_failure_writing_the_tokenizer_or_config_publishes_nothing(tmp_path: Path, models, monkeypatch, fails) -> None:
    # The merged tokenizer and a slice recipe's rewritten config.json go into the output folder before it is
    # published: a failure there leaves no output (no weights without their tokenizer or layer count).
    import merge.slices
    import merge.vocab

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(merge.vocab if fails == "tokenizer" else merge.slices,
                        "write_tokenizer" if fails == "tokenizer" else "rewrite_layer_config", boom)
    recipe = _recipe(tmp_path, f"""merge_method: passthrough
slices:
  - sources: [{{model: {models['m0']}, layer_range: [0, 1]}}]
  - sources: [{{model: {models['m2']}, layer_range: [0, 2]}}]
tokenizer_source: union
""")
    with pytest.warns(TokenizerWarning), pytest.raises(OSError, match="disk full"):
        run_recipe(recipe, out=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yml"]
