"""merge.align on BERT-like encoders (MiniLM): Hugging Face models, which torch.fx cannot trace, are recorded by running
them; their residual stream, MLP units and attention heads (as whole heads) are permuted, and what cannot be tied
soundly stays in place and is reported."""

from __future__ import annotations

import json

import pytest
import torch

from merge.align import align, apply_permutation, permutation_spec, random_permutation

transformers = pytest.importorskip("transformers")

HIDDEN, HEADS, INTERMEDIATE, LAYERS, VOCAB = 32, 4, 64, 2, 50
HEAD_SIZE = HIDDEN // HEADS
STREAM = "bert.embeddings.word_embeddings"


def config(**kwargs):
    return transformers.BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                   num_attention_heads=HEADS, intermediate_size=INTERMEDIATE, max_position_embeddings=16,
                                   num_labels=3, **kwargs)


def bert(seed: int = 0, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    return transformers.BertForSequenceClassification(config(**kwargs)).eval()


def batch(rows: int = 4, length: int = 7, seed: int = 0) -> dict:
    """Token ids with padding in the second row, so the attention runs with a padding mask."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(rows, length, dtype=torch.long)
    mask[1, length - 2:] = 0
    return {"input_ids": torch.randint(0, VOCAB, (rows, length), generator=g), "attention_mask": mask}


def logits(model, state, x) -> torch.Tensor:
    model.load_state_dict(state)
    with torch.no_grad():
        out = model(**x)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def layer(i: int) -> str:
    return f"bert.encoder.layer.{i}"


def test_the_spec_derived_from_bert_lists_its_stream_mlp_units_and_whole_heads():
    spec = permutation_spec(bert(), batch())
    heads = [f"{layer(i)}.attention.self.query.heads" for i in range(LAYERS)]
    mlp = [f"{layer(i)}.intermediate.dense" for i in range(LAYERS)]
    assert spec.sizes == {STREAM: HIDDEN, **{h: HEADS for h in heads}, **{m: INTERMEDIATE for m in mlp},
                          "bert.pooler.dense": HIDDEN}
    assert not spec.fixed
    axes = spec.axes_to_perm
    # the residual stream: every embedding's columns, every LayerNorm, each sublayer's output rows
    for k in ("bert.embeddings.position_embeddings.weight", "bert.embeddings.token_type_embeddings.weight"):
        assert axes[k] == (None, (STREAM, 1))
    for i in range(LAYERS):
        for k in ("attention.output.LayerNorm.weight", "output.LayerNorm.bias", "attention.output.dense.bias",
                  "output.dense.bias"):
            assert axes[f"{layer(i)}.{k}"] == ((STREAM, 1),)
        # whole heads of 8 units: the queries', keys' and values' rows, the attention output's columns
        for k in ("query", "key", "value"):
            assert axes[f"{layer(i)}.attention.self.{k}.weight"] == ((heads[i], HEAD_SIZE), (STREAM, 1))
            assert axes[f"{layer(i)}.attention.self.{k}.bias"] == ((heads[i], HEAD_SIZE),)
        assert axes[f"{layer(i)}.attention.output.dense.weight"] == ((STREAM, 1), (heads[i], HEAD_SIZE))
        # the MLP's units: the intermediate layer's rows and bias, the output layer's columns
        assert axes[f"{layer(i)}.intermediate.dense.weight"] == ((mlp[i], 1), (STREAM, 1))
        assert axes[f"{layer(i)}.intermediate.dense.bias"] == ((mlp[i], 1),)
        assert axes[f"{layer(i)}.output.dense.weight"] == ((STREAM, 1), (mlp[i], 1))
    assert axes["classifier.weight"] == (None, ("bert.pooler.dense", 1)) and axes["classifier.bias"] == (None,)


def test_heads_and_mlp_units_move_as_computed_independently_and_the_logits_stay_the_same():
    model, x = bert(), batch()
    spec = permutation_spec(model, x)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    perm = {p: torch.arange(n) for p, n in spec.sizes.items()}
    heads, units = torch.tensor([2, 0, 3, 1]), torch.randperm(INTERMEDIATE, generator=torch.Generator().manual_seed(0))
    perm[f"{layer(0)}.attention.self.query.heads"] = heads
    perm[f"{layer(1)}.intermediate.dense"] = units
    moved = apply_permutation(spec, perm, sd)
    for k in ("query", "key", "value"):  # head i is old head heads[i], its 8 units in order, in q, k and v alike
        w = sd[f"{layer(0)}.attention.self.{k}.weight"]
        assert torch.equal(moved[f"{layer(0)}.attention.self.{k}.weight"],
                           w.reshape(HEADS, HEAD_SIZE, HIDDEN)[heads].reshape(HIDDEN, HIDDEN))
        b = sd[f"{layer(0)}.attention.self.{k}.bias"]
        assert torch.equal(moved[f"{layer(0)}.attention.self.{k}.bias"], b.reshape(HEADS, HEAD_SIZE)[heads].reshape(-1))
    w = sd[f"{layer(0)}.attention.output.dense.weight"]
    assert torch.equal(moved[f"{layer(0)}.attention.output.dense.weight"],
                       w.reshape(HIDDEN, HEADS, HEAD_SIZE)[:, heads].reshape(HIDDEN, HIDDEN))
    assert torch.equal(moved[f"{layer(1)}.intermediate.dense.weight"], sd[f"{layer(1)}.intermediate.dense.weight"][units])
    assert torch.equal(moved[f"{layer(1)}.intermediate.dense.bias"], sd[f"{layer(1)}.intermediate.dense.bias"][units])
    assert torch.equal(moved[f"{layer(1)}.output.dense.weight"], sd[f"{layer(1)}.output.dense.weight"][:, units])
    untouched = [k for k in sd if not k.startswith((f"{layer(0)}.attention", f"{layer(1)}.intermediate",
                                                    f"{layer(1)}.output.dense.weight"))]
    assert all(torch.equal(moved[k], sd[k]) for k in untouched)
    torch.testing.assert_close(logits(model, moved, x), logits(model, sd, x), atol=1e-5, rtol=0)
    # the values' heads must move with the queries' and keys': leaving them behind changes the function
    wrong = dict(moved)
    for k in ("value.weight", "value.bias"):
        wrong[f"{layer(0)}.attention.self.{k}"] = sd[f"{layer(0)}.attention.self.{k}"]
    assert (logits(model, wrong, x) - logits(model, sd, x)).abs().max() > 1e-4


def test_random_permutations_of_bert_are_undone_by_weight_matching():
    model, x = bert(), batch()
    spec = permutation_spec(model, x)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    known = random_permutation(spec, seed=5)
    assert all(not torch.equal(p, torch.arange(len(p))) for p in known.values())
    shuffled = apply_permutation(spec, known, sd)
    assert not torch.equal(shuffled[f"{layer(1)}.attention.self.value.weight"], sd[f"{layer(1)}.attention.self.value.weight"])
    # the permuted model computes the same function, on inputs of another length and padding too
    for inputs in (x, batch(rows=3, length=11, seed=1)):
        torch.testing.assert_close(logits(model, shuffled, inputs), logits(model, sd, inputs), atol=1e-5, rtol=0)
    result = align(model, [sd, shuffled], method="weight", spec=spec)
    for k in sd:
        torch.testing.assert_close(result.state_dicts[1][k], sd[k], atol=1e-6, rtol=0)
    assert all(torch.equal(result.perms[1][p], torch.argsort(known[p])) for p in known)


def test_activation_matching_recovers_bert_heads_and_units_on_batches_of_other_shapes():
    model, x = bert(), batch()
    spec = permutation_spec(model, x)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    known = random_permutation(spec, seed=2)
    shuffled = apply_permutation(spec, known, sd)
    batches = [batch(rows=8, length=9, seed=s) for s in range(3)] + [{"input_ids": batch(seed=4)["input_ids"]}]
    result = align(model, [sd, shuffled], method="activation", spec=spec, batches=batches)
    assert all(torch.equal(result.perms[1][p], torch.argsort(known[p])) for p in known)
    assert all(torch.equal(result.state_dicts[1][k], sd[k]) for k in sd)
    assert all(torch.equal(model.state_dict()[k], sd[k]) for k in sd)  # the model's own weights restored


def test_attention_it_cannot_tie_is_reported_and_left_in_place():
    """Eager attention (``q @ k.transpose``, softmax, ``@ v``) is not recognised: its heads stay, reported."""
    model, x = bert(attn_implementation="eager"), batch()
    spec = permutation_spec(model, x)
    assert not any(p.endswith(".heads") for p in spec.sizes)
    assert f"{layer(0)}.intermediate.dense" in spec.sizes and STREAM in spec.sizes
    for i in range(LAYERS):
        for k in ("query", "key", "value"):
            group = f"{layer(i)}.attention.self.{k}"
            assert "feeds the method .view(), which the tracer does not know" in spec.fixed[group]
            assert spec.axes_to_perm[f"{group}.weight"] == (None, (STREAM, 1))
            assert spec.axes_to_perm[f"{group}.bias"] == (None,)
        assert spec.axes_to_perm[f"{layer(i)}.attention.output.dense.weight"] == ((STREAM, 1), None)
    assert any(line.startswith(f"left in place {layer(0)}.attention.self.query:") for line in spec.describe())
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    shuffled = apply_permutation(spec, random_permutation(spec, seed=1), sd)
    for k in ("query", "key", "value"):  # untouched but for the stream's order of their inputs
        name = f"{layer(0)}.attention.self.{k}"
        assert torch.equal(shuffled[f"{name}.bias"], sd[f"{name}.bias"])
        assert torch.equal(shuffled[f"{name}.weight"].sort(dim=1).values, sd[f"{name}.weight"].sort(dim=1).values)
    torch.testing.assert_close(logits(model, shuffled, x), logits(model, sd, x), atol=1e-5, rtol=0)


def test_an_encoder_whose_hidden_states_are_its_output_keeps_the_stream_in_place():
    """A bare BertModel (a sentence-transformers encoder): its outputs are the stream's units, so they stay."""
    torch.manual_seed(0)
    model, x = transformers.BertModel(config()).eval(), batch()
    spec = permutation_spec(model, x)
    assert spec.sizes == {**{f"encoder.layer.{i}.attention.self.query.heads": HEADS for i in range(LAYERS)},
                          **{f"encoder.layer.{i}.intermediate.dense": INTERMEDIATE for i in range(LAYERS)}}
    assert spec.axes_to_perm["embeddings.word_embeddings.weight"] == (None, None)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    shuffled = apply_permutation(spec, random_permutation(spec, seed=1), sd)
    torch.testing.assert_close(logits(model, shuffled, x), logits(model, sd, x), atol=1e-5, rtol=0)
    back = align(model, [sd, shuffled], method="weight", spec=spec).state_dicts[1]
    assert all(torch.equal(back[k], sd[k]) for k in sd)


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face folders, end to end


def folders(tmp_path, sentence_transformers: bool = False):
    """Folder a (save_pretrained) and folder b: a with every unit and head randomly permuted (same function)."""
    model = transformers.BertModel(config()) if sentence_transformers else bert()
    torch.manual_seed(0)
    model = model.eval()
    spec = permutation_spec(model, batch())
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    model.save_pretrained(tmp_path / "a")
    model.load_state_dict(apply_permutation(spec, random_permutation(spec, seed=3), sd))
    model.save_pretrained(tmp_path / "b")
    if sentence_transformers:
        for f in ("a", "b"):
            (tmp_path / f / "modules.json").write_text(json.dumps([
                {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
            (tmp_path / f / "1_Pooling").mkdir()
            (tmp_path / f / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": HIDDEN,
                                                                                 "pooling_mode_mean_tokens": True}))
    return tmp_path / "a", tmp_path / "b", sd


def load(folder, cls="BertForSequenceClassification"):
    return getattr(transformers, cls).from_pretrained(str(folder)).eval()


def test_align_command_on_hugging_face_folders_undoes_the_permutation(tmp_path):
    from click.testing import CliRunner

    from cli.main import cli
    from merge.io.sources import read_safetensors_metadata

    a, b, sd = folders(tmp_path)
    res = CliRunner().invoke(cli, ["align", str(a), str(b), "-o", str(tmp_path / "aligned")])
    assert res.exit_code == 0, res.output
    assert f"weight matching onto {a}: 6 permutations (200 units)" in res.output
    assert "left in place" not in res.output
    x = batch()
    for name in ("a", "b"):
        out = tmp_path / "aligned" / name
        assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
        torch.testing.assert_close(load(out)(**x).logits, load(tmp_path / name)(**x).logits, atol=1e-5, rtol=0)
        recipe = json.loads(read_safetensors_metadata(out / "model.safetensors")["papa_merge.recipe"])
        assert recipe["align"]["method"] == "weight" and recipe["align"]["batches"] is None
    aligned_b = load(tmp_path / "aligned" / "b").state_dict()
    for k in sd:
        torch.testing.assert_close(aligned_b[k], sd[k], atol=1e-6, rtol=0)
    res = CliRunner().invoke(cli, ["align", "--method", "activation", str(a), str(b), "-o", str(tmp_path / "act")])
    assert res.exit_code == 2 and "activation matching runs the members on their training data" in res.output
    assert "Traceback" not in res.output and not (tmp_path / "act").exists()


def test_soup_align_weight_on_hugging_face_folders(tmp_path):
    from click.testing import CliRunner

    from cli.main import cli

    a, b, _sd = folders(tmp_path)
    runner = CliRunner()
    res = runner.invoke(cli, ["soup", "--align", "weight", str(a), str(b), "-o", str(tmp_path / "soup")])
    assert res.exit_code == 0, res.output
    assert f"aligned 2 members onto {a} by weight matching" in res.output
    x = batch()
    # b is a permuted: aligned, the average is a itself, and the soup folder loads with from_pretrained
    torch.testing.assert_close(load(tmp_path / "soup")(**x).logits, load(a)(**x).logits, atol=1e-5, rtol=0)
    res = runner.invoke(cli, ["soup", str(a), str(b), "-o", str(tmp_path / "plain")])
    assert res.exit_code == 0, res.output
    assert (load(tmp_path / "plain")(**x).logits - load(a)(**x).logits).abs().max() > 1e-3


def test_align_command_on_a_sentence_transformers_folder(tmp_path):
    from click.testing import CliRunner

    from cli.main import cli

    a, b, sd = folders(tmp_path, sentence_transformers=True)
    res = CliRunner().invoke(cli, ["align", str(a), str(b), "-o", str(tmp_path / "aligned")])
    assert res.exit_code == 0, res.output
    # the stream is the encoder's output (pooled by sentence-transformers): left in place; heads and MLP units move
    assert f"weight matching onto {a}: 4 permutations (136 units)" in res.output
    out = tmp_path / "aligned" / "b"
    assert (out / "modules.json").is_file() and (out / "1_Pooling" / "config.json").is_file()
    x = batch()
    torch.testing.assert_close(load(out, "BertModel")(**x).last_hidden_state,
                               load(b, "BertModel")(**x).last_hidden_state, atol=1e-5, rtol=0)
    aligned_b = load(out, "BertModel").state_dict()
    for k in sd:
        torch.testing.assert_close(aligned_b[k], sd[k], atol=1e-6, rtol=0)


class Scaled(torch.nn.Linear):
    """A linear layer subclassed outside torch.nn (as LoRA's): it may compute more than a linear map, so it is run
    through, its weights read directly."""

    def __init__(self, n: int):
        super().__init__(n, n)
        self.scale = torch.nn.Parameter(torch.randn(n))

    def forward(self, x):
        return super().forward(x) * self.scale


class Untraceable(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = torch.nn.Linear(4, 6), torch.nn.Linear(6, 5), torch.nn.Linear(5, 7)
        self.d, self.e = torch.nn.Linear(7, 8), Scaled(8)

    def forward(self, x):
        if x.sum() > -1e9:  # control flow on the input: fx cannot trace it, so it is recorded by running it
            h = torch.relu(self.a(x))
            h[:, 0] = 1.0  # one of a's units written in place
            g = torch.stack([row for row in torch.relu(self.b(h))])  # b's units iterated over rows
            return self.e(torch.relu(self.d(torch.relu(self.c(g)))))
        return x


def test_a_recorded_model_keeps_in_place_what_it_writes_in_place_iterates_or_computes_in_a_foreign_layer():
    torch.manual_seed(0)
    model, x = Untraceable().eval(), torch.randn(5, 4)
    spec = permutation_spec(model, x)
    assert spec.sizes == {"c": 7}
    assert "feeds the method .__setitem__()" in spec.fixed["a"] and "feeds the method .unbind()" in spec.fixed["b"]
    assert "feeds linear, which the tracer does not know" in spec.fixed["d"]
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    shuffled = apply_permutation(spec, random_permutation(spec, seed=0), sd)
    assert not torch.equal(shuffled["c.weight"], sd["c.weight"])
    model.load_state_dict(shuffled)
    with torch.no_grad():
        got = model(x)
    model.load_state_dict(sd)
    with torch.no_grad():
        torch.testing.assert_close(got, model(x), atol=1e-5, rtol=0)


class Hidden(torch.nn.Module):
    """Reorders its hidden units where no torch function is seen (a custom op would do the same)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 6), torch.nn.Linear(6, 3)

    def forward(self, x):
        if x.sum() > -1e9:  # not traceable by fx: recorded by running it
            h = torch.relu(self.a(x))
            with torch._C.DisableTorchFunction():
                h = h[:, [1, 0, 2, 3, 4, 5]]
            return self.b(h)
        return x


def test_a_tensor_made_where_nothing_is_recorded_leaves_every_unit_in_place():
    torch.manual_seed(0)
    model, x = Hidden().eval(), torch.randn(5, 4)
    spec = permutation_spec(model, x)
    assert not spec.sizes
    assert spec.fixed["a"].startswith("the model makes a tensor outside torch's functions (input_")
