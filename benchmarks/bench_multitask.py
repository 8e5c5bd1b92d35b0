"""Multi-task merging on offline pools: each method's merged backbone, evaluated with each task's own head.

Pool A (``--pool cnn``): a small CNN (``small_cnn``, BatchNorm) pretrained on MNIST digits, fine-tuned
separately on five tasks built from the real data the project installs (MNIST digits, MNIST parity, MNIST
rotated 90 degrees, inverted MNIST, sklearn digits upsampled to 28x28), each with its own head
(:func:`merge.multitask.build_pool`); ``--pool vit``: the same with a small ViT (``timm:vit_tiny_patch16_224``,
patch 7, width 64, depth 4), whose weights are mostly matrices, as CLIP's are. Per seed the pool is trained
anew, then every method of :data:`merge.multitask.METHODS` runs on it (:func:`merge.multitask.run_multitask`):
individual fine-tunes, the multi-task model (the upper reference), weight averaging, task arithmetic, TIES,
DARE-TIES, TSV-M, Iso-C, Iso-CTS, RegMean, Fisher and AdaMerging; a method not registered gives a row that
says so.

Each run appends its seeds to ``benchmarks/results/bench_multitask_runs.json`` (a seed run again replaces its
entry) and rewrites ``benchmarks/results/bench_multitask.md`` from every entry: mean and spread (sample
standard deviation) over seeds of the mean accuracy and the mean normalised accuracy (merged / individual,
per task, then averaged), per-task accuracy, and each merge's time and peak memory. One seed takes about
two minutes on two cores; run one seed per invocation:

    .venv/bin/python benchmarks/bench_multitask.py --pool cnn --seeds 0
    .venv/bin/python benchmarks/bench_multitask.py --pool cnn --seeds 1
    .venv/bin/python benchmarks/bench_multitask.py --report          # the tables again, from the JSON
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from merge.multitask import POOL_A, build_pool, run_multitask
from benchlib import machine

RESULTS = Path("benchmarks/results")
RUNS = RESULTS / "bench_multitask_runs.json"
REPORT = RESULTS / "bench_multitask.md"
POOLS = {
    "cnn": {"arch": "small_cnn", "model_kwargs": {"width": 16}, "optimizer": "sgd", "lr": 0.03, "pretrain_lr": 0.05},
    "vit": {"arch": "timm:vit_tiny_patch16_224", "model_kwargs": {"patch_size": 7, "embed_dim": 64, "depth": 4,
                                                                   "num_heads": 4},
            "optimizer": "adamw", "lr": 3e-4, "pretrain_lr": 1e-3},
}


def run_seed(pool: str, seed: int, a: argparse.Namespace) -> dict:
    cfg = POOLS[pool]
    with tempfile.TemporaryDirectory(prefix="bench-multitask-") as tmp:
        started = time.perf_counter()
        built = build_pool(Path(tmp) / "pool", tasks=POOL_A, seed=seed, limit=a.limit, eval_limit=a.eval_limit,
                           epochs=a.epochs, **cfg)
        train_s = time.perf_counter() - started
        result = run_multitask(built, work_dir=Path(tmp) / "work")
    return {**result.to_dict(), "pool": pool, "seed": seed, "train_seconds": round(train_s, 1), "config": cfg,
            "limit": a.limit, "eval_limit": a.eval_limit, "epochs": a.epochs}


def _mean_sd(values: list[float]) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * mean:.1f} ± {100 * sd:.1f}"


def table(runs: list[dict]) -> list[str]:
    """One pool's rows: mean ± sd over seeds of each method's mean and normalised accuracy, per task, cost."""
    tasks = runs[0]["tasks"]
    order = [r["method"] for r in runs[0]["rows"]]
    head = ["method", "avg acc", "norm acc", *tasks, "merge s", "peak MB", "parameters / note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method in order:
        rows = [next(r for r in run["rows"] if r["method"] == method) for run in runs]
        done = [r for r in rows if r["accuracy"]]
        if not done:
            lines.append("| " + " | ".join([method, "-", "-", *["-"] * len(tasks), "-", "-", rows[0]["note"]]) + " |")
            continue
        avg = [statistics.fmean(r["accuracy"].values()) for r in done]
        norm = [statistics.fmean(r["normalized"].values()) for r in done]
        per_task = [f"{100 * statistics.fmean(r['accuracy'][t] for r in done):.1f}" for t in tasks]
        secs = [r["seconds"] for r in done if r["seconds"] is not None]
        peaks = [r["peak_bytes"] for r in done if r["peak_bytes"] is not None]
        cells = [method, _mean_sd(avg), _mean_sd(norm), *per_task,
                 f"{statistics.fmean(secs):.2f}" if secs else "-",
                 f"{statistics.fmean(peaks) / 2**20:.1f}" if peaks else "-", rows[0]["note"]]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def write_report(all_runs: list[dict], command: str) -> None:
    out = [
        "# Multi-task merging: one backbone, a fine-tune and a head per task",
        "",
        f"Written by `benchmarks/bench_multitask.py` on {datetime.date.today().isoformat()}; last command: "
        f"`{command}`.",
        "",
        f"Machine: {machine()}.",
        "",
        "Each pool: a model pretrained on MNIST digits (other rows than the fine-tunes'), then per task a head "
        "fitted on the pretrained features and the backbone fine-tuned under that frozen head (as task "
        "arithmetic's CLIP fine-tunes keep the zero-shot head frozen). The merges see the backbones only; each "
        "task is evaluated with its own head on its test split (1,000 rows; sklearn digits: 360). "
        "Accuracy in %, mean ± sample standard deviation over seeds; *norm acc* is merged / individual per "
        "task, then averaged. *merge s* and *peak MB* are the merge's wall time and the growth of the process's "
        "peak resident memory during it (for RegMean, Fisher and AdaMerging they include running the members "
        "on their batches). Parameters are FusionBench's CLIP ViT-B/32 settings where one exists, else the "
        "operator's registered defaults; none is tuned on these pools.",
        "",
        "On the `cnn` pool, TSV-M, Iso-C, Iso-CTS and RegMean come out equal to weight averaging: they act on "
        "2-D weight matrices and average every other tensor (as their references do), and the small CNN's only "
        "matrix is its head, which is never merged. The `vit` pool (a small ViT, mostly matrices, no BatchNorm) "
        "is where they differ. The `cnn` pool's BatchNorm statistics are merged like every other tensor.",
        "",
    ]
    for pool in sorted({r["pool"] for r in all_runs}):
        runs = sorted((r for r in all_runs if r["pool"] == pool), key=lambda r: r["seed"])
        cfg = runs[0]["config"]
        out += [f"## Pool `{pool}`: {cfg['arch']} {cfg['model_kwargs']}, seeds {[r['seed'] for r in runs]}", "",
                f"{len(runs[0]['tasks'])} tasks, {runs[0]['limit']} training rows each, {runs[0]['epochs']} epochs "
                f"({cfg['optimizer']}, lr {cfg['lr']}); training the pool took "
                f"{statistics.fmean(r['train_seconds'] for r in runs):.0f} s per seed.", "",
                *table(runs), ""]
    REPORT.write_text("\n".join(out))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pool", choices=sorted(POOLS), default="cnn")
    p.add_argument("--seeds", type=int, nargs="*", default=[0])
    p.add_argument("--limit", type=int, default=2000, help="training rows per task")
    p.add_argument("--eval-limit", type=int, default=1000, help="test rows per task")
    p.add_argument("--epochs", type=float, default=4.0)
    p.add_argument("--report", action="store_true", help="only rewrite the Markdown from the JSON")
    a = p.parse_args()
    command = "python " + " ".join(shlex.quote(x) for x in sys.argv)
    runs = json.loads(RUNS.read_text()) if RUNS.exists() else []
    if not a.report:
        for seed in a.seeds:
            entry = run_seed(a.pool, seed, a)
            runs = [r for r in runs if (r["pool"], r["seed"]) != (a.pool, seed)] + [entry]
            RUNS.write_text(json.dumps(runs, indent=1) + "\n")
            print(f"pool {a.pool} seed {seed}: trained in {entry['train_seconds']} s", flush=True)
    if runs:
        write_report(runs, command)
        print(REPORT.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
