"""PAPA against independently trained members at the same budget, on real data, and a population over 2 processes.

For each seed and each method, a population of K members with the same recipes (each its own
initialisation, data order and combination from PAPA's regularisation grid) is trained for the same
number of epochs, and :func:`merge.train.final_model` reports on test: the members (mean [min, max]),
their prediction ensemble, their average with BatchNorm recomputed (``papa.safetensors``) and their
greedy soup. Methods:

- ``independent``: no pull, each member from its own initialisation (the baseline, measured in the same run);
- ``papa 10/0.99``: PAPA with the paper's pull (every 10 steps, alpha 0.99, lr-scaled);
- ``papa 1/0.95`` and ``papa 1/0.9``: the pull this budget needs (see below);
- ``papa-all`` and ``papa-2``: mixes every ``--mix-every`` epochs, REPAIR (BatchNorm reset) after each.

The budget. The pulls alone shrink each member's distance to the average by the product of the a_t
(recorded as ``pull_shrink``). The paper's 300 CIFAR epochs with every=10, alpha=0.99 take that product to
about e^-100: members are tied together long before the end. At this benchmark's 375 steps the paper's
pull leaves it at 0.8: it does no work, and PAPA's average fails like independent members' average.
Pulling every step with alpha 0.95 takes it to about e^-9 in the same steps, which keeps members from
different initialisations in one basin; alpha 0.9 (about e^-19) ties them closer still.

Parts: ``mnist`` (small CNN on an MNIST subset, members well below the ceiling), ``tweets`` (the
MiniLM on 3-class tweet sentiment, fine-tuned from one pretrained model: every member starts in the same
basin, so averages work without PAPA; LayerNorm, so mixes get no statistics fix), ``timing`` (the same
PAPA population in one process and over 2 processes with torchrun/gloo; members compared).

Run (the figures in benchmarks/results/bench_papa.md; about 25 minutes on 2 CPU cores)::

    flock /tmp/papa-cpu.lock .venv/bin/python benchmarks/bench_papa.py
    .venv/bin/python benchmarks/bench_papa.py --quick          # a smoke run in about a minute
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


from merge.data import load_dataset  # noqa: E402
from merge.train import Recipe, TrainJob, final_model, papa_grid, run_method  # noqa: E402
from benchlib import machine  # noqa: E402

METHODS = {
    "independent": ("independent", {"independent_init": True}),
    "papa-all": ("papa-all", {}),
    "papa-2": ("papa-2", {}),
}


def methods(pulls: list[str]) -> list[str]:
    """The rows to run: independent, one ``papa every/alpha`` per pull, PAPA-all, PAPA-2."""
    names = ["independent"]
    for pull in pulls:
        every, alpha = pull.split("/")
        METHODS[f"papa {pull}"] = ("papa", {"every": int(every), "alpha": float(alpha)})
        names.append(f"papa {pull}")
    return names + ["papa-all", "papa-2"]


REUSED_SECONDS: dict[tuple[str, int, str], float] = {}  # (part, seed, method) -> seconds, from --reuse-log


def reuse_one(name: str, *, part: str, data, model, recipes, out: Path, seed: int, final_bn: int) -> dict | None:
    """The table of a run whose members are already in ``out`` (``--reuse``): the final model is rebuilt from
    them, nothing is trained; ``pull_shrink`` is read from the members' metadata, the seconds from the log."""
    import json

    import merge
    from merge.keys import TRAIN_KEY
    from merge.train import member_path

    paths = [member_path(out, i, arch=model["arch"]) for i in range(len(recipes))]
    if not all(p.exists() for p in paths):
        return None
    average = "average.safetensors" if METHODS[name][0] == "independent" else "papa.safetensors"
    report = final_model(paths, out_dir=out, data=data, recompute_bn=final_bn, average_name=average)[1]
    rows = {r["kind"] if r["kind"] != "soup" else r["name"].split()[0]: r["metrics"]["test"] for r in report["rows"]}
    with merge.open_checkpoint(paths[0]) as src:
        train = json.loads(src.metadata[TRAIN_KEY])
    shrink = (train.get("papa") or {}).get("pull_shrink")
    seconds = REUSED_SECONDS.get((part, seed, name))
    return {"rows": rows, "seconds": seconds, "train_seconds": None, "pull_shrink": shrink, "reused": True}


def run_one(name: str, *, data, model, recipes, out: Path, seed: int, mix_every: int, final_bn: int,
            part: str = "", reuse: bool = False) -> dict:
    if reuse:
        r = reuse_one(name, part=part, data=data, model=model, recipes=recipes, out=out, seed=seed, final_bn=final_bn)
        if r is not None:
            return r
    method, options = METHODS[name]
    options = dict(options)
    if method in ("papa-all", "papa-2"):
        options["mix_every"] = mix_every
    if method != "independent":
        options["final_bn_batches"] = final_bn
    job = TrainJob(model=model, data=data, out_dir=out, members=len(recipes), recipes=recipes, seed=seed,
                   progress=False, force=True)
    t0 = time.perf_counter()
    result = run_method(method, job, **options)
    train_s = time.perf_counter() - t0
    report = result.report if result.report.get("rows") else final_model(
        result.paths, out_dir=out, data=data, recompute_bn=final_bn, average_name="average.safetensors")[1]
    rows = {r["kind"] if r["kind"] != "soup" else r["name"].split()[0]: r["metrics"]["test"] for r in report["rows"]}
    training = result.report.get("training") or [{}]
    return {"rows": rows, "seconds": round(time.perf_counter() - t0, 1), "train_seconds": round(train_s, 1),
            "pull_shrink": training[0].get("pull_shrink")}


def mnist_part(args, seeds):
    data = load_dataset("mnist", seed=0, limit=args.mnist_limit, eval_limit=args.eval_limit)
    model = {"arch": "small_cnn", "num_classes": 10, "in_chans": 1, "image_size": 28, "kwargs": {"width": args.width}}
    results = {}
    for seed in seeds:
        base = Recipe(epochs=args.mnist_epochs, batch_size=64, lr=0.05, weight_decay=5e-4)
        recipes = [dataclasses.replace(base, seed=1000 * seed + i, data_seed=1000 * seed + i, **combo)
                   for i, combo in enumerate(papa_grid(args.members, seed=seed))]
        for name in methods(args.papa):
            r = run_one(name, data=data, model=model, recipes=recipes, out=args.out / "mnist" / f"s{seed}" / name,
                        seed=seed, mix_every=args.mix_every, final_bn=20, part="mnist", reuse=args.reuse)
            results.setdefault(name, []).append(r)
            log(f"mnist seed {seed} {name}: {fmt_rows(r)}")
    return results


def tweets_part(args, seeds):
    data = load_dataset("tweets", seed=0, limit=args.tweets_limit, eval_limit=args.tweets_eval_limit)
    model = {"arch": "hf:all-minilm-l6-v2-pypi", "num_classes": 3, "kwargs": {"max_length": args.max_length}}
    results = {}
    for seed in seeds:
        base = Recipe(epochs=args.tweets_epochs, batch_size=32, lr=args.tweets_lr, weight_decay=0.01, optimizer="adamw",
                      warmup_epochs=0.1)
        # Text takes no image augmentation: the grid is label smoothing alone, plus each member's seed.
        grid = papa_grid(args.tweets_members, seed=seed, choices={"label_smoothing": [0.0, 0.05, 0.1]})
        recipes = [dataclasses.replace(base, seed=1000 * seed + i, data_seed=1000 * seed + i, **combo)
                   for i, combo in enumerate(grid)]
        for name in methods(args.tweets_papa):
            r = run_one(name, data=data, model=model, recipes=recipes, out=args.out / "tweets" / f"s{seed}" / name,
                        seed=seed, mix_every=1, final_bn=1, part="tweets", reuse=args.reuse)
            results.setdefault(name, []).append(r)
            log(f"tweets seed {seed} {name}: {fmt_rows(r)}")
    return results


def timing_part(args):
    """The same PAPA population trained by one process and by two (torchrun, gloo): wall time, members compared."""
    common = ["train", "--model", "small_cnn", "--data", "mnist", "--limit", str(args.timing_limit), "--eval-limit",
              str(args.eval_limit), "--epochs",
              str(args.timing_epochs), "--members", "4", "--diversity", "augment", "--method", "papa",
              "--papa-every", "1", "--papa-alpha", "0.95", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = {}
    for label, prefix, extra_env in (("1 process (2 threads)", [sys.executable, "-m", "cli.main"], {}),
                                     ("2 ranks x 1 thread (torchrun, gloo)",
                                      [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                       "--nproc-per-node", "2", "-m", "cli.main"], {"OMP_NUM_THREADS": "1"})):
        folder = args.out / "timing" / label.split()[0]
        if folder.exists():
            shutil.rmtree(folder)  # a timing is of a fresh run, never a resumed one
        t0 = time.perf_counter()
        proc = subprocess.run([*prefix, *common, "--out", str(folder)], cwd=ROOT, env={**env, **extra_env},
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(proc.stdout + proc.stderr)
        out[label] = {"seconds": round(time.perf_counter() - t0, 1), "folder": folder}
        log(f"timing {label}: {out[label]['seconds']}s")
    import merge

    diff = 0.0
    one, two = (v["folder"] for v in out.values())
    for i in range(4):
        with merge.open_checkpoint(one / f"member-0{i}.safetensors") as a, \
                merge.open_checkpoint(two / f"member-0{i}.safetensors") as b:
            sa, sb = a.state_dict(), b.state_dict()
        diff = max(diff, max(float((sa[k].double() - sb[k].double()).abs().max()) for k in sa))
    return out, diff


# --- tables ----------------------------------------------------------------------------------------------


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def fmt_rows(r: dict) -> str:
    rows = r["rows"]
    return (f"members {100 * rows['members mean']['acc']:.1f} [{100 * rows['members min']['acc']:.1f}, "
            f"{100 * rows['members max']['acc']:.1f}] ens {100 * rows['ensemble']['acc']:.1f} "
            f"avg {100 * rows['average']['acc']:.1f} greedy {100 * rows['greedy']['acc']:.1f} ({r['seconds']}s)")


def mean_sd(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    m = statistics.mean(values) * scale
    sd = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{m:.{digits}f} ± {sd:.{digits}f}"


def table(results: dict, metric: str) -> list[str]:
    acc = metric == "acc"
    scale, digits = (100.0, 1) if acc else (1.0, 3)
    lines = ["| method | members mean [min, max] | ensemble | average (BN recomputed) | greedy soup | pull shrink | "
             "seconds |", "|---|---|---|---|---|---|---|"]
    for name, runs in results.items():
        def col(kind: str, runs: list = runs) -> list[float]:
            return [r["rows"][kind][metric] for r in runs]
        lo = statistics.mean(col("members min")) * scale
        hi = statistics.mean(col("members max")) * scale
        shrink = [r["pull_shrink"] for r in runs if r["pull_shrink"] is not None]
        secs = [r["seconds"] for r in runs if r["seconds"] is not None]
        lines.append(f"| {name} | {mean_sd(col('members mean'), scale, digits)} [{lo:.{digits}f}, {hi:.{digits}f}] | "
                     f"{mean_sd(col('ensemble'), scale, digits)} | {mean_sd(col('average'), scale, digits)} | "
                     f"{mean_sd(col('greedy'), scale, digits)} | "
                     f"{f'{statistics.mean(shrink):.3g}' if shrink else '-'} | "
                     f"{f'{statistics.mean(secs):.0f}' if secs else '-'} |")
    return lines


def per_seed(results: dict, seeds: list[int]) -> list[str]:
    """Every seed's figures, and each population's average against the independent members of the same seed: the
    per-seed values behind the means and behind claims such as "better in 3 of 3 seeds" or "closes 71% of the gap"."""
    lines = ["Test accuracy (%) per seed:", "",
             "| method | seed | members mean [min, max] | ensemble | average | greedy soup | pull shrink |",
             "|---|---|---|---|---|---|---|"]
    for name, runs in results.items():
        for seed, r in zip(seeds, runs, strict=True):
            acc = {k: f"{100 * v['acc']:.1f}" for k, v in r["rows"].items()}
            shrink = f"{r['pull_shrink']:.3g}" if r["pull_shrink"] is not None else "-"
            lines.append(f"| {name} | {seed} | {acc['members mean']} [{acc['members min']}, {acc['members max']}] | "
                         f"{acc['ensemble']} | {acc['average']} | {acc['greedy']} | {shrink} |")
    base = results.get("independent")
    if base:
        lines += ["", "Each population's average against the independent members of the same seed: the difference "
                  "from their mean, and the share of the gap from their mean to their ensemble that the average "
                  "closes (100% or more: it reaches their ensemble):", ""]
        for name, runs in results.items():
            if name == "independent":
                continue
            diffs, each = [], []
            for seed, r, b in zip(seeds, runs, base, strict=True):
                avg = r["rows"]["average"]["acc"]
                mean, ens = b["rows"]["members mean"]["acc"], b["rows"]["ensemble"]["acc"]
                closed = f"{100 * (avg - mean) / (ens - mean):.0f}% of the gap" if ens > mean else "no gap"
                diffs.append(avg - mean)
                each.append(f"seed {seed}: {100 * avg:.1f} vs {100 * mean:.1f}, ensemble {100 * ens:.1f}, {closed}")
            lines.append(f"- {name}: average - independent members' mean {100 * statistics.mean(diffs):+.1f} pts, "
                         f"higher in {sum(d > 0 for d in diffs)} of {len(diffs)} seeds ({'; '.join(each)})")
    return lines + [""]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--parts", nargs="+", default=["mnist", "tweets", "timing"], choices=["mnist", "tweets", "timing"])
    p.add_argument("--members", type=int, default=4)
    p.add_argument("--mnist-limit", type=int, default=4000)
    p.add_argument("--mnist-epochs", type=float, default=6)
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--mix-every", type=int, default=2)
    p.add_argument("--tweets-limit", type=int, default=480)
    p.add_argument("--tweets-epochs", type=float, default=2)
    p.add_argument("--tweets-members", type=int, default=3)
    p.add_argument("--tweets-eval-limit", type=int, default=250)
    p.add_argument("--tweets-lr", type=float, default=2e-4)
    p.add_argument("--max-length", type=int, default=32, help="tokens per tweet")
    p.add_argument("--papa", nargs="+", default=["10/0.99", "1/0.95", "1/0.9"], metavar="EVERY/ALPHA",
                   help="PAPA rows on MNIST: pull every EVERY steps with ALPHA")
    p.add_argument("--tweets-papa", nargs="+", default=["10/0.9995"], metavar="EVERY/ALPHA")
    p.add_argument("--eval-limit", type=int, default=3000, help="val and test examples (stratified)")
    p.add_argument("--timing-limit", type=int, default=4000)
    p.add_argument("--timing-epochs", type=float, default=2)
    p.add_argument("--quick", action="store_true", help="tiny sizes: check the script runs")
    p.add_argument("--reuse", action="store_true",
                   help="runs whose members are in --out are not trained again: their final model and table are "
                        "rebuilt from the members on disk")
    p.add_argument("--reuse-log", type=Path, default=None,
                   help="with --reuse: the log of the run that trained them, for the seconds column")
    p.add_argument("--note", default="", help="a sentence for the results file (e.g. how the members were trained)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "papa")
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "bench_papa.md")
    args = p.parse_args()
    if args.quick:
        args.seeds, args.mnist_limit, args.mnist_epochs, args.tweets_limit = args.seeds[:1], 600, 2, 64
        args.tweets_epochs, args.timing_limit, args.timing_epochs, args.mix_every = 1, 600, 1, 1
        args.eval_limit = 300
        args.results = args.out / "bench_papa_quick.md"
    started = time.perf_counter()
    if args.reuse_log is not None:
        for m in re.finditer(r"^(mnist|tweets) seed (\d+) (.+?): members .*\(([\d.]+)s\)$", args.reuse_log.read_text(),
                             re.M):
            REUSED_SECONDS[(m.group(1), int(m.group(2)), m.group(3))] = float(m.group(4))
    argv = sys.argv[1:]
    if "--note" in argv:  # the note is printed on its own
        i = argv.index("--note")
        argv = argv[:i] + argv[i + 2:]
    command = "python benchmarks/bench_papa.py " + " ".join(argv)
    lines = ["# bench_papa: PAPA vs independent members at the same budget", "",
             f"Machine: {machine()}; load average {os.getloadavg()[0]:.1f} at the start. Command: "
             f"`{command.strip()}` (under `flock /tmp/papa-cpu.lock`).",
             f"Seeds {args.seeds}; test split (MNIST {args.eval_limit}, tweets {args.tweets_eval_limit} examples, "
             "stratified); mean ± sample sd over seeds; members' [min, max] averaged over seeds; seconds per run "
             "(training and final model).", ""]
    if args.note:
        lines += [args.note, ""]
    if args.reuse:
        lines += ["With `--reuse`: runs whose members were on disk were not trained again; their average, greedy soup "
                  "and table were rebuilt from those members (the same calls a run makes after training), their "
                  "seconds are the training run's, read from its log.", ""]
    if "mnist" in args.parts:
        res = mnist_part(args, args.seeds)
        lines += [f"## MNIST, small CNN (width {args.width}), {args.mnist_limit} training images, {args.members} members, "
                  f"{args.mnist_epochs:g} epochs (batch 64, SGD lr 0.05 cosine); papa-all/papa-2 mix every "
                  f"{args.mix_every} epochs", "", "Test accuracy (%):", "", *table(res, "acc"), "", "Test NLL:", "",
                  *table(res, "nll"), "", *per_seed(res, args.seeds)]
    if "tweets" in args.parts:
        res = tweets_part(args, args.seeds)
        lines += [f"## Tweets (3 classes), MiniLM fine-tuned from the pretrained model, {args.tweets_limit} training "
                  f"tweets, {args.tweets_members} members, {args.tweets_epochs:g} epochs (batch 32, AdamW {args.tweets_lr:g}); "
                  "papa alpha 0.9995 is the fine-tuning default, the rows say what they ran", "",
                  "Test accuracy (%):", "", *table(res, "acc"), "", "Test NLL:", "", *table(res, "nll"), "",
                  *per_seed(res, args.seeds)]
    if "timing" in args.parts:
        timing, diff = timing_part(args)
        one, two = (v["seconds"] for v in timing.values())
        lines += [f"## One population, one process vs 2 processes (PAPA every 1 / 0.95, 4 members, MNIST "
                  f"{args.timing_limit} images, {args.timing_epochs:g} epochs; whole command, start-up included)", "",
                  "| run | seconds |", "|---|---|", *(f"| {k} | {v['seconds']} |" for k, v in timing.items()),
                  "", f"2 ranks / 1 process: {two / one:.2f}x the wall time; largest difference between the two runs' "
                  f"members: {diff:.2e}.", ""]
    lines.append(f"Total: {time.perf_counter() - started:.0f} s.")
    text = "\n".join(lines) + "\n"
    print(text)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(text)


if __name__ == "__main__":
    main()
